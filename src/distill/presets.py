"""Merging a preset with overrides: the one ``deep_merge`` every kind's ``load_profile`` uses."""

from __future__ import annotations

import copy
from typing import Any, Iterable

__all__ = ["deep_merge"]


def deep_merge(base: dict, override: dict, *, atomic: Iterable[str] = ()) -> dict:
    """``base`` with ``override`` merged in, recursively for dicts; a key in ``atomic`` (e.g. a model's
    ``kwargs``) is replaced whole, never merged. Neither input is modified."""
    atomic = frozenset(atomic)
    out: dict[str, Any] = copy.deepcopy(base)
    for k, v in (override or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in atomic:
            out[k] = deep_merge(out[k], v, atomic=atomic)
        else:
            out[k] = copy.deepcopy(v)
    return out
