"""Diffusion step distillation (``distill-diffusion``): a many-step DDPM/DDIM teacher (``diffusers``
``UNet2DModel``, pixel space) teaches students that sample in 1 to 4 steps.

- :mod:`.schedule`   the noise schedule (alpha, sigma, SNR), prediction-type conversions, DDIM steps
- :mod:`.sampling`   DDIM and multi-step consistency samplers over a ``model_fn(z, t) -> output``
- :mod:`.losses`     teacher denoising loss, progressive-distillation targets, consistency distillation
- :mod:`.metrics`    InceptionV3 features (TorchScript, checksummed), FID, KID, PSNR
- :mod:`.config`     the lab config (pydantic) and presets
- :mod:`.models`     UNet builders, diffusers pipeline folders (save / load)
- :mod:`.train`      the training loops (teacher, progressive round, consistency)
- :mod:`.stages`     prepare / train / evaluate / speed of one stage
- :mod:`.kind`       the :class:`distill.kinds.Kind` value
"""
