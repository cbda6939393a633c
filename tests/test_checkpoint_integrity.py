"""Checkpoint integrity: the manifest records every file's size and BLAKE2b checksum; ``verify_checkpoint``
names a truncated, deleted or zeroed ``.distcp`` / ``.metadata`` / ``manifest.json``; every reader refuses such a
checkpoint in one line (``load_checkpoint``, ``hybrid finetune --init``, ``hybrid score`` / ``export`` through
``load_finetuned``); ``hybrid pretrain --resume`` on a corrupt newest checkpoint names the newest complete one and
changes nothing, and ``--resume=previous`` continues from it. Real checkpoints: ``save_checkpoint`` of real
tensors, a tiny pretraining run and a tiny fine-tuning run on real ML-100K."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from adapters_support import one_thread, single_thread  # noqa: F401 (one_thread: autouse fixture)
from cli_support import refused
from mlflow import MlflowClient

from hybrid.cli import main
from hybrid.core import checkpoint as ckpt
from hybrid.core.checkpoint import (
    INTEGRITY,
    LATEST,
    MANIFEST,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    read_manifest,
    resume_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from hybrid.core.errors import HybridInputError
from hybrid.jobs.finetune import load_finetuned

REPO = Path(__file__).resolve().parents[1]
KINDS = ["distcp", "metadata", "manifest"]
DAMAGES = ["truncate", "delete", "zero"]


# ------------------------------------------------------------------------------------------------ helpers

def _model(rows: int = 50) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"emb": torch.nn.Embedding(rows, 16), "lin": torch.nn.Linear(16, 4)})


def _target(path: Path, kind: str) -> Path:
    """The file of that kind in a checkpoint directory."""
    if kind == "manifest":
        return path / MANIFEST
    if kind == "metadata":
        return path / ".metadata"
    [shard] = sorted(path.glob("*.distcp"))[:1]
    return shard


def _damage(file: Path, how: str) -> int:
    """Truncate to half, delete, or overwrite with zeros (same size); returns the original size."""
    size = file.stat().st_size
    if how == "truncate":
        os.truncate(file, size // 2)
    elif how == "delete":
        file.unlink()
    else:
        file.write_bytes(bytes(size))
    return size


def _expected(file: Path, how: str, size: int) -> str:
    if file.name == MANIFEST:
        return "manifest.json missing" if how == "delete" else "manifest.json is not valid JSON"
    return {"truncate": f"{file.name} truncated: {size // 2} of {size} bytes", "delete": f"{file.name} missing",
            "zero": f"{file.name} checksum mismatch"}[how]


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path → bytes): what a refused run must leave as it was."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------- save_checkpoint + verify

def test_the_manifest_records_every_file_and_an_intact_checkpoint_verifies(tmp_path):
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    model["lin"](model["emb"].weight).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path, 7, {"model": model.state_dict(), "optim": opt.state_dict()}, {"config": {"a": 1}})
    raw = json.loads((path / MANIFEST).read_text())
    on_disk = sorted(p.name for p in path.iterdir() if p.name != MANIFEST)
    assert sorted(raw[INTEGRITY]["files"]) == on_disk and ".metadata" in on_disk
    assert any(n.endswith(".distcp") for n in on_disk)
    for name, record in raw[INTEGRITY]["files"].items():
        assert record["bytes"] == (path / name).stat().st_size
        assert len(record["blake2b"]) == 128  # hashlib.blake2b's 64-byte digest
    # the integrity record is not one of the facts
    assert verify_checkpoint(path) == read_manifest(path) == {"config": {"a": 1}, "step": 7}
    fresh = _model(50)
    torch.nn.init.zeros_(fresh["emb"].weight)
    state = {"model": fresh.state_dict()}
    assert load_checkpoint(path, state)["step"] == 7
    assert torch.equal(fresh["emb"].weight, model["emb"].weight)


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_file_is_named_by_verify_and_refused_by_load(tmp_path, kind, how):
    model = _model()
    path = save_checkpoint(tmp_path, 3, {"model": model.state_dict()}, {"config": {"lr": 0.1}})
    verify_checkpoint(path)  # verified once: the memo must not hide the damage below
    file = _target(path, kind)
    size = _damage(file, how)
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and _expected(file, how, size) in message, message
    assert "\n" not in message
    with pytest.raises(CheckpointError, match="checkpoint"):
        load_checkpoint(path, {"model": _model().state_dict()})
    assert isinstance(err.value, HybridInputError)


def test_an_edited_manifest_and_an_unrecorded_size_are_refused(tmp_path):
    path = save_checkpoint(tmp_path, 3, {"model": _model().state_dict()}, {"config": {"lr": 0.1}})
    raw = json.loads((path / MANIFEST).read_text())
    raw["config"]["lr"] = 0.2  # still valid JSON
    (path / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="manifest.json checksum mismatch"):
        verify_checkpoint(path)

    path = save_checkpoint(tmp_path, 4, {"model": _model().state_dict()}, {})
    shard = _target(path, "distcp")
    size = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(b"extra")
    with pytest.raises(CheckpointError, match=f"{shard.name} has {size + 5} bytes, {size} recorded"):
        verify_checkpoint(path)
    os.truncate(shard, 0)
    with pytest.raises(CheckpointError, match=f"{shard.name} truncated: 0 of {size} bytes"):
        verify_checkpoint(path)


def test_a_checkpoint_from_before_integrity_records_still_loads(tmp_path):
    """Manifests without the files map: verify checks the manifest's JSON and that .metadata is there."""
    model = _model()
    path = save_checkpoint(tmp_path, 5, {"model": model.state_dict()}, {"config": {"a": 1}})
    raw = json.loads((path / MANIFEST).read_text())
    del raw[INTEGRITY]
    (path / MANIFEST).write_text(json.dumps(raw, indent=2))
    assert verify_checkpoint(path) == {"config": {"a": 1}, "step": 5}
    fresh = _model()
    torch.nn.init.zeros_(fresh["emb"].weight)
    assert load_checkpoint(path, {"model": fresh.state_dict()})["step"] == 5
    assert torch.equal(fresh["emb"].weight, model["emb"].weight)
    (path / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete checkpoint: \.metadata missing"):
        verify_checkpoint(path)


def test_verification_is_fast(tmp_path):
    """About 64 MB of tables: hashing streams at hundreds of MB/s; a second verify costs a stat per file."""
    torch.manual_seed(0)
    state = {"model": {"emb": torch.randn(1_000_000, 16)}}
    path = save_checkpoint(tmp_path, 1, state, {})
    ckpt._VERIFIED.clear()
    started = time.perf_counter()
    verify_checkpoint(path)
    first = time.perf_counter() - started
    started = time.perf_counter()
    verify_checkpoint(path)
    again = time.perf_counter() - started
    assert first < 2.0 and again < 0.05, (first, again)


def test_resume_checkpoint_picks_the_newest_complete_one_only_when_asked(tmp_path):
    assert resume_checkpoint(tmp_path) is None  # nothing there: a fresh start
    model = _model()
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, {"model": model.state_dict()}, {})
    assert resume_checkpoint(tmp_path) == tmp_path / "step-00000030"
    _damage(_target(tmp_path / "step-00000030", "distcp"), "zero")
    with pytest.raises(CheckpointError) as err:
        resume_checkpoint(tmp_path)
    message = str(err.value)
    assert "step-00000030" in message and "checksum mismatch" in message
    assert f"the newest complete checkpoint is {tmp_path / 'step-00000020'}: pass --resume=previous" in message
    assert resume_checkpoint(tmp_path, previous=True) == tmp_path / "step-00000020"
    # LATEST naming a directory that is gone, and no LATEST at all
    shutil.rmtree(tmp_path / "step-00000030")
    with pytest.raises(CheckpointError, match=r"LATEST names 'step-00000030', which is missing; the newest complete "
                                              r"checkpoint is .*step-00000020"):
        resume_checkpoint(tmp_path)
    (tmp_path / LATEST).unlink()
    with pytest.raises(CheckpointError, match="no LATEST pointer beside step-00000020; the newest complete"):
        resume_checkpoint(tmp_path)
    assert resume_checkpoint(tmp_path, previous=True) == tmp_path / "step-00000020"
    # nothing complete left
    for step in (10, 20):
        (tmp_path / f"step-{step:08d}" / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="nothing to resume from"):
        resume_checkpoint(tmp_path, previous=True)


