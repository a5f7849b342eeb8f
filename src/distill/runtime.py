"""What every kind's training loop shares at run time: RNG state capture and replay (exact resume), the
per-epoch generator, and the training progress bar / log lines."""

from __future__ import annotations

import logging
import sys

import torch

__all__ = ["Progress", "epoch_generator", "rng_state", "set_rng_state", "stage_threads", "usable_cpus"]

log = logging.getLogger("distill.train")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a container's cpuset), else ``os.cpu_count()``."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def stage_threads(cpus: int, concurrent: int, override: str | int | None = None) -> int:
    """Torch intra-op threads for one training stage when up to ``concurrent`` stages share ``cpus`` cores: an
    equal share, at least 1 (``override``, e.g. ``$DISTILL_TORCH_THREADS``, wins when set). Each stage running
    with every core as its own thread pool oversubscribes the machine ``concurrent`` times, which OpenMP's
    spinning threads turn into far more than a ``concurrent``-fold slowdown."""
    if override not in (None, ""):
        try:
            n = int(override)
        except (TypeError, ValueError):
            raise ValueError(f"DISTILL_TORCH_THREADS must be a positive integer, got {override!r}") from None
        if n < 1:
            raise ValueError(f"DISTILL_TORCH_THREADS must be a positive integer, got {override!r}")
        return n
    if cpus < 1 or concurrent < 1:
        raise ValueError(f"cpus and concurrent must be at least 1, got {cpus} and {concurrent}")
    return max(1, cpus // concurrent)


def rng_state() -> dict:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["torch_cuda"]))


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    # Shuffling and augmentation of epoch e depend on (seed, e) only: a resumed run replays them exactly.
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return g


class Progress:
    def __init__(self, mode: str, total: int, desc: str):
        self.bar = None
        use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.log_lines = mode in ("auto", "log") and not use_bar
        if use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, **postfix):
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def epoch_line(self, text: str):
        if self.bar is not None:
            self.bar.write(text)
        elif self.log_lines:
            log.info(text)

    def close(self):
        if self.bar is not None:
            self.bar.close()


