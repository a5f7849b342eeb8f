"""Causal-LM distillation: a large language model teaches a small one with a loss over the vocabulary at every
target token. Submodules are imported explicitly (``from distill.lm.losses import distill_loss``); this package
imports nothing heavy by itself."""
