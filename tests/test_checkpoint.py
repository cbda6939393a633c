"""DCP checkpoints + manifest: round trip, atomicity, clear shape-mismatch errors."""
import pytest
import torch

from hybrid.core import checkpoint as ckpt
from hybrid.core.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)


def _model(rows=10):
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"emb": torch.nn.Embedding(rows, 4), "lin": torch.nn.Linear(4, 2)})


def test_round_trip_and_latest(tmp_path):
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    model["lin"](model["emb"].weight).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, 10, {"model": model.state_dict(), "optim": opt.state_dict()}, {"config": {"a": 1}})
    path = save_checkpoint(tmp_path, 20, {"model": model.state_dict()}, {"config": {"a": 2}})
    assert latest_checkpoint(tmp_path) == path and path.name == "step-00000020"
    other = _model()
    torch.nn.init.zeros_(other["emb"].weight)
    manifest = load_checkpoint(path, {"model": other.state_dict()})
    assert manifest == {"config": {"a": 2}, "step": 20}
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key
    # optimizer state too
    opt2 = torch.optim.Adam(other.parameters())
    other["lin"](other["emb"].weight).sum().backward()
    opt2.step()
    state = {"model": other.state_dict(), "optim": opt2.state_dict()}
    load_checkpoint(tmp_path / "step-00000010", state)
    opt2.load_state_dict(state["optim"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_keep_last_prunes_old_checkpoints(tmp_path):
    model = _model()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"model": model.state_dict()}, {}, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003"]


def test_a_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = _model()
    good = save_checkpoint(tmp_path, 5, {"model": model.state_dict()}, {"ok": True})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.dcp, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 6, {"model": model.state_dict()}, {})
    assert latest_checkpoint(tmp_path) == good
    assert read_manifest(good) == {"ok": True, "step": 5}
    assert not (tmp_path / "step-00000006").exists()


def test_mismatched_shapes_and_incomplete_checkpoints_are_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"model": _model(10).state_dict()}, {})
    with pytest.raises(CheckpointError, match=r"'model.emb.weight': checkpoint \(10, 4\) vs model \(12, 4\)"):
        load_checkpoint(path, {"model": _model(12).state_dict()})
    extra = _model(10)
    extra["new"] = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="'model.new.weight' is not in the checkpoint"):
        load_checkpoint(path, {"model": extra.state_dict()})
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(path, {"model": _model(10).state_dict()})
    assert latest_checkpoint(tmp_path) is None
