"""Tracker.log_model_folder: a Hugging Face model folder registered in a local (sqlite) MLflow, loaded back by
plain MLflow + transformers, offline and without pickles."""

from __future__ import annotations

import filecmp
import socket
import uuid
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM  # noqa: E402

from tasks.tracking import Tracker, TrackingError, default_tracking_uri  # noqa: E402

TOK_DIR = Path("/work/shared/data/gpt2-tokenizer")
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"}
TEXT = "The quick brown fox jumps over the lazy dog."

pytestmark = pytest.mark.skipif(not TOK_DIR.is_dir(), reason=f"no GPT-2 tokenizer at {TOK_DIR}")


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the network (a DNS lookup or an IP connection) fails the test."""
    attempts: list[str] = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(f"connect {address}")
            raise OSError(f"network disabled in this test: {address}")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in ("localhost", "127.0.0.1", "::1", None):
            attempts.append(f"getaddrinfo {host}")
            raise socket.gaierror(f"network disabled in this test: {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts
    assert not attempts, attempts


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A tiny random LlamaForCausalLM (hidden 32, 2 layers, GPT-2 vocabulary) saved with its tokenizer."""
    folder = tmp_path_factory.mktemp("hf") / "student"
    tok = GPT2TokenizerFast.from_pretrained(str(TOK_DIR))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny student\n")
    return folder


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.fixture
def tracker(tmp_path):
    return Tracker(default_tracking_uri(tmp_path / "mlflow"), f"lm-{uuid.uuid4().hex[:8]}")


@pytest.mark.parametrize("flavor", ["transformers", "files"])
def test_log_model_folder_registers_a_loadable_version_once(flavor, hf_folder, tracker, tmp_path, offline,
                                                            monkeypatch):
    name = f"lm-student-{flavor}"
    run = tracker.start_parent("student", {}, {})
    lineage = {"val_ppl": 41.2, "teacher_version": "3", "git_commit": "deadbeef"}

    info = tracker.log_model_folder(run, hf_folder, name, lineage, flavor=flavor)
    assert set(info) == {"name", "version", "model_uri", "run_id", "reused", "logged_model_uri"}
    assert (info["name"], info["version"], info["model_uri"], info["run_id"], info["reused"]) == (
        name, "1", f"models:/{name}/1", run, False)
    tags = tracker.client.get_model_version(name, "1").tags
    assert {k: tags[k] for k in lineage} == {k: str(v) for k, v in lineage.items()}

    # the same run again: no new version (nor LoggedModel); the version keeps its tags (its lineage is the run
    # that made it) and gains the ones it lacked
    again = tracker.log_model_folder(run, hf_folder, name, {**lineage, "val_ppl": 40.9, "prefect_flow_run_id": "f2"},
                                     flavor=flavor)
    assert again["reused"] is True and again["version"] == "1" and "logged_model_uri" not in again
    assert [str(v.version) for v in tracker.client.search_model_versions(f"name = '{name}'")] == ["1"]
    tags = tracker.client.get_model_version(name, "1").tags
    assert tags["val_ppl"] == "41.2" and tags["prefect_flow_run_id"] == "f2"
    logged = tracker.client.search_logged_models(experiment_ids=[tracker.experiment_id])
    assert [(m.model_id, m.source_run_id, str(m.status)) for m in logged] == [
        (info["logged_model_uri"].split("/")[-1], run, "READY")]

    # a user loads the registered version with plain MLflow + transformers (no Tracker)
    original = AutoModelForCausalLM.from_pretrained(hf_folder)
    original_tok = AutoTokenizer.from_pretrained(hf_folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path / "download")))
    files = [p for p in local.rglob("*") if p.is_file()]
    assert (local / "model" / "model.safetensors").is_file() and (local / "MLmodel").is_file()
    assert not [p for p in files if p.suffix in PICKLE_SUFFIXES], files  # never a pickle
    model = AutoModelForCausalLM.from_pretrained(local / "model")
    tok_dir = local / "components" / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tok_dir if tok_dir.is_dir() else local / "model")
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer(TEXT).input_ids == original_tok(TEXT).input_ids
    assert torch.equal(_logits(model, tokenizer), _logits(original, original_tok))

    if flavor == "transformers":
        assert tok_dir.is_dir()
        parts = mlflow.transformers.load_model(f"models:/{name}/1", return_type="components")
        assert torch.equal(_logits(parts["model"], parts["tokenizer"]), _logits(original, original_tok))
    else:  # the folder as is, byte for byte
        cmp = filecmp.dircmp(hf_folder, local / "model")
        assert not cmp.left_only and not cmp.right_only and not cmp.diff_files and not cmp.funny_files
        names = sorted(p.name for p in hf_folder.iterdir())
        assert filecmp.cmpfiles(hf_folder, local / "model", names, shallow=False)[0] == names

    # the LM gate (lower perplexity wins) on the registered version; the champion alias loads too
    decision = tracker.promote(name, "1", 40.9, 42.0, 0.5, metric="val_ppl", direction="min")
    assert decision["promoted"] and decision["champion_version_after"] == "1"
    champion = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion",
                                                        dst_path=str(tmp_path / "champion")))
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(champion / "model"), original_tok),
                       _logits(original, original_tok))


def test_log_model_folder_rejects_bad_input_before_logging(hf_folder, tracker, tmp_path):
    run = tracker.start_parent("student", {}, {})
    with pytest.raises(TrackingError, match="flavor"):
        tracker.log_model_folder(run, hf_folder, "lm-bad", flavor="pickle")
    with pytest.raises(TrackingError, match="does not exist"):
        tracker.log_model_folder(run, tmp_path / "missing", "lm-bad")
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    with pytest.raises(TrackingError, match="config.json"):
        tracker.log_model_folder(run, no_config, "lm-bad")
    with pytest.raises(TrackingError, match="task"):
        tracker.log_model_folder(run, hf_folder, "lm-bad", task="no-such-task")
    assert tracker.client.search_logged_models(experiment_ids=[tracker.experiment_id]) == []