# ------------------------------------------------------------------------------- real runs through the CLI

def _store(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


def _pretrain_argv(data: Path, out: Path, store: str, *extra: str) -> list[str]:
    """The tiny pretraining config, one epoch (30 steps), checkpoints at steps 15 and 30."""
    return ["pretrain", "--config", str(REPO / "configs/pretrain_tiny.yaml"), "--set", f"data={data}",
            "--set", f"out={out}", "--tracking-uri", store, "--experiment", "integrity",
            "--set", "train.epochs=1", "--set", "train.checkpoint_every=15", "--set", "train.eval_every=0",
            "--set", "train.keep_last=3", *extra]


@pytest.fixture(scope="module")
def pretrained(prepared_last_item_dir, tmp_path_factory):
    """A real tiny pretraining run's ``out`` (checkpoints step-15 and step-30); tests corrupt copies of it."""
    root = tmp_path_factory.mktemp("pretrained")
    out = root / "out"
    with single_thread():
        assert main(_pretrain_argv(prepared_last_item_dir, out, _store(root))) == 0
    assert latest_checkpoint(out / "checkpoints").name == "step-00000030"
    assert (out / "checkpoints/step-00000015").is_dir()
    return out


@pytest.fixture(scope="module")
def finetuned(prepared_ratings_dir, tmp_path_factory):
    """A real tiny fine-tuning run (a few steps of DCN-v2 on ML-100K ratings): its ``best`` checkpoint."""
    root = tmp_path_factory.mktemp("finetuned")
    out = root / "out"
    with single_thread():
        assert main(["finetune", "--config", str(REPO / "configs/finetune_tiny.yaml"),
                     "--set", f"data={prepared_ratings_dir}", "--set", f"out={out}", "--set", "train.max_steps=4",
                     "--set", "train.eval_every=0", "--tracking-uri", _store(root), "--experiment", "ft"]) == 0
    best = latest_checkpoint(out / "checkpoints/best")
    assert best is not None
    return best


@pytest.mark.parametrize("damage", ["truncated shard", "deleted manifest", "dangling LATEST", "zeroed metadata"])
def test_resume_on_a_corrupt_newest_checkpoint_names_the_older_one_and_changes_nothing(
        pretrained, prepared_last_item_dir, tmp_path, capsys, damage):
    out = tmp_path / "out"
    shutil.copytree(pretrained, out)
    newest = out / "checkpoints/step-00000030"
    if damage == "truncated shard":
        file = _target(newest, "distcp")
        expected = _expected(file, "truncate", _damage(file, "truncate"))
    elif damage == "deleted manifest":
        _damage(newest / MANIFEST, "delete")
        expected = "manifest.json missing"
    elif damage == "zeroed metadata":
        file = newest / ".metadata"
        expected = _expected(file, "zero", _damage(file, "zero"))
    else:
        shutil.rmtree(newest)
        expected = "LATEST names 'step-00000030', which is missing"
    before = _tree(out)
    config_yaml = (out / "config.yaml").read_bytes()
    capsys.readouterr()

    err = refused(_pretrain_argv(prepared_last_item_dir, out, _store(tmp_path), "--resume"), capsys)
    assert expected in err, err
    assert f"the newest complete checkpoint is {out / 'checkpoints/step-00000015'}: pass --resume=previous" in err
    assert _tree(out) == before and (out / "config.yaml").read_bytes() == config_yaml
    # without --resume: refused as any out holding checkpoints is, and nothing changes either
    err = refused(_pretrain_argv(prepared_last_item_dir, out, _store(tmp_path)), capsys)
    assert "already holds" in err and "pass --resume" in err
    assert _tree(out) == before


def test_resume_previous_continues_from_the_newest_complete_checkpoint(pretrained, prepared_last_item_dir,
                                                                       tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(pretrained, out)
    _damage(_target(out / "checkpoints/step-00000030", "distcp"), "zero")
    store = _store(tmp_path)
    capsys.readouterr()
    assert main(_pretrain_argv(prepared_last_item_dir, out, store, "--resume=previous")) == 0
    assert "pretrained 30 steps (1.00 epochs)" in capsys.readouterr().out
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("integrity").experiment_id])
    assert run.data.tags["resumed_from"] == str(out / "checkpoints/step-00000015")
    # it trained steps 16..30 only (train/loss every 10 steps) and rewrote step-30, which now verifies
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [20, 30]
    assert verify_checkpoint(latest_checkpoint(out / "checkpoints"))["step"] == 30
    assert json.loads((out / "result.json").read_text())["step"] == 30
    # --resume on an intact out continues from LATEST as before (nothing left to train)
    assert main(_pretrain_argv(prepared_last_item_dir, out, store, "--resume")) == 0


