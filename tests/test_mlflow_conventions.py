"""Runs look native in the MLflow UI (issue 15.3), checked on a real SQLite store (no mocks) filled by real jobs on
ML-100K: ``hybrid data prepare``, a tiny sweep (one size, NT and ST&SF, two seeds) and ``hybrid review``.

- the experiment is tagged ``mlflow.experimentKind = custom_model_development`` (the classic view);
- every run has MLflow's reserved source tags (``mlflow.source.git.commit`` = ``git rev-parse HEAD``);
- the prepared data is a dataset input of every stage that reads it (digest = the data hash);
- run names are distinct and descriptive; ``pretrain_checkpoint`` is absolute; ``review`` nests under the sweep;
- ``tracking.system_metrics`` logs ``system/...`` metrics (or is refused in one line without ``psutil``).
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

from hybrid.cli import main
from hybrid.config import load_config
from hybrid.core.errors import HybridInputError
from hybrid.data.protocols import ProtocolConfig
from hybrid.jobs.prepare import DataConfig, PrepareConfig, run_prepare
from hybrid.jobs.pretrain import PretrainConfig
from hybrid.jobs.sweep import SweepConfig, run_sweep
from hybrid.tracking import EXPERIMENT_KIND, PARENT_TAG, Tracker, TrackingConfig

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "conventions"
SIZE = "L1H8A2"


def _head() -> str | None:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


@pytest.fixture(scope="module")
def store_runs(tmp_path_factory, ml100k_dir):
    """prepare → tiny sweep (outputs under a *relative* ``out``) → ``hybrid review``, all in one experiment."""
    root = tmp_path_factory.mktemp("conventions")
    store = f"sqlite:///{root / 'mlflow.db'}"
    heads = {_head()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the sweep's outputs are relative to here: its tags must not be
        tracking = TrackingConfig(tracking_uri=store, experiment=EXPERIMENT)
        prepared = run_prepare(PrepareConfig(data=DataConfig(dataset="movielens-100k", path=str(ml100k_dir)),
                                             protocol=ProtocolConfig(protocol="last-item"),
                                             out=str(root / "prepared"), tracking=tracking))
        data = str(prepared.path)
        cfg = load_config(SweepConfig, REPO / "configs" / "sweep_tiny.yaml", [
            f"pretrain.data={data}", f"finetune.data={data}", "out=sweep", f"sizes=[{SIZE}]", "seeds=[0, 1]",
            "pretrain.train.epochs=1", "finetune.train.epochs=1", "finetune.train.eval_every=0",
            f"tracking.tracking_uri={store}", f"tracking.experiment={EXPERIMENT}"])
        result = run_sweep(cfg)
        assert not result["failed"] and len(result["done"]) == 5
        assert main(["review", "--experiment", EXPERIMENT, "--tracking-uri", store, "--out", "review"]) == 0
    torch.set_num_threads(threads)
    heads.add(_head())  # another commit may land while the jobs run
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    return {"client": client, "experiment": experiment, "runs": runs, "root": root, "heads": heads,
            "stats": prepared.stats, "data": Path(data)}


def _by_stage(runs) -> dict[str, list]:
    out: dict[str, list] = {}
    for run in runs:
        out.setdefault(run.data.tags.get("stage"), []).append(run)
    return out


def test_experiment_opens_the_classic_view(store_runs):
    assert EXPERIMENT_KIND == "custom_model_development"  # the UI's ExperimentKind.CUSTOM_MODEL_DEVELOPMENT
    assert store_runs["experiment"].tags["mlflow.experimentKind"] == EXPERIMENT_KIND


def test_every_run_has_the_reserved_source_tags(store_runs):
    runs = store_runs["runs"]
    assert {k: len(v) for k, v in _by_stage(runs).items()} == {"prepare": 1, "sweep": 1, "pretrain": 1,
                                                              "finetune": 4, "review": 1}
    heads = store_runs["heads"] - {None}
    for run in runs:
        tags = run.data.tags
        assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"], run.info.run_name
        assert tags["mlflow.user"] and run.info.user_id == tags["mlflow.user"]
        if heads:  # a git checkout: the commit the code ran at
            assert tags["mlflow.source.git.commit"] in heads and tags["git_commit"] == tags["mlflow.source.git.commit"]
        else:
            assert "mlflow.source.git.commit" not in tags


def test_prepared_data_is_a_dataset_input_of_every_stage_that_reads_it(store_runs):
    stats, data = store_runs["stats"], store_runs["data"]
    name = "movielens-100k/last-item"
    expected = {"prepare": {name: "output"},
                "pretrain": {f"{name}/pretrain_train": "training", f"{name}/pretrain_eval": "validation"},
                "finetune": {f"{name}/ctr_train": "training", f"{name}/ctr_valid": "validation",
                             f"{name}/ctr_test": "test"}}
    for stage, runs in _by_stage(store_runs["runs"]).items():
        for run in runs:
            inputs = run.inputs.dataset_inputs
            contexts = {i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for i in inputs}
            assert contexts == expected.get(stage, {}), (stage, run.info.run_name)
            for i in inputs:
                assert i.dataset.digest == stats["data_hash"] and i.dataset.source_type == "local"
                uri = Path(json.loads(i.dataset.source)["uri"])
                assert uri.is_absolute() and uri.exists()
                if stage == "prepare":
                    assert uri == data and json.loads(i.dataset.profile)["events"] == stats["events"]
                    continue
                table = i.dataset.name.rsplit("/", 1)[1]
                assert uri == data / f"{table}.parquet"
                columns = [c["name"] for c in json.loads(i.dataset.schema)["mlflow_colspec"]]
                assert columns == pq.read_schema(uri).names
                assert json.loads(i.dataset.profile)["num_rows"] == pq.read_metadata(uri).num_rows


def test_run_names_are_distinct_and_descriptive(store_runs):
    names = [r.info.run_name for r in store_runs["runs"]]
    assert len(names) == len(set(names))
    assert set(names) == {"prepare-last-item", "sweep", f"pretrain {SIZE} seed0", "review"} | {
        f"finetune gpsd {SIZE} {strategy} seed{seed}" for strategy in ("nt", "st_sf") for seed in (0, 1)}


def test_path_tags_are_absolute_and_review_nests_under_the_sweep(store_runs):
    stages = _by_stage(store_runs["runs"])
    [sweep], [pretrain], [review] = stages["sweep"], stages["pretrain"], stages["review"]
    transferred = [r for r in stages["finetune"] if r.data.tags["strategy"] == "st_sf"]
    assert len(transferred) == 2
    checkpoints = store_runs["root"] / "sweep" / "pretrain" / SIZE / "checkpoints"
    for run in transferred:
        tag = Path(run.data.tags["pretrain_checkpoint"])
        assert tag.is_absolute() and tag.is_dir() and tag.parent == checkpoints
        assert run.data.tags["pretrain_run_id"] == pretrain.info.run_id
    assert review.data.tags[PARENT_TAG] == sweep.info.run_id
    assert all(r.data.tags[PARENT_TAG] == sweep.info.run_id for r in stages["finetune"] + [pretrain])


def test_system_metrics_are_optional(tmp_path, monkeypatch):
    if importlib.util.find_spec("psutil") is None:
        with pytest.raises(ValueError, match="psutil"):
            TrackingConfig(system_metrics=True)
        with pytest.raises(HybridInputError, match="system_metrics: .*psutil"):
            load_config(PretrainConfig, REPO / "configs" / "pretrain_tiny.yaml", ["tracking.system_metrics=true"])
        pytest.skip("psutil is not installed: system metrics are refused in one line")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain_tiny.yaml", ["tracking.system_metrics=true"])
    assert cfg.tracking.system_metrics
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(store, "sysmetrics", enabled=True, system_metrics=True)
    with tracker.run("with") as with_metrics:
        time.sleep(1.5)
    with Tracker(store, "sysmetrics", enabled=True).run("without") as without:
        pass
    client = MlflowClient(store)
    logged = client.get_run(with_metrics).data.metrics
    assert "system/cpu_utilization_percentage" in logged and "system/system_memory_usage_megabytes" in logged
    assert not client.get_run(without).data.metrics
