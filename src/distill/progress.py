"""Progress of a long decode: a tqdm bar on an interactive stderr, otherwise a log line every ~10 %."""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["Progress"]

log = logging.getLogger("distill.image.data")


class Progress:
    """tqdm bar on an interactive stderr, otherwise a log line every ~10 %."""

    def __init__(self, total: int, desc: str, unit: str, progress: bool):
        self.total = max(int(total), 1)
        self.desc = desc
        self.done = 0
        self.images = 0
        self.next_pct = 10
        self.t0 = time.perf_counter()
        self.bar = None
        if progress and getattr(sys.stderr, "isatty", lambda: False)():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, desc=desc, unit=unit, unit_scale=True, leave=False)
            except Exception:  # pragma: no cover - tqdm missing or broken terminal
                self.bar = None

    def update_to(self, done: int, images: int) -> None:
        done = min(int(done), self.total)
        if self.bar is not None:
            self.bar.update(done - self.done)
            self.bar.set_postfix(images=images, refresh=False)
        else:
            pct = 100 * done // self.total
            if pct >= self.next_pct:
                log.info("%s: %d%% (%d images, %.1fs)", self.desc, pct, images,
                         time.perf_counter() - self.t0)
                self.next_pct = (pct // 10 + 1) * 10
        self.done = done
        self.images = images

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
