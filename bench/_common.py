"""Helpers both benchmarks share: the JSON result file (written atomically, any value printable) and numbers."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: str | None, obj: dict) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, p)


def fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"
