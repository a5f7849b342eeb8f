"""A tiny diffusion lab for tests: 8x8 images, a 2-level UNet, an 8-step teacher, rounds 4 -> 2, consistency."""

from __future__ import annotations


def tiny_diffusion_overrides(source, cache, n_train: int = 20, n_test: int = 6, **extra) -> dict:
    train = dict(device="cpu", amp="off", channels_last="off", progress="off", seed=0, batch_size=8, lr=1e-3, warmup_steps=0,
                 log_every=2, checkpoint_every=2, ema_decay=0.9)
    ov = {
        "data": {"source": str(source), "cache_dir": str(cache), "val_size": 12, "train_subset": 3 * n_train - 12,
                 "test_subset": 3 * n_test, "image_size": 8},
        "teacher": {"model": {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4},
                    "train": {**train, "steps": 4}, "sample_steps": 8},
        "progressive": {"final_steps": 2, "train": {**train, "steps": 2}},
        "consistency": {"skip": 256, "train": {**train, "steps": 2}},
        "eval": {"steps": [1, 2, 4], "n_samples": 6, "n_reference": 10, "val_samples": 6, "batch_size": 8, "grid": 4,
                 "kid_subset_size": 4, "inception_batch": 16, "speed_runs": 1},
        "target_steps": 2,
    }
    ov.update(extra)
    return ov
