"""``SHA256SUMS`` files next to a data source: every source file they list is checked before it is decoded."""

from __future__ import annotations

import re
from pathlib import Path

from .common import SUMS_NAME, DataError

__all__ = ["Sums", "read_sums"]

_SUMS_GNU = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
_SUMS_BSD = re.compile(r"^SHA256 \((.+)\) = ([0-9a-fA-F]{64})$")


def read_sums(folder: Path) -> dict[Path, tuple[str, Path]]:
    """{resolved path: (sha256, the SHA256SUMS file)} from ``folder/SHA256SUMS`` if present."""
    sums_file = folder / SUMS_NAME
    if not sums_file.is_file():
        return {}
    out: dict[Path, tuple[str, Path]] = {}
    try:
        text = sums_file.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"cannot read {sums_file}: {e}") from e
    for line in text.splitlines():
        line = line.rstrip("\r")
        m = _SUMS_GNU.match(line)
        if m:
            digest, rel = m.group(1), m.group(2)
        else:
            m = _SUMS_BSD.match(line)
            if not m:
                continue  # blank lines, comments; sha256sum -c also skips what it cannot parse
            rel, digest = m.group(1), m.group(2)
        out[(folder / rel).resolve()] = (digest.lower(), sums_file)
    return out


class Sums:
    """Checksums listed in SHA256SUMS files of the source folder and its parent."""

    def __init__(self, source_folder: Path):
        self.entries: list[dict[Path, tuple[str, Path]]] = []
        folder = source_folder.resolve()
        for f in (folder, folder.parent):
            entries = read_sums(f)
            if entries:
                self.entries.append(entries)

    def check(self, path: Path, digest: str) -> None:
        resolved = path.resolve()
        for entries in self.entries:
            hit = entries.get(resolved)
            if hit is not None and hit[0] != digest:
                raise DataError(
                    f"checksum mismatch for {path}: sha256 {digest} but {hit[1]} lists {hit[0]} "
                    f"(corrupt or modified file)"
                )
