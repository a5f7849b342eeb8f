"""Claiming a training stage's output folder, for every kind.

A stage folder holds the stage's output files, a config file recording the run's fingerprint (``fingerprint``
and ``fingerprint_sha256``), ``eval_*.json`` written about its model, and ``checkpoints/`` stamped with the same
fingerprint (:mod:`distill.checkpoint`). Before any compute a stage calls :func:`claim_out_dir`: with
``resume=True`` a folder holding another run's outputs or checkpoints is refused (so it is never silently
resumed or overwritten); with ``resume=False`` its old outputs and checkpoints are deleted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .checkpoint import CheckpointError, CheckpointMismatch, check_fingerprint, clear_checkpoints, fingerprint_diff
from .files import sha256_json

__all__ = ["claim_out_dir"]


def claim_out_dir(
    out_dir: str | Path,
    fingerprint: dict,
    resume: bool,
    *,
    outputs: Sequence[str],
    config_name: str,
    fresh_hint: str = "resume=False",
    foreign_markers: Sequence[str] = (),
    checkpoints: str = "checkpoints",
    extra_globs: Sequence[str] = ("eval_*.json",),
) -> None:
    """Refuse an ``out_dir`` holding another run's outputs or checkpoints (``resume=True``), or wipe them
    (``resume=False``).

    - ``outputs``: the stage's output file names (deleted with ``resume=False``, as are ``extra_globs`` matches
      and the ``checkpoints`` folder's checkpoints);
    - ``config_name``: the output file recording ``fingerprint`` / ``fingerprint_sha256``; if it records another
      fingerprint (or cannot be read) the folder is refused, naming what differs;
    - ``foreign_markers``: files that, present without ``config_name`` and without a checkpoints folder, mean
      the folder holds a model that is not a stage's output (refused);
    - ``fresh_hint``: how the user starts fresh, quoted in the messages ("--no-resume (resume=False)").

    Then the checkpoints must carry ``fingerprint`` (:func:`distill.checkpoint.check_fingerprint`).
    Raises :class:`~distill.checkpoint.CheckpointMismatch` or :class:`~distill.checkpoint.CheckpointError`.
    """
    out_dir = Path(out_dir)
    ckpts = out_dir / checkpoints
    if not resume:
        clear_checkpoints(ckpts)
        for name in outputs:
            (out_dir / name).unlink(missing_ok=True)
        for pattern in extra_globs:
            for p in out_dir.glob(pattern):
                p.unlink(missing_ok=True)
        return
    config = out_dir / config_name
    how = f"Start fresh with {fresh_hint}, which deletes its old outputs and checkpoints, or delete {out_dir}."
    if config.exists():
        try:
            old = json.loads(config.read_bytes())
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{config} cannot be read ({e}), so {out_dir} cannot be resumed. {how}") from e
        if not isinstance(old, dict) or old.get("fingerprint_sha256") != sha256_json(fingerprint):
            recorded = old.get("fingerprint") if isinstance(old, dict) else None
            why = ("it differs in " + ", ".join(fingerprint_diff(recorded, fingerprint))) if isinstance(recorded, dict) \
                else "it records no run fingerprint"
            old_role = old.get("role") if isinstance(old, dict) else None
            new_role = fingerprint.get("role")
            roles = f"role {old_role!r}, now {new_role!r}; " if old_role != new_role else ""
            raise CheckpointMismatch(f"{out_dir} holds the output of another run configuration ({config}: {roles}{why}). {how}")
    elif not ckpts.exists():
        for marker in foreign_markers:
            if (out_dir / marker).exists():
                raise CheckpointMismatch(
                    f"{out_dir} holds a model that is not the output of this stage ({marker} but no {config_name}). {how}"
                )
    check_fingerprint(ckpts, fingerprint)
