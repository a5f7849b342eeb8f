"""Checkpoints: every byte verified, pointers kept inside their folder, runs told apart by fingerprint,
old checkpoints pruned. Every defect is a CheckpointError that names the checkpoint folder (or root)."""

import json
import os

import pytest
import torch

from distill.checkpoint import (
    CheckpointError,
    CheckpointMismatch,
    latest_checkpoint,
    load_checkpoint,
    load_latest_checkpoint,
    retained_checkpoints,
    save_checkpoint,
    point_latest,
)
from distill.files import sha256_bytes, sha256_file

FP = {"role": "teacher", "train": {"epochs": 4, "lr": 0.1}}
STATE = {"model": {"w": torch.arange(6.0)}, "best_val_acc": 0.5, "history": [{"epoch": 1, "val_acc": 0.5}]}


def reseal(folder):
    """Recompute the manifest's checksums and the pointer after a deliberate edit, as a careless tool would:
    only the content check that follows the checksums (decoding) can then catch the edit."""
    if not (folder / "checkpoint.json").exists():  # (older formats had nothing to reseal)
        return
    m = json.loads((folder / "checkpoint.json").read_text())
    for name, entry in m["files"].items():
        data = (folder / name).read_bytes()
        entry.update(sha256=sha256_bytes(data), bytes=len(data))
    (folder / "checkpoint.json").write_text(json.dumps(m))
    (folder.parent / "LATEST").write_text(f"{folder.name} {sha256_file(folder / 'checkpoint.json')}\n")


def edit_state_json(folder, fn):
    meta = json.loads((folder / "state.json").read_text())
    fn(meta)
    (folder / "state.json").write_text(json.dumps(meta))


def test_edited_state_json_is_rejected(tmp_path):
    """A forged best_val_acc in state.json must not be accepted (it became the reported accuracy)."""
    folder = save_checkpoint(tmp_path, 1, STATE)
    edit_state_json(folder, lambda m: m["state"]["__dict__"].__setitem__("best_val_acc", 0.99))
    with pytest.raises(CheckpointError, match="checksum mismatch for state.json") as e:
        load_checkpoint(folder)
    assert str(folder) in str(e.value)
    with pytest.raises(CheckpointError):
        load_latest_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda f: (f / "state.json").write_bytes((f / "state.json").read_bytes()[:40]), "state.json"),
        (lambda f: (f / "checkpoint.json").unlink(), "checkpoint.json missing"),
        (lambda f: (f / "checkpoint.json").write_text('{"format": 2, "epo'), "checkpoint.json is not valid JSON"),
    ],
    ids=["truncated-state-json", "missing-manifest", "truncated-manifest"],
)
def test_damaged_checkpoint_is_one_error_naming_the_folder(tmp_path, corrupt, message):
    folder = save_checkpoint(tmp_path, 3, STATE)
    corrupt(folder)
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(folder)
    assert str(folder) in str(e.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["state"]["__dict__"]["model"]["__dict__"].__setitem__("w", {"__tensor__": "s.nowhere"}),
         "dangling tensor reference 's.nowhere'"),
        (lambda m: m["state"]["__dict__"].__setitem__("history", {"__bogus__": 1}), "malformed checkpoint node"),
        (lambda m: m.__setitem__("format", 99), "format"),
    ],
    ids=["dangling-tensor-ref", "malformed-node", "bad-format"],
)
def test_consistently_resealed_but_invalid_state_is_refused(tmp_path, edit, message):
    folder = save_checkpoint(tmp_path, 2, STATE)
    edit_state_json(folder, edit)
    reseal(folder)
    with pytest.raises(CheckpointError, match=message) as e:
        load_latest_checkpoint(tmp_path)
    assert str(folder) in str(e.value)


