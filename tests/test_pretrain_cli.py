"""``hybrid pretrain`` end to end on real ML-100K with a real SQLite MLflow store: outputs, MLflow runs /
params / metrics with steps / tags, resume, one-line errors (exit 2) for bad configs and mismatched
checkpoints, ``torchrun`` with 2 processes, and that every example config loads."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from adapters_support import one_thread  # noqa: F401 (autouse fixture)
from cli_support import refused
from mlflow import MlflowClient
from torchrun_support import run_torchrun

from hybrid.cli import main
from hybrid.config import load_config
from hybrid.core.checkpoint import latest_checkpoint, read_manifest
from hybrid.core.feature_map import FeatureMap
from hybrid.jobs.prepare import PrepareConfig
from hybrid.jobs.pretrain import PretrainConfig

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "pretrain_tiny.yaml"


def _store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _argv(data: Path, out: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["pretrain", "--config", str(TINY), "--set", f"data={data}", "--set", f"out={out}",
            "--tracking-uri", _store(tmp_path), "--experiment", "pt", "--set", "train.epochs=2", *extra]


def _runs(tmp_path: Path):
    client = MlflowClient(_store(tmp_path))
    experiment = client.get_experiment_by_name("pt")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_pretrain_cli_trains_checkpoints_and_logs_to_mlflow(prepared_last_item_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(prepared_last_item_dir, out, tmp_path)) == 0
    printed = capsys.readouterr().out
    assert "pretrained 60 steps (2.00 epochs)" in printed and "most popular:" in printed

    # outputs: checkpoints, resolved config, feature map, result
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "feature_map.json", "result.json"]
    last = latest_checkpoint(out / "checkpoints")
    assert last.name == "step-00000060"
    resolved = load_config(PretrainConfig, out / "config.yaml")
    assert resolved.train.epochs == 2 and resolved.data == str(prepared_last_item_dir)
    fm = FeatureMap.load(out / "feature_map.json")
    assert fm == FeatureMap.load(prepared_last_item_dir / "feature_map.json")
    manifest = read_manifest(last)
    assert manifest["step"] == 60 and manifest["epoch"] == 2
    assert FeatureMap.from_dict(manifest["feature_map"]).fingerprint() == fm.fingerprint()
    assert manifest["config"]["model"]["size"] == "L2H16A2"
    assert manifest["tables"]["t_item_id"] == [fm.vocab_sizes()["item_id"], 16]
    result = json.loads((out / "result.json").read_text())
    assert manifest["metrics"]["eval/hr_at_10"] == result["metrics"]["eval/hr_at_10"]
    assert result["checkpoint"] == str(last)

    # MLflow: one run with params, tags, baseline, and metrics at their steps
    client, runs = _runs(tmp_path)
    assert [r.info.run_name for r in runs] == ["pretrain-L2H16A2-llama"]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.batch_size"] == "32" and run.data.params["model.kind"] == "llama"
    assert run.data.params["resolved_model.backbone.num_layers"] == "2"
    tags = run.data.tags
    assert tags["model_size"] == "L2H16A2" and tags["backbone_kind"] == "llama" and tags["strategy"] == "none"
    assert tags["data_hash"] == json.loads((prepared_last_item_dir / "stats.json").read_text())["data_hash"]
    assert int(tags["dense_params"]) > 0 and int(tags["sparse_params"]) == sum(fm.vocab_sizes()[f] * 16
                                                                            for f in ("item_id", "category", "action"))
    history = {name: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
               for name in ("eval/hr_at_10", "train/loss", "progress/epoch", "perf/events_per_s",
                            "baseline/popularity_hr_at_10")}
    assert [s for s, _ in history["eval/hr_at_10"]] == [30, 60]
    assert [s for s, _ in history["train/loss"]] == [10, 20, 30, 40, 50, 60]
    assert (60, 2.0) in history["progress/epoch"] and (10, pytest.approx(1 / 3)) in history["progress/epoch"]
    assert history["baseline/popularity_hr_at_10"] == [(0, pytest.approx(result["baseline"]["hr_at_10"]))]
    assert history["eval/hr_at_10"][-1][1] == pytest.approx(result["metrics"]["eval/hr_at_10"])
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert artifacts == ["pretrain_result.json"]

    # a second run into the same out is refused unless it resumes
    err = refused(_argv(prepared_last_item_dir, out, tmp_path), capsys)
    assert "already holds a checkpoint (step-00000060); pass --resume" in err
    # --resume with more epochs continues from step 60 — in the same MLflow run, tagged with where it resumed
    # and which params it changed — evaluated on 100 of the 283 evaluation users (one held-out target each),
    # the baseline on the same ones
    assert main(_argv(prepared_last_item_dir, out, tmp_path, "--resume", "--set", "train.epochs=3",
                      "--set", "train.eval_max_users=100")) == 0
    assert "pretrained 90 steps (3.00 epochs)" in capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert result["metrics"]["eval/targets"] == result["baseline"]["targets"] == 100
    client, runs = _runs(tmp_path)
    (resumed,) = runs
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert resumed.data.tags["resumed_from"] == str(last)
    assert resumed.data.tags["resumed_changed_params"] == "train.epochs,train.eval_max_users"
    assert resumed.data.params["train.epochs"] == "2"   # MLflow keeps a param's first value
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "train/loss")] == [10, 20, 30, 40, 50, 60,
                                                                                             70, 80, 90]


def test_a_checkpoint_from_another_feature_map_is_refused(prepared_last_item_dir, prepared_ratings_dir,
                                                          tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(prepared_last_item_dir, out, tmp_path, "--set", "train.max_steps=5")) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    ours = FeatureMap.load(prepared_last_item_dir / "feature_map.json").vocab_sizes()
    theirs = FeatureMap.load(prepared_ratings_dir / "feature_map.json").vocab_sizes()
    assert ours["item_id"] != theirs["item_id"]
    err = refused(_argv(prepared_ratings_dir, out, tmp_path, "--resume"), capsys)
    assert "trained on a different feature map than" in err and str(prepared_ratings_dir) in err
    assert f"item_id (table t_item_id): {ours['item_id']} rows in the checkpoint vs {theirs['item_id']} in the data" in err
    # nothing was overwritten by the refused run
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
    ("model.size=L4H64", "bad backbone size name 'L4H64'"),
    ("model.kind=gpt", "key 'model.kind' expects one of 'llama', 'hstu', got 'gpt'"),
    ("model.features=[item_id, genre]", "no sequence feature(s) ['genre']"),
    ("model.backbone={rope_thetaa: 1}", "unknown key 'model.backbone.rope_thetaa' (did you mean 'model.backbone.rope_theta'"),
    ("model.backbone={norm_eps: tiny}", "key 'model.backbone.norm_eps' expects a number, got 'tiny'"),
    ("model.backbone={dim: 8}", "model.backbone: dim is set by model.size"),
    ("train.optim.lr=0", "optim.lr must be positive"),
    ("train.batch_size=0", "train.batch_size must be a positive integer"),
    ("train.eval_max_users=0", "train.eval_max_users must be a positive integer or null"),
    ("data=/nowhere", "/nowhere: prepared data directory not found"),
])
def test_bad_configs_get_one_line_and_exit_2(prepared_last_item_dir, tmp_path, capsys, override, message):
    err = refused(_argv(prepared_last_item_dir, tmp_path / "o", tmp_path, "--set", override), capsys)
    assert message in err


def test_every_example_config_loads():
    prepare_out = {load_config(PrepareConfig, p).protocol.protocol: load_config(PrepareConfig, p).out
                   for p in (REPO / "configs").glob("prepare_*.yaml")}
    seen = set()
    for path in sorted((REPO / "configs").glob("pretrain_*.yaml")):
        cfg = load_config(PretrainConfig, path)
        model = cfg.model.build(cfg.train.max_len, ["item_id", "category", "action"])
        assert model.backbone.max_len == cfg.train.max_len, path
        if path.name == "pretrain_tiny.yaml":
            continue
        protocol = "last-item" if "last_item" in path.name else "ratings"
        assert cfg.data == prepare_out[protocol], path   # reads what the prepare config writes
        assert model.backbone.size_name == "L4H64A4" and cfg.model.kind in path.name, path
        seen.add((protocol, cfg.model.kind))
    assert seen == {(p, k) for p in ("last-item", "ratings") for k in ("llama", "hstu")}


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_processes(prepared_last_item_dir, tmp_path):
    out = tmp_path / "run"
    def reset() -> None:
        shutil.rmtree(out, ignore_errors=True)
        (tmp_path / "mlflow.db").unlink(missing_ok=True)

    done = run_torchrun(["-m", "hybrid", *_argv(prepared_last_item_dir, out, tmp_path)], timeout=300, cwd=tmp_path,
                        reset=reset)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("pretrained 60 steps") == 1   # rank 0 prints; 30 steps per epoch, as on one process
    _, runs = _runs(tmp_path)
    assert len(runs) == 1 and runs[0].data.tags["world_size"] == "2"   # only rank 0 logs
    manifest = read_manifest(latest_checkpoint(out / "checkpoints"))
    assert manifest["world_size"] == 2 and manifest["step"] == 60
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"] == 2
