"""distill.lm.data: text sources -> checksummed token cache -> aligned blocks. Small real excerpts, offline."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.image.data import DataError
from distill.lm import data as lmdata
from distill.lm.data import (
    IGNORE_INDEX,
    iterate_blocks,
    load_blocks,
    load_stream,
    prepare_text,
    read_documents,
    read_text_manifest,
)

TEXT = Path("/work/shared/data/text")
GPT2_DIR = Path("/work/shared/data/gpt2-tokenizer")
GPT2_EOS = 50256


@pytest.fixture(scope="module")
def gpt2():
    if not GPT2_DIR.is_dir():
        pytest.skip("offline GPT-2 tokenizer not available")
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(str(GPT2_DIR))


class CharTokenizer:
    """A fake tokenizer: one id per character, ``offset + ord(c)``; optional big vocabulary."""

    def __init__(self, vocab_size=70000, offset=66000, eos=69999, pad=1, tag="a"):
        self.n, self.offset, self.eos_token_id, self.pad_token_id, self.tag = vocab_size, offset, eos, pad, tag

    def __len__(self):
        return self.n

    def __call__(self, texts, add_special_tokens=True, **kwargs):
        assert add_special_tokens is False
        return {"input_ids": [[self.offset + ord(c) for c in t] for t in texts]}

    def decode(self, ids):
        return "".join(chr(int(i) - self.offset) for i in ids)

    def get_vocab(self):
        return {"tag": self.tag, **{chr(i): self.offset + i for i in range(128)}}


def _excerpt_tinyshakespeare(tmp_path, n_chars=3000) -> Path:
    text = (TEXT / "tinyshakespeare.txt").read_text(encoding="utf-8")
    cut = text.index("\n\n", n_chars)  # end at a paragraph boundary
    p = tmp_path / "shakespeare.txt"
    p.write_text(text[:cut] + "\n", encoding="utf-8")
    return p


def _excerpt_wikitext(tmp_path, n_articles=3, lines_each=6) -> Path:
    lines = (TEXT / "wikitext-2-valid.tokens").read_text(encoding="utf-8-sig").splitlines(keepends=True)
    titles = [i for i, s in enumerate(lines) if lmdata._is_wikitext_title(s)][:n_articles]
    out = []
    for i in titles:
        out += lines[i:i + lines_each]
        # keep one sub-heading of the article: it must not start a new document
        sub = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(" = = "))
        out += lines[sub:sub + 3]
    p = tmp_path / "wiki.tokens"
    p.write_text("".join(out), encoding="utf-8")
    return p


def _segments(ids: np.ndarray, eos: int) -> list[np.ndarray]:
    parts = np.split(ids, np.flatnonzero(ids == eos))
    return parts[:1] + [p[1:] for p in parts[1:]]  # drop the EOS that starts each later part


def _check_round_trip(prep, split, docs, decode, eos):
    ids, mask = load_stream(prep.dir, split)
    assert int((ids == eos).sum()) == len(docs) - 1  # one EOS between documents, none inside one
    segs = _segments(ids.astype(np.int64), eos)
    assert [decode(s) for s in segs] == [d.full_text for d in docs]
    assert mask.all()


def test_round_trip_tinyshakespeare_excerpt(tmp_path, gpt2):
    src = _excerpt_tinyshakespeare(tmp_path)
    docs = read_documents(src)
    assert len(docs) > 5 and docs[0].text.startswith("First Citizen:\nBefore we proceed")
    prep = prepare_text({"train": [src]}, gpt2, tmp_path / "cache", block_size=16)
    assert prep.manifest["dtype"] == "uint16" and load_stream(prep.dir, "train")[0].dtype == np.uint16
    assert prep.manifest["tokenizer"]["eos_id"] == GPT2_EOS and prep.manifest["tokenizer"]["vocab_size"] == 50257
    _check_round_trip(prep, "train", docs, lambda s: gpt2.decode(s, clean_up_tokenization_spaces=False), GPT2_EOS)


def test_round_trip_wikitext_excerpt_documents_at_top_level_headings(tmp_path, gpt2):
    src = _excerpt_wikitext(tmp_path)
    docs = read_documents(src)
    assert len(docs) == 3
    assert all(d.text.startswith(" = ") and not d.text.startswith(" = = ") for d in docs)
    assert all(" = = " in d.text for d in docs)  # sub-headings stay inside their article
    assert "".join(d.text for d in docs) == src.read_text(encoding="utf-8")  # text kept as is
    prep = prepare_text({"train": [src], "val": [src]}, gpt2, tmp_path / "cache", block_size=32)
    _check_round_trip(prep, "val", docs, lambda s: gpt2.decode(s, clean_up_tokenization_spaces=False), GPT2_EOS)


def test_special_token_text_is_not_eos_and_pad_never_replaces_eos(tmp_path, gpt2):
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"text": "before <|endoftext|> after"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    prep = prepare_text({"train": [src]}, gpt2, tmp_path / "c", block_size=4)
    ids, _ = load_stream(prep.dir, "train")
    assert int((ids == GPT2_EOS).sum()) == 1
    assert gpt2.decode(ids[: int(np.flatnonzero(ids == GPT2_EOS)[0])]) == "before <|endoftext|> after"

    txt = tmp_path / "b.txt"
    txt.write_text("one\n\ntwo\n\nthree\n")
    tok = CharTokenizer(vocab_size=4000, offset=0, eos=3999, pad=1)
    ids, _ = load_stream(prepare_text({"train": [txt]}, tok, tmp_path / "c", block_size=4).dir, "train")
    assert tok.decode(ids).split(chr(3999)) == ["one", "two", "three"] and not (ids == 1).any()
    no_eos = CharTokenizer(vocab_size=4000, offset=0, eos=None, pad=1)
    with pytest.raises(DataError, match="eos_token_id"):
        prepare_text({"train": [txt]}, no_eos, tmp_path / "c", block_size=4)


def test_uint32_when_vocabulary_exceeds_uint16(tmp_path):
    src = tmp_path / "d.txt"
    src.write_text("hello world\n\nsecond doc\n")
    tok = CharTokenizer(vocab_size=70000, offset=66000, eos=69999)
    prep = prepare_text({"train": [src]}, tok, tmp_path / "c", block_size=4)
    ids, _ = load_stream(prep.dir, "train")
    assert prep.manifest["dtype"] == "uint32" and ids.dtype == np.uint32
    assert int(ids.max()) == 69999 and tok.decode(ids).split(chr(3999)) == ["hello world", "second doc"]


def test_cache_reused_and_new_folder_for_new_text_block_size_or_tokenizer(tmp_path, gpt2, monkeypatch):
    calls = []
    real = lmdata._encode_batch
    monkeypatch.setattr(lmdata, "_encode_batch", lambda tok, texts: calls.append(len(texts)) or real(tok, texts))
    src = tmp_path / "s.txt"
    src.write_text("alpha beta\n\ngamma delta\n\nepsilon\n")
    cache = tmp_path / "cache"
    a = prepare_text(src, gpt2, cache, block_size=4, val_fraction=0.3)
    assert calls
    calls.clear()
    b = prepare_text(src, gpt2, cache, block_size=4, val_fraction=0.3)
    assert calls == [] and b.dir == a.dir and b.manifest_sha256 == a.manifest_sha256
    assert prepare_text(src, gpt2, cache, block_size=8, val_fraction=0.3).dir != a.dir
    char_a = prepare_text(src, CharTokenizer(vocab_size=4000, offset=0, eos=3999), cache, block_size=4,
                          val_fraction=0.3).dir
    char_b = prepare_text(src, CharTokenizer(vocab_size=4000, offset=0, eos=3999, tag="b"), cache, block_size=4,
                          val_fraction=0.3).dir  # same class and sizes, different vocabulary
    assert len({a.dir, char_a, char_b}) == 3
    src.write_text("alpha beta\n\ngamma delta\n\nepsilon!\n")
    c = prepare_text(src, gpt2, cache, block_size=4, val_fraction=0.3)
    assert c.dir != a.dir and a.dir.is_dir()
    m = read_text_manifest(c.dir)
    assert m["sources"][0]["sha256"] == lmdata.sha256_file(src) and m["block_size"] == 4
    assert m["tokenizer"]["class"] == type(gpt2).__name__ and len(m["tokenizer"]["sha256"]) == 64


def test_corrupted_cache_detected_on_load_and_rebuilt_by_prepare(tmp_path, gpt2, monkeypatch):
    src = _excerpt_tinyshakespeare(tmp_path, 800)
    cache = tmp_path / "cache"
    prep = prepare_text({"train": [src]}, gpt2, cache, block_size=8)
    good = load_blocks(prep.dir, "train")
    f = prep.dir / "train_ids.npy"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train_ids.npy"):
        load_blocks(prep.dir, "train")
    calls = []
    real = lmdata._encode_batch
    monkeypatch.setattr(lmdata, "_encode_batch", lambda tok, texts: calls.append(1) or real(tok, texts))
    again = prepare_text({"train": [src]}, gpt2, cache, block_size=8)
    assert calls and again.dir == prep.dir
    assert all(torch.equal(u, v) for u, v in zip(good, load_blocks(again.dir, "train")))


def test_split_by_document_is_seeded_and_disjoint(tmp_path):
    docs = [f"document number {i} says {'x' * (i % 5)}" for i in range(30)]
    src = tmp_path / "pool.txt"
    src.write_text("\n\n".join(docs) + "\n")
    tok = CharTokenizer(vocab_size=4000, offset=0, eos=3999)

    def split_docs(seed, cache):
        prep = prepare_text(src, tok, tmp_path / cache, block_size=4, val_fraction=0.2, test_fraction=0.1,
                            split_seed=seed)
        return {s: tok.decode(load_stream(prep.dir, s)[0]).split(chr(3999)) for s in ("train", "val", "test")}

    s0 = split_docs(0, "c1")
    assert [len(s0[s]) for s in ("train", "val", "test")] == [21, 6, 3]
    assert sorted(s0["train"] + s0["val"] + s0["test"]) == sorted(docs)  # whole documents, disjoint, complete
    for part in s0.values():  # original order kept inside a split
        assert part == sorted(part, key=docs.index)
    assert split_docs(0, "c2") == s0
    assert split_docs(1, "c1") != s0


def test_prompt_completion_jsonl_masks_prompt_tokens(tmp_path, gpt2):
    src = tmp_path / "pc.jsonl"
    recs = [{"text": "Plain text record."}, {"prompt": "Q: two plus two?\nA:", "completion": " four"},
            {"prompt": "Say hi:", "completion": " hi there"}]
    src.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    prep = prepare_text({"train": [src]}, gpt2, tmp_path / "c", block_size=8)
    ids, mask = load_stream(prep.dir, "train")
    assert prep.manifest["splits"]["train"]["mask_file"] == "train_mask.npy"
    enc = lambda s: gpt2(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    expect_ids, expect_mask = [], []
    for i, r in enumerate(recs):
        if i:
            expect_ids.append(GPT2_EOS)
            expect_mask.append(True)  # EOS is a real target
        p, t = enc(r.get("prompt", "")), enc(r.get("completion", r.get("text", "")))
        expect_ids += p + t
        expect_mask += [False] * len(p) + [True] * len(t)
    assert ids.tolist() == expect_ids and mask.tolist() == expect_mask
    x, y, m = load_blocks(prep.dir, "train")
    n = len(ids) - 1
    assert m.reshape(-1)[:n].tolist() == expect_mask[1:]  # mask belongs to the label position


def test_blocks_are_aligned_next_token_pairs_with_padded_tail(tmp_path, gpt2):
    src = _excerpt_tinyshakespeare(tmp_path, 600)
    prep = prepare_text({"train": [src]}, gpt2, tmp_path / "c", block_size=16)
    ids, _ = load_stream(prep.dir, "train")
    x, y, m = load_blocks(prep.dir, "train")
    L = len(ids)
    assert x.dtype == y.dtype == torch.long and m.dtype == torch.bool and x.shape == y.shape == m.shape
    assert x.shape == (-(-(L - 1) // 16), 16) and prep.manifest["splits"]["train"]["blocks"] == len(x)
    inside = y[:, :-1] != IGNORE_INDEX  # within the stream (not the padded tail)
    assert inside.sum() > 0 and torch.equal(y[:, :-1][inside], x[:, 1:][inside])  # labels[:, t] == ids[:, t + 1]
    assert torch.equal(y[:-1, -1], x[1:, 0])  # across consecutive blocks of the stream
    flat_x, flat_y, flat_m = x.reshape(-1), y.reshape(-1), m.reshape(-1)
    assert flat_x[:L].tolist() == ids.tolist()[: len(flat_x[:L])]
    assert flat_y[: L - 1].tolist() == ids[1:].tolist() and flat_m[: L - 1].all()
    assert not flat_m[L - 1:].any() and (flat_y[L - 1:] == IGNORE_INDEX).all()
    x8, _, _ = load_blocks(prep.dir, "train", block_size=8)
    assert x8.shape[1] == 8


def test_malformed_jsonl_line_names_file_and_line(tmp_path, gpt2):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "ok"}\n{"text": "broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        prepare_text({"train": [src]}, gpt2, tmp_path / "c", block_size=4)
    src.write_text('{"text": "ok"}\n\n{"prompt": "p"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3"):
        read_documents(src)
    src.write_text('["text"]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1"):
        read_documents(src)


def test_iterate_blocks_deterministic_and_resumable():
    x = torch.arange(50).reshape(10, 5)
    y, m = x + 1, torch.ones(10, 5, dtype=torch.bool)

    def run(seed, start=0):
        g = torch.Generator().manual_seed(seed)
        return [b[0][:, 0].tolist() for b in iterate_blocks(x, y, m, 3, shuffle=True, generator=g,
                                                            start_batch=start)]

    a = run(7)
    assert a == run(7) and a != run(8)
    assert sorted(sum(a, [])) == list(range(0, 50, 5)) and [len(b) for b in a] == [3, 3, 3, 1]
    assert run(7, start=2) == a[2:]
    for xb, yb, mb in iterate_blocks(x, y, m, 4, shuffle=True, generator=torch.Generator().manual_seed(1)):
        assert torch.equal(yb, xb + 1) and mb.all()
    assert [len(b[0]) for b in iterate_blocks(x, y, m, 4, shuffle=False, drop_last=True)] == [4, 4]
    with pytest.raises(ValueError, match="Generator"):
        next(iterate_blocks(x, y, m, 4, shuffle=True))