def test_manifest_bad_format_version_is_refused(tmp_path):
    folder = save_checkpoint(tmp_path, 2, STATE)
    if not (folder / "checkpoint.json").exists():  # (older formats had nothing to reseal)
        return
    m = json.loads((folder / "checkpoint.json").read_text())
    m["format"] = 1
    (folder / "checkpoint.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="format 1, expected 2") as e:
        load_checkpoint(folder)
    assert str(folder) in str(e.value)


def test_whole_checkpoint_is_covered_by_manifest_and_pointer(tmp_path):
    folder = save_checkpoint(tmp_path, 1, STATE)
    manifest = json.loads((folder / "checkpoint.json").read_text())
    assert set(manifest["files"]) == {"state.json", "state.safetensors"}
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
    assert (tmp_path / "LATEST").read_text() == f"epoch-0001 {sha256_file(folder / 'checkpoint.json')}\n"
    # an edited manifest (here: claiming another epoch's state) is caught by the pointer's checksum
    manifest["fingerprint"] = {"forged": True}
    (folder / "checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="checksum mismatch for checkpoint.json") as e:
        latest_checkpoint(tmp_path)
    assert str(folder) in str(e.value)


def test_pointer_cannot_leave_the_checkpoint_root(tmp_path):
    other = save_checkpoint(tmp_path / "other-run" / "checkpoints", 7, STATE)
    root = tmp_path / "run" / "checkpoints"
    save_checkpoint(root, 1, STATE)
    sha = sha256_file(other / "checkpoint.json")
    bad_pointers = [
        f"../../other-run/checkpoints/epoch-0007 {sha}\n",  # a relative path out of the root
        f"{other} {sha}\n",  # an absolute path
        "epoch-0007\n",  # no checksum
    ]
    for text in bad_pointers:
        (root / "LATEST").write_text(text)
        with pytest.raises(CheckpointError) as e:
            load_latest_checkpoint(root)
        assert str(root) in str(e.value), text
    # a symbolic link inside the root that leads to the other run's checkpoint
    os.symlink(other, root / "epoch-0007")
    (root / "LATEST").write_text(f"epoch-0007 {sha}\n")
    with pytest.raises(CheckpointError, match="not a folder in it") as e:
        latest_checkpoint(root)
    assert str(root) in str(e.value)


def test_fingerprint_is_recorded_and_enforced(tmp_path):
    folder = save_checkpoint(tmp_path, 2, STATE, fingerprint=FP)
    epoch, state = load_checkpoint(folder, fingerprint=FP)
    assert epoch == 2 and state["best_val_acc"] == 0.5
    other = {"role": "student", "train": {"epochs": 2, "lr": 0.1}}
    with pytest.raises(CheckpointMismatch) as e:
        load_latest_checkpoint(tmp_path, fingerprint=other)
    msg = str(e.value)
    assert str(folder) in msg and "role" in msg and "train.epochs (4 -> 2)" in msg
    assert "--no-resume" in msg and "resume=False" in msg and "train.lr" not in msg


def test_retention_keeps_last_n_and_pinned_best(tmp_path):
    for e in range(1, 6):
        save_checkpoint(tmp_path, e, {"e": torch.tensor(e)}, keep_last=2, keep_epochs=[2])
    assert retained_checkpoints(tmp_path) == ["epoch-0002", "epoch-0004", "epoch-0005"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "epoch-0002", "epoch-0004", "epoch-0005"]
    assert load_latest_checkpoint(tmp_path)[1] == 5


def test_restored_folder_can_be_pointed_at_again(tmp_path):
    """A pipeline that restores a checkpoint folder from its store re-creates a valid pointer (also stages.point_latest)."""
    folder = save_checkpoint(tmp_path, 3, STATE)
    expected = (tmp_path / "LATEST").read_text()
    (tmp_path / "LATEST").unlink()
    assert point_latest(tmp_path, "epoch-0003") == sha256_file(folder / "checkpoint.json")
    assert (tmp_path / "LATEST").read_text() == expected
    with pytest.raises(CheckpointError):
        point_latest(tmp_path, "../epoch-0003")
    from distill.image import stages

    assert stages.point_latest is point_latest


def test_weights_file_bytes_do_not_depend_on_the_process(tmp_path):
    """Students' stage keys hash their teacher's weights file: the same weights must give the same bytes in
    every process (safetensors writes its metadata map in a per-process hash order)."""
    import subprocess
    import sys

    code = (
        "import sys, torch; from distill.checkpoint import save_tensors_atomic; "
        "save_tensors_atomic(sys.argv[1], {'w': torch.arange(6.0).view(2, 3), 'b': torch.ones(2)}, "
        "metadata={'role': 'teacher', 'model': 'resnet_small', 'extra': 'x'})"
    )
    outs = []
    for i in range(6):
        path = tmp_path / f"w{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(path)], check=True)
        outs.append(path.read_bytes())
    assert len(set(outs)) == 1
