"""Tracking against a real SQLite MLflow store in a temp dir (no mocks)."""
import pytest
from mlflow import MlflowClient

from hybrid.tracking import PARENT_TAG, Tracker, resolve_tracking_uri


def test_tracking_uri_resolution_order(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    # MLflow's own default: ./mlflow.db of the working directory (absolute), never inside a stage's output
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri(None) == "sqlite:///env.db"
    assert resolve_tracking_uri("sqlite:///arg.db") == "sqlite:///arg.db"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_parent_nested_params_metrics_tags(store):
    tracker = Tracker(store, "study", enabled=True)
    with tracker.run("pipeline", tags={"dataset": "ml-100k"}) as parent:
        with tracker.run("pretrain", parent=parent, tags={"stage": "pretrain"}) as child:
            tracker.log_params(child, {"model": {"dim": 64, "kind": "llama"}, "lr": 0.001, "sizes": [1, 2]})
            for step in (10, 20, 30):
                tracker.log_metrics(child, {"eval/auc": 0.5 + step / 100}, step=step, epoch=step / 20)
            tracker.set_tags(child, {"strategy": "st_sf"})
            tracker.log_json(child, {"a": 1}, "stats.json")
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("study")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"pipeline", "pretrain"}
    child_run = runs["pretrain"]
    assert child_run.data.tags[PARENT_TAG] == runs["pipeline"].info.run_id
    assert child_run.data.tags["strategy"] == "st_sf" and len(child_run.data.tags["git_commit"]) >= 7
    assert child_run.data.params == {"model.dim": "64", "model.kind": "llama", "lr": "0.001", "sizes": "[1, 2]"}
    history = client.get_metric_history(child_run.info.run_id, "eval/auc")
    assert [(m.step, round(m.value, 6)) for m in history] == [(10, 0.6), (20, 0.7), (30, 0.8)]
    epochs = client.get_metric_history(child_run.info.run_id, "progress/epoch")
    assert [(m.step, m.value) for m in epochs] == [(10, 0.5), (20, 1.0), (30, 1.5)]
    assert child_run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(child_run.info.run_id)] == ["stats.json"]


def test_failed_stage_is_marked_failed_and_earlier_runs_stay(store):
    tracker = Tracker(store, "failing", enabled=True)
    with tracker.run("ok") as ok:
        tracker.log_metrics(ok, {"x": 1.0}, step=0)
    with pytest.raises(RuntimeError):
        with tracker.run("broken"):
            raise RuntimeError("boom")
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("failing")
    status = {r.info.run_name: r.info.status for r in client.search_runs([exp.experiment_id])}
    assert status == {"ok": "FINISHED", "broken": "FAILED"}


def test_only_rank_zero_logs(store, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    tracker = Tracker(store, "ranks")
    assert not tracker.enabled
    with tracker.run("r1") as run:
        assert run is None
        tracker.log_metrics(run, {"x": 1.0}, step=0)     # a no-op, not an error
    assert MlflowClient(store).get_experiment_by_name("ranks") is None


def test_artifacts_live_beside_a_sqlite_store_not_in_the_working_directory(tmp_path, monkeypatch):
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    monkeypatch.chdir(workdir)                  # MLflow's own default would write ./mlruns here
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    tracker = Tracker(f"sqlite:///{store_dir / 'mlflow.db'}", "study", enabled=True)
    with tracker.run("stage") as run:
        tracker.log_json(run, {"a": 1}, "report.json")
    assert list(workdir.iterdir()) == []
    assert [p.name for p in store_dir.glob("mlartifacts/*/artifacts/*")] == ["report.json"]
    assert MlflowClient(tracker.tracking_uri).get_experiment_by_name("study").artifact_location == \
        (store_dir / "mlartifacts").as_uri()


def test_merge_script_copies_runs_whole_and_relinks_them(tmp_path):
    """scripts/merge_mlflow_stores.py: histories, params, artifacts, status and run links survive; re-runs skip."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "merge_mlflow_stores.py"
    spec = importlib.util.spec_from_file_location("merge_mlflow_stores", path)
    merge_stores = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge_stores)

    main_store = f"sqlite:///{tmp_path / 'main' / 'mlflow.db'}"
    (tmp_path / "main").mkdir()
    main_tracker = Tracker(main_store, "sweep", enabled=True)
    with main_tracker.run("sweep") as parent:
        pass
    sources = []
    for name in ("pre", "fine"):
        (tmp_path / name).mkdir()
        sources.append(f"sqlite:///{tmp_path / name / 'mlflow.db'}")
    pre = Tracker(sources[0], "sweep", enabled=True)
    with pre.run("pretrain", parent=parent, tags={"stage": "pretrain"}) as pre_id:
        pre.log_params(pre_id, {"lr": 0.005})
    fine = Tracker(sources[1], "sweep", enabled=True)
    with fine.run("finetune", parent=parent, tags={"stage": "finetune", "pretrain_run_id": pre_id}) as fine_id:
        for step in (1, 2, 3):
            fine.log_metrics(fine_id, {"eval/auc": 0.6 + step / 100}, step=step, epoch=step / 3)
        fine.log_json(fine_id, {"a": 1}, "report.json")

    ids = merge_stores.merge(main_store, "sweep", sources)
    client = MlflowClient(main_store)
    copy = client.get_run(ids[fine_id])
    assert copy.info.run_name == "finetune" and copy.info.status == "FINISHED"
    assert copy.data.tags[PARENT_TAG] == parent                          # the parent already in the store
    assert copy.data.tags["pretrain_run_id"] == ids[pre_id]              # relinked to the copied pretrain run
    assert [(m.step, round(m.value, 6)) for m in client.get_metric_history(copy.info.run_id, "eval/auc")] == \
        [(1, 0.61), (2, 0.62), (3, 0.63)]
    assert [a.path for a in client.list_artifacts(copy.info.run_id)] == ["report.json"]
    assert client.get_run(ids[pre_id]).data.params == {"lr": "0.005"}
    assert merge_stores.merge(main_store, "sweep", sources) == ids       # a re-run copies nothing twice
    experiment = client.get_experiment_by_name("sweep").experiment_id
    assert len(client.search_runs([experiment])) == 3