@pytest.mark.parametrize("kind, how", [("distcp", "truncate"), ("metadata", "delete"), ("manifest", "zero"),
                                       ("manifest", "delete")])
def test_finetune_init_refuses_a_corrupt_pretraining_checkpoint(pretrained, prepared_ratings_dir, tmp_path,
                                                                capsys, kind, how):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(pretrained / "checkpoints", checkpoints)
    newest = checkpoints / "step-00000030"
    file = _target(newest, kind)
    expected = _expected(file, how, _damage(file, how))
    capsys.readouterr()
    for init in (newest, checkpoints):  # the step directory, and the root whose LATEST names it
        out = tmp_path / "ft"
        err = refused(["finetune", "--config", str(REPO / "configs/finetune_tiny.yaml"),
                    "--set", f"data={prepared_ratings_dir}", "--set", f"out={out}", "--init", str(init),
                    "--tracking-uri", _store(tmp_path), "--experiment", "ft"], capsys)
        assert str(newest) in err and expected in err, err
        assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("kind, how", [("distcp", "zero"), ("metadata", "truncate"), ("manifest", "truncate"),
                                       ("distcp", "delete")])
def test_score_and_export_refuse_a_corrupt_finetuned_checkpoint(finetuned, tmp_path, capsys, kind, how):
    path = tmp_path / "best" / finetuned.name
    shutil.copytree(finetuned, path)
    (tmp_path / "best" / LATEST).write_text(path.name)
    file = _target(path, kind)
    expected = _expected(file, how, _damage(file, how))
    events = tmp_path / "events.csv"
    pd.DataFrame({"user_id": ["1", "1"], "item_id": ["2", "3"], "timestamp": [1, 2]}).to_csv(events, index=False)
    capsys.readouterr()
    for model in (path, tmp_path / "best"):
        scores = tmp_path / "scores.parquet"
        err = refused(["score", "--model", str(model), "--input", str(events), "--out", str(scores)], capsys)
        assert str(path) in err and expected in err, err
        assert not scores.exists()
    program = tmp_path / "ranker.pt2"
    err = refused(["export", "--model", str(path), "--input", str(events), "--out", str(program)], capsys)
    assert expected in err and not program.exists()
    with pytest.raises(CheckpointError, match=expected.split(":")[0]):
        load_finetuned(path)


def test_an_intact_finetuned_checkpoint_loads_and_one_without_integrity_records_too(finetuned, tmp_path):
    model, manifest = load_finetuned(finetuned)
    assert INTEGRITY not in manifest and manifest["step"] >= 1
    legacy = tmp_path / finetuned.name
    shutil.copytree(finetuned, legacy)
    raw = json.loads((legacy / MANIFEST).read_text())
    del raw[INTEGRITY]
    (legacy / MANIFEST).write_text(json.dumps(raw))
    again, _ = load_finetuned(legacy)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
