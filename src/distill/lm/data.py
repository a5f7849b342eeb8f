"""The language-model data path: text files -> a checksummed, content-addressed token cache -> packed blocks.

Sources (the format is chosen by the file suffix):

* ``.txt``: plain UTF-8 text. With ``txt_documents="paragraphs"`` (the default) a document is a paragraph: the
  text between runs of blank lines (whitespace-only lines), kept exactly as written otherwise (inner newlines
  and indentation stay; the blank lines themselves are the boundary and are replaced by EOS). With
  ``txt_documents="file"`` the whole file is one document.
* ``.tokens``: WikiText. A document starts at each top-level heading line `` = Title = `` (not `` = = Sub = = ``)
  and runs to the next one; its text is kept as is, heading and blank lines included. Whitespace-only text before
  the first heading is dropped.
* ``.jsonl``: one JSON object per line (blank lines skipped) with either a ``"text"`` string, or ``"prompt"`` and
  ``"completion"`` strings. A prompt/completion record becomes the document ``prompt + completion`` (nothing is
  inserted between them; the prompt and the completion are tokenised separately) and its prompt tokens are not
  targets. A line that is not such an object is a :class:`~distill.image.data.DataError` naming the file and line.

A leading UTF-8 byte-order mark is dropped; a file that is not UTF-8 is a DataError naming it. Empty documents
are skipped.

Tokenisation: ``tokenizer(texts, add_special_tokens=False, split_special_tokens=True)`` (any transformers
tokenizer). No special token is ever added except the one EOS (``tokenizer.eos_token_id``) placed *between*
consecutive documents; special-token strings inside the text (``"<|endoftext|>"``) are tokenised as plain text,
and a document whose tokens still contain the EOS id is refused. A tokenizer without an EOS id is refused: the pad
id is never used in its place.

Splits: ``sources={"train": [...], "val": [...], "test": [...]}`` takes the splits as given (``train``
required). A single path (or a list of paths, pooled in order) is split by DOCUMENT: a seeded permutation of the
documents (``numpy.random.default_rng([split_seed, 0])``) gives ``round(val_fraction * n)`` documents (at least
one when the fraction is > 0) to ``val``, the next ``round(test_fraction * n)`` to ``test`` and the rest to
``train``; each split keeps the original document order. A document never spans two splits.

Cache: ``cache_dir/<key16>/`` holds per split a flat token stream ``{split}_ids.npy`` (1-D uint16 when
``len(tokenizer) < 65536``, else uint32) and, only where some token is not a target, ``{split}_mask.npy`` (1-D
bool, ``mask[i]`` = "token i is a target"), both written with ``np.save(allow_pickle=False)``, plus
``manifest.json``. The key is the sha256 of (the source contents and formats, the tokenizer identity, the
parameters including ``block_size``, :data:`FORMAT_VERSION`). The folder appears atomically (a temporary folder
is renamed); a cached folder is verified file by file before it is reused, and a broken one is discarded and
rebuilt. :func:`load_blocks` verifies the split's files again (a changed file is a DataError naming it).

Packing (chosen: a flat stream, cut by the loader): documents are concatenated with one EOS between them; the
loader cuts the stream into blocks of ``block_size + 1`` tokens that overlap by one token (block ``i`` covers
stream positions ``[i*B, (i+1)*B]``), giving ``input_ids = block[:-1]`` and ``labels = block[1:]``, so that
``logits[:, t]`` predicts ``labels[:, t]`` and every stream token but the first is a target exactly once. EOS
positions are real targets. The last block is padded (inputs: EOS id, labels: -100, mask False). Blocks run across
document boundaries (no per-document attention mask). ``block_size`` is recorded in the manifest and is part of
the cache key, as is the format of the folder; the loader uses it unless told otherwise.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..errors import DataError
from ..files import atomic_write_bytes, sha256_bytes, sha256_file, sha256_json
from ..cachedir import (
    check_int, clean_stale_tmp, manifest_bytes, publish, read_manifest_json, remove_tree, verify_listed_file,
)

__all__ = [
    "FORMAT_VERSION",
    "IGNORE_INDEX",
    "KIND",
    "MANIFEST_NAME",
    "SPLITS",
    "TEXT_SUFFIXES",
    "DataError",
    "Document",
    "PreparedText",
    "iterate_blocks",
    "load_blocks",
    "load_stream",
    "prepare_text",
    "read_documents",
    "read_text_manifest",
    "source_format",
    "tokenizer_identity",
]

log = logging.getLogger("distill.lm.data")

#: Bump whenever the folder layout, the document rules, the split or the packing change: part of the cache key.
FORMAT_VERSION = 1
KIND = "distill-lm-text"
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")
TEXT_SUFFIXES = {".txt": "txt", ".tokens": "wikitext", ".jsonl": "jsonl"}
TXT_DOCUMENT_MODES = ("paragraphs", "file")
IGNORE_INDEX = -100  # labels of the padded tail (mask False there too)
_ENCODE_BATCH_DOCS = 256
_UINT16_LIMIT = 65536


@dataclass(frozen=True)
class PreparedText:
    dir: Path
    manifest: dict
    manifest_sha256: str  # sha256 of manifest.json exactly as written


@dataclass(frozen=True)
class Document:
    """One document: ``prompt + text`` is its full text; only ``text`` tokens are targets."""

    text: str
    source: str
    line: int | None = None  # 1-based line where it starts (JSONL record, WikiText heading, paragraph)
    prompt: str = ""

    @property
    def full_text(self) -> str:
        return self.prompt + self.text


# --------------------------------------------------------------------------------------------
# reading sources
# --------------------------------------------------------------------------------------------


def source_format(path: str | os.PathLike) -> str:
    """``"txt"``, ``"wikitext"`` or ``"jsonl"`` from the file suffix; else DataError."""
    suffix = Path(path).suffix.lower()
    try:
        return TEXT_SUFFIXES[suffix]
    except KeyError:
        raise DataError(f"{path}: unsupported text source suffix {suffix!r}; expected one of "
                        f"{sorted(TEXT_SUFFIXES)}") from None


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"{path} missing") from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from e


_BLANK_RUN = re.compile(r"(?:\r?\n)(?:[ \t\f\v]*\r?\n)+")


def _txt_documents(text: str, path: Path, mode: str) -> list[Document]:
    if mode == "file":
        return [Document(text, str(path), 1)] if text.strip() else []
    docs: list[Document] = []
    pos, line = 0, 1
    for m in list(_BLANK_RUN.finditer(text)) + [None]:
        end = m.start() if m is not None else len(text)
        chunk = text[pos:end]
        if chunk.strip():
            # leading blank lines of the file (pos == 0) are not part of the paragraph
            lead = re.match(r"(?:[ \t\f\v]*\r?\n)*", chunk).end() if pos == 0 else 0
            docs.append(Document(chunk[lead:], str(path), line + chunk.count("\n", 0, lead)))
        if m is None:
            break
        line += text.count("\n", pos, m.end())
        pos = m.end()
    if docs and docs[-1].text.endswith("\n"):  # a single trailing newline at the end of the file
        last = docs[-1]
        docs[-1] = Document(last.text.rstrip("\r\n"), last.source, last.line)
    return docs


def _is_wikitext_title(line: str) -> bool:
    s = line.rstrip("\r\n")
    return (len(s) > 6 and s.startswith(" = ") and s.endswith(" = ") and not s.startswith(" = = ")
            and not s.endswith(" = = "))


def _wikitext_documents(text: str, path: Path) -> list[Document]:
    docs: list[Document] = []
    current: list[str] = []
    start = 1
    for i, line in enumerate(text.splitlines(keepends=True), start=1):
        if _is_wikitext_title(line):
            body = "".join(current)
            if body.strip():
                docs.append(Document(body, str(path), start))
            current, start = [], i
        current.append(line)
    body = "".join(current)
    if body.strip():
        docs.append(Document(body, str(path), start))
    return docs


def _jsonl_documents(text: str, path: Path) -> list[Document]:
    docs: list[Document] = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        has_pc = "prompt" in rec or "completion" in rec
        if has_pc and "text" in rec:
            raise DataError(f"{where}: a record has either \"text\" or \"prompt\"/\"completion\", not both")
        if has_pc:
            prompt, completion = rec.get("prompt"), rec.get("completion")
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise DataError(f"{where}: \"prompt\" and \"completion\" must both be strings")
            if prompt or completion:
                docs.append(Document(completion, str(path), i, prompt))
        elif "text" in rec:
            if not isinstance(rec["text"], str):
                raise DataError(f"{where}: \"text\" must be a string, got {type(rec['text']).__name__}")
            if rec["text"]:
                docs.append(Document(rec["text"], str(path), i))
        else:
            raise DataError(f"{where}: a record needs a \"text\" field or \"prompt\" and \"completion\" fields")
    return docs


def read_documents(path: str | os.PathLike, *, txt_documents: str = "paragraphs") -> list[Document]:
    """The documents of one source file (see the module docstring for the rules per format)."""
    path = Path(path)
    if txt_documents not in TXT_DOCUMENT_MODES:
        raise ValueError(f"txt_documents must be one of {TXT_DOCUMENT_MODES}, got {txt_documents!r}")
    fmt = source_format(path)
    text = _read_text(path)
    if fmt == "txt":
        return _txt_documents(text, path, txt_documents)
    if fmt == "wikitext":
        return _wikitext_documents(text, path)
    return _jsonl_documents(text, path)


# --------------------------------------------------------------------------------------------
# the tokenizer
# --------------------------------------------------------------------------------------------


def tokenizer_identity(tokenizer: Any) -> dict:
    """What identifies a tokenizer for the cache: class, vocabulary size, EOS/pad ids, sha256 of its definition
    (``backend_tokenizer.to_str()`` for fast tokenizers, else the vocabulary and merges)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None or isinstance(eos, bool) or not isinstance(eos, (int, np.integer)):
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id (got {eos!r}); an EOS token "
                        "is needed between documents and the pad token is never used in its place")
    try:
        vocab_size = int(len(tokenizer))
    except TypeError:
        vocab_size = int(tokenizer.vocab_size)
    pad = getattr(tokenizer, "pad_token_id", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        digest, how = sha256_bytes(backend.to_str().encode("utf-8")), "backend_tokenizer.to_str"
    elif hasattr(tokenizer, "get_vocab"):
        merges = getattr(tokenizer, "bpe_ranks", None)
        blob = {
            "vocab": tokenizer.get_vocab(),
            "merges": None if merges is None else sorted([list(k), int(v)] for k, v in merges.items()),
            "special": getattr(tokenizer, "special_tokens_map", None),
        }
        digest, how = sha256_json(blob), "get_vocab"
    else:
        raise DataError(f"cannot fingerprint tokenizer {type(tokenizer).__name__}: it has neither "
                        "backend_tokenizer.to_str() nor get_vocab()")
    if not 0 <= int(eos) < vocab_size:
        raise DataError(f"tokenizer eos_token_id {eos} lies outside its vocabulary of {vocab_size}")
    return {
        "class": type(tokenizer).__name__,
        "vocab_size": vocab_size,
        "eos_id": int(eos),
        "pad_id": None if pad is None else int(pad),
        "sha256": digest,
        "fingerprint": how,
    }


def _encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text: no special tokens added, special-token strings in the text kept as text."""
    if not texts:
        return []
    out = tokenizer(texts, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False,
                    return_token_type_ids=False, verbose=False)
    return [list(ids) for ids in out["input_ids"]]


# --------------------------------------------------------------------------------------------
# manifest and verification
# --------------------------------------------------------------------------------------------




def read_text_manifest(dir: str | os.PathLike) -> dict:
    path = Path(dir) / MANIFEST_NAME
    manifest = read_manifest_json(dir, what="prepared text folder", label="text-data", error=DataError)
    if manifest.get("kind") != KIND or not isinstance(manifest.get("splits"), dict):
        raise DataError(f"{path} is not a distill text-data manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} has format_version {manifest.get('format_version')}, expected {FORMAT_VERSION}: "
                        "prepare the data again")
    return manifest


def _split_files(manifest: dict, split: str) -> list[str]:
    info = manifest["splits"][split]
    return [info["ids_file"]] + ([info["mask_file"]] if info.get("mask_file") else [])


def _verify_file(dir: Path, manifest: dict, name: str) -> None:
    verify_listed_file(dir, manifest, name, error=DataError)


def _verify_all(dir: Path, manifest: dict) -> None:
    for split in manifest["splits"]:
        for name in _split_files(manifest, split):
            _verify_file(dir, manifest, name)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError as e:
        raise DataError(f"{path} missing") from e
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"cannot load {path}: {e}") from e


def load_stream(dir: str | os.PathLike, split: str, *, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The flat token stream of ``split``: (ids uint16/uint32 [L], is-target mask bool [L]), checksums verified."""
    dir = Path(dir)
    manifest = read_text_manifest(dir)
    if split not in manifest["splits"]:
        raise DataError(f"{dir} has no split {split!r} (it has {sorted(manifest['splits'])})")
    info = manifest["splits"][split]
    if verify:
        for name in _split_files(manifest, split):
            _verify_file(dir, manifest, name)
    ids_path = dir / info["ids_file"]
    ids = _load_npy(ids_path)
    n = info["tokens"]
    if ids.dtype != np.dtype(manifest["dtype"]) or ids.ndim != 1 or len(ids) != n:
        raise DataError(f"{ids_path} holds {ids.dtype} {list(ids.shape)}, expected {manifest['dtype']} [{n}]")
    if info.get("mask_file"):
        mask_path = dir / info["mask_file"]
        mask = _load_npy(mask_path)
        if mask.dtype != np.bool_ or mask.shape != ids.shape:
            raise DataError(f"{mask_path} holds {mask.dtype} {list(mask.shape)}, expected bool [{n}]")
    else:
        mask = np.ones(len(ids), dtype=np.bool_)
    vocab = manifest["tokenizer"]["vocab_size"]
    if len(ids) and int(ids.max()) >= vocab:
        raise DataError(f"{ids_path} holds token id {int(ids.max())} outside the vocabulary of {vocab}")
    return ids, mask


def load_blocks(
    dir: str | os.PathLike, split: str, *, block_size: int | None = None, verify: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (input_ids int64 [N, B], labels int64 [N, B], mask bool [N, B]), aligned: ``logits[:, t]`` predicts
    ``labels[:, t]``; ``labels[:, t] == input_ids[:, t + 1]`` inside a block. ``mask`` is False at prompt tokens and
    in the padded tail (labels -100, inputs EOS there). ``B`` is the manifest's block_size unless given."""
    dir = Path(dir)
    manifest = read_text_manifest(dir)
    bs = manifest["block_size"] if block_size is None else block_size
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {bs!r}")
    ids, is_target = load_stream(dir, split, verify=verify)
    n_tok = len(ids)
    n_blocks = 0 if n_tok < 2 else math.ceil((n_tok - 1) / bs)
    total = n_blocks * bs + 1
    stream = np.full(total, manifest["tokenizer"]["eos_id"], dtype=np.int64)
    labels = np.full(total, IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros(total, dtype=np.bool_)
    k = min(n_tok, total)
    stream[:k] = ids[:k]
    labels[:k] = ids[:k]
    mask[:k] = is_target[:k]
    x = torch.from_numpy(stream[:-1].reshape(n_blocks, bs).copy())
    y = torch.from_numpy(labels[1:].reshape(n_blocks, bs).copy())
    m = torch.from_numpy(mask[1:].reshape(n_blocks, bs).copy())
    return x, y, m


def iterate_blocks(
    ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, batch_size: int, *, shuffle: bool,
    generator: torch.Generator | None = None, drop_last: bool = False, start_batch: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (ids, labels, mask) mini-batches of blocks. With ``shuffle`` one ``torch.randperm(N, generator)`` per
    call: the same generator state gives the same order (a generator is required, so an epoch can be replayed
    exactly: seed it from (seed, epoch)). ``start_batch`` skips that many batches of the pass (resume mid-epoch)."""
    n = len(ids)
    if len(labels) != n or len(mask) != n:
        raise ValueError(f"ids, labels and mask hold {n}, {len(labels)} and {len(mask)} blocks")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(start_batch, bool) or not isinstance(start_batch, int) or start_batch < 0:
        raise ValueError(f"start_batch must be an integer >= 0, got {start_batch!r}")
    end = n - n % batch_size if drop_last else n
    if shuffle:
        if generator is None:
            raise ValueError("shuffle=True needs a torch.Generator (for a reproducible, resumable order)")
        perm = torch.randperm(n, generator=generator, device=generator.device).to(ids.device)
        for i in range(start_batch * batch_size, end, batch_size):
            sel = perm[i:i + batch_size]
            yield ids[sel], labels[sel.to(labels.device)], mask[sel.to(mask.device)]
    else:
        for i in range(start_batch * batch_size, end, batch_size):
            yield ids[i:i + batch_size], labels[i:i + batch_size], mask[i:i + batch_size]


# --------------------------------------------------------------------------------------------
# prepare_text
# --------------------------------------------------------------------------------------------




def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise DataError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _normalise_sources(sources) -> tuple[str, dict[str, list[Path]]]:
    """-> ("given", {split: files}) or ("held_out", {"pool": files})."""
    def paths(v, where: str) -> list[Path]:
        if isinstance(v, (str, os.PathLike)):
            v = [v]
        if not isinstance(v, Sequence) or not v or not all(isinstance(p, (str, os.PathLike)) for p in v):
            raise DataError(f"{where} must be a path or a non-empty list of paths, got {v!r}")
        return [Path(p) for p in v]

    if isinstance(sources, Mapping):
        unknown = [k for k in sources if k not in SPLITS]
        if unknown:
            raise DataError(f"unknown split {unknown[0]!r} in sources; expected some of {SPLITS}")
        if "train" not in sources:
            raise DataError("sources must name a \"train\" split")
        return "given", {s: paths(sources[s], f"sources[{s!r}]") for s in SPLITS if s in sources}
    return "held_out", {"pool": paths(sources, "sources")}


def _split_documents(docs: list[Document], val_fraction: float, test_fraction: float, split_seed: int,
                     where: str) -> dict[str, list[Document]]:
    n = len(docs)
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    n_test = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise DataError(f"{where} holds {n} documents: too few for a split by document with val_fraction="
                        f"{val_fraction} and test_fraction={test_fraction} (train needs at least one)")
    perm = np.random.default_rng([split_seed, 0]).permutation(n)
    val_idx = np.sort(perm[:n_val])
    test_idx = np.sort(perm[n_val:n_val + n_test])
    train_idx = np.sort(perm[n_val + n_test:])
    out = {"train": [docs[i] for i in train_idx]}
    if n_val:
        out["val"] = [docs[i] for i in val_idx]
    if n_test:
        out["test"] = [docs[i] for i in test_idx]
    return out


def _tokenize_split(docs: list[Document], tokenizer: Any, ident: dict, max_tokens: int | None,
                    ) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """-> (ids int64 [L], is-target bool [L], documents used, truncated)."""
    eos, vocab = ident["eos_id"], ident["vocab_size"]
    pieces: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    total, used, truncated = 0, 0, False
    for b in range(0, len(docs), _ENCODE_BATCH_DOCS):
        batch = docs[b:b + _ENCODE_BATCH_DOCS]
        texts = [d.text for d in batch]
        has_prompt = [i for i, d in enumerate(batch) if d.prompt]
        enc_text = _encode_batch(tokenizer, texts)
        enc_prompt = dict(zip(has_prompt, _encode_batch(tokenizer, [batch[i].prompt for i in has_prompt])))
        for i, doc in enumerate(batch):
            p = np.asarray(enc_prompt.get(i, []), dtype=np.int64)
            t = np.asarray(enc_text[i], dtype=np.int64)
            toks = np.concatenate([p, t])
            where = doc.source if doc.line is None else f"{doc.source}:{doc.line}"
            if len(toks) and (toks.min() < 0 or toks.max() >= vocab):
                raise DataError(f"{where}: the tokenizer produced id {int(toks.max())} outside its vocabulary "
                                f"of {vocab}")
            if (toks == eos).any():
                raise DataError(f"{where}: the document's tokens contain the EOS id {eos}; EOS may only separate "
                                "documents")
            if not len(toks):
                continue
            m = np.concatenate([np.zeros(len(p), np.bool_), np.ones(len(t), np.bool_)])
            if pieces:  # one EOS between documents; it is a real target
                pieces.append(np.array([eos], np.int64))
                masks.append(np.ones(1, np.bool_))
                total += 1
            pieces.append(toks)
            masks.append(m)
            total += len(toks)
            used += 1
            if max_tokens is not None and total >= max_tokens:
                truncated = total > max_tokens or b + i + 1 < len(docs)
                break
        if max_tokens is not None and total >= max_tokens:
            break
    ids = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    mask = np.concatenate(masks) if masks else np.zeros(0, np.bool_)
    if max_tokens is not None:
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return ids, mask, used, truncated


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _try_cache_hit(final: Path, key: str) -> PreparedText | None:
    if not (final / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_text_manifest(final)
        if manifest.get("cache_key") != key:
            raise DataError(f"{final / MANIFEST_NAME}: cache_key {manifest.get('cache_key')!r}, expected {key!r}")
        _verify_all(final, manifest)
    except DataError as e:
        log.warning("ignoring broken text cache %s: %s", final, e)
        return None
    data = (final / MANIFEST_NAME).read_bytes()
    return PreparedText(final, json.loads(data), sha256_bytes(data))










def _check_prepare_args(sources, block_size, val_fraction, test_fraction, split_seed, max_tokens,
                        txt_documents) -> tuple[str, dict[str, list[Path]], float, float]:
    """-> (split mode, files per split or pool, val_fraction, test_fraction), the fractions checked when used."""
    check_int("block_size", block_size, minimum=1, error=DataError)
    check_int("split_seed", split_seed, minimum=0, error=DataError)
    check_int("max_tokens", max_tokens, minimum=2, allow_none=True, error=DataError)
    if txt_documents not in TXT_DOCUMENT_MODES:
        raise DataError(f"txt_documents must be one of {TXT_DOCUMENT_MODES}, got {txt_documents!r}")
    mode, files = _normalise_sources(sources)
    if mode == "held_out":
        val_fraction = _check_fraction("val_fraction", val_fraction)
        test_fraction = _check_fraction("test_fraction", test_fraction)
        if val_fraction + test_fraction >= 1:
            raise DataError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
    return mode, files, val_fraction, test_fraction


def _source_records(files: dict[str, list[Path]]) -> list[dict]:
    """One record per source file: its split (or "pool"), path, format, sha256 and size."""
    records = []
    for group, paths in files.items():
        for p in paths:
            fmt = source_format(p)
            try:
                digest, size = sha256_file(p), p.stat().st_size
            except FileNotFoundError as e:
                raise DataError(f"{p} missing") from e
            except OSError as e:
                raise DataError(f"cannot read {p}: {e}") from e
            records.append({"split": group, "path": str(p), "format": fmt, "sha256": digest, "bytes": size})
    return records


def _cache_key(ident: dict, params: dict, src_records: list[dict]) -> str:
    return sha256_json({
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "tokenizer": {k: ident[k] for k in ("class", "vocab_size", "eos_id", "sha256")},
        "params": params,
        "sources": [[r["split"], r["format"], r["sha256"]] for r in src_records],
    })


def _documents_by_split(files: dict[str, list[Path]], mode: str, txt_documents: str, val_fraction: float,
                        test_fraction: float, split_seed: int) -> dict[str, list[Document]]:
    docs_by_group: dict[str, list[Document]] = {}
    for group, paths in files.items():
        docs_by_group[group] = [d for p in paths for d in read_documents(p, txt_documents=txt_documents)]
    if mode == "held_out":
        where = ", ".join(str(p) for p in files["pool"])
        docs_by_group = _split_documents(docs_by_group["pool"], val_fraction, test_fraction, split_seed, where)
    return docs_by_group


def _tokenize_splits(docs_by_split: dict[str, list[Document]], files: dict[str, list[Path]], tokenizer: Any,
                     ident: dict, max_tokens: int | None, dtype: str, block_size: int,
                     ) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """-> (the manifest's per-split info, the arrays to write by file name)."""
    splits_info, arrays = {}, {}
    for split, docs in docs_by_split.items():
        where = ", ".join(sorted({d.source for d in docs})) or str(files.get(split, "?"))
        ids, mask, used, truncated = _tokenize_split(docs, tokenizer, ident, max_tokens)
        if len(ids) < 2:
            raise DataError(f"split {split!r} ({where}) yields {len(ids)} tokens; at least 2 are needed")
        ids_file = f"{split}_ids.npy"
        mask_file = f"{split}_mask.npy" if not mask.all() else None
        arrays[ids_file] = ids.astype(dtype)
        if mask_file:
            arrays[mask_file] = mask
        splits_info[split] = {
            "documents": len(docs),
            "documents_used": used,
            "tokens": int(len(ids)),
            "targets": int(mask[1:].sum()),
            "eos": int((ids == ident["eos_id"]).sum()),
            "blocks": math.ceil((len(ids) - 1) / block_size),
            "truncated": bool(truncated),
            "ids_file": ids_file,
            "mask_file": mask_file,
        }
    return splits_info, arrays


def _publish_cache(cache_dir: Path, final: Path, key: str, arrays: dict[str, np.ndarray],
                   manifest_head: dict, splits_info: dict) -> PreparedText:
    """Write the arrays and the manifest (``manifest_head``, then ``splits`` and ``files``) to a temporary folder
    and rename it to ``final``; when another process published it first, return theirs."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=cache_dir))
    try:
        file_entries = {}
        for name, arr in arrays.items():
            data = _npy_bytes(arr)
            atomic_write_bytes(tmp / name, data)
            file_entries[name] = {"sha256": sha256_bytes(data), "bytes": len(data)}
        manifest = {**manifest_head, "splits": splits_info, "files": file_entries}
        mbytes = manifest_bytes(manifest)
        atomic_write_bytes(tmp / MANIFEST_NAME, mbytes)
        theirs = publish(tmp, final, lambda: _try_cache_hit(final, key))
    except BaseException:
        remove_tree(tmp)
        raise
    if theirs is not None:
        return theirs
    log.info("prepared text %s -> %s", [r["path"] for r in manifest_head["sources"]], final)
    return PreparedText(final, json.loads(mbytes), sha256_bytes(mbytes))


def prepare_text(
    sources: Mapping[str, Sequence[str | os.PathLike] | str | os.PathLike] | Sequence[str | os.PathLike]
    | str | os.PathLike,
    tokenizer: Any,
    cache_dir: str | os.PathLike,
    *,
    block_size: int,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    split_seed: int = 0,
    max_tokens: int | None = None,
    txt_documents: str = "paragraphs",
) -> PreparedText:
    """Tokenise ``sources`` once into ``cache_dir/<key16>/`` (or reuse a verified folder) and return it.

    ``sources``: ``{"train": files, "val": files, "test": files}`` (splits as given, ``train`` required; the
    fractions are then unused), or one path / a list of paths split by document with ``val_fraction`` and
    ``test_fraction`` (seeded by ``split_seed``). ``max_tokens`` caps each split's stream (whole documents are
    tokenised until the cap is reached, then the stream is cut to exactly ``max_tokens``). Raises DataError on
    bad input, naming the file (and line)."""
    mode, files, val_fraction, test_fraction = _check_prepare_args(
        sources, block_size, val_fraction, test_fraction, split_seed, max_tokens, txt_documents)
    ident = tokenizer_identity(tokenizer)
    dtype = "uint16" if ident["vocab_size"] < _UINT16_LIMIT else "uint32"
    src_records = _source_records(files)
    params = {
        "block_size": int(block_size),
        "split_mode": mode,
        "val_fraction": val_fraction if mode == "held_out" else None,
        "test_fraction": test_fraction if mode == "held_out" else None,
        "split_seed": int(split_seed) if mode == "held_out" else None,
        "max_tokens": None if max_tokens is None else int(max_tokens),
        "txt_documents": txt_documents,
    }
    key = _cache_key(ident, params, src_records)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / key[:16]

    hit = _try_cache_hit(final, key)
    if hit is not None:
        log.info("text cache hit: %s", final)
        return hit

    clean_stale_tmp(cache_dir, key[:16])
    docs_by_split = _documents_by_split(files, mode, txt_documents, val_fraction, test_fraction, split_seed)
    splits_info, arrays = _tokenize_splits(docs_by_split, files, tokenizer, ident, max_tokens, dtype, block_size)
    manifest_head = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "cache_key": key,
        "tokenizer": ident,
        "params": params,
        "block_size": int(block_size),
        "dtype": dtype,
        "packing": "flat stream, one EOS between documents; load_blocks cuts block_size+1 windows",
        "sources": src_records,
    }
    return _publish_cache(cache_dir, final, key, arrays, manifest_head, splits_info)
