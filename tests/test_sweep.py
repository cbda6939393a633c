"""A tiny real sweep on ML-100K: nested runs, a failing point that does not stop the others, re-runs that
skip finished points, and `hybrid review` over the store it fills (table values = logged metrics)."""
from pathlib import Path

import pytest
from mlflow import MlflowClient

from hybrid.cli import main
from hybrid.config import load_config
from hybrid.data.store import save_prepared
from hybrid.jobs.sweep import SweepConfig, run_sweep
from hybrid.review import load_curves, summary_table
from hybrid.tracking import PARENT_TAG, Tracker

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sweep_tiny.yaml"


@pytest.mark.slow
def test_tiny_sweep_with_a_failing_point_then_review(tmp_path, prepared_last_item, monkeypatch):
    data = save_prepared(prepared_last_item, tmp_path / "last-item")
    # no tracking URI anywhere: the default store (./mlflow.db of the working directory) receives every stage's runs
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    overrides = [f"pretrain.data={data}", f"finetune.data={data}", f"out={tmp_path / 'sweep'}",
                 "sizes=[L1H8A2, L1H10A3, L1H16A2]", "pretrain.train.epochs=1", "finetune.train.epochs=2"]
    cfg = load_config(SweepConfig, CONFIG, overrides)
    result = run_sweep(cfg)
    # L1H10A3 is not a valid size (10 % 3 != 0): its three points fail, the other six complete
    assert set(result["failed"]) == {"pretrain/L1H10A3", "finetune/L1H10A3/nt/seed0", "finetune/L1H10A3/st_sf/seed0"}
    assert len(result["done"]) == 2 + 4
    assert (tmp_path / "sweep" / "finetune" / "L1H10A3" / "nt" / "seed0" / "error.txt").is_file()
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("mlflow.db")] == [Path("mlflow.db")]

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("sweep-tiny")
    runs = client.search_runs([exp.experiment_id])
    sweep_run = [r for r in runs if r.data.tags.get("stage") == "sweep"][0]
    assert "failed/pretrain/L1H10A3" in sweep_run.data.tags
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == sweep_run.info.run_id]
    assert sorted(r.data.tags["stage"] for r in children) == ["finetune"] * 4 + ["pretrain"] * 2
    assert {r.data.tags["model_size"] for r in children} == {"L1H8A2", "L1H16A2"}

    # a re-run skips every finished point and retries only the failed ones
    again = run_sweep(cfg)
    assert len(again["skipped"]) == 6 and not again["done"] and set(again["failed"]) == set(result["failed"])

    # review over the store the sweep filled: the table equals the logged metrics
    tracker = Tracker(store, "sweep-tiny", enabled=True)
    curves = {(c.strategy, c.model_size): c for c in load_curves(tracker)}
    assert len(curves) == 4
    table = summary_table(list(curves.values())).set_index(["strategy", "model_size"])
    for (strategy, size), curve in curves.items():
        history = client.get_metric_history(curve.run_id, "valid/auc")
        best = max(history, key=lambda m: m.value)
        test = {m.step: m.value for m in client.get_metric_history(curve.run_id, "test/auc")}
        assert table.loc[(strategy, size), "valid_best_auc_mean"] == pytest.approx(best.value)
        assert table.loc[(strategy, size), "test_auc_mean"] == pytest.approx(test[best.step])
        assert table.loc[(strategy, size), "test_final_auc_mean"] == pytest.approx(test[max(test)])
        assert table.loc[(strategy, size), "dense_params"] > 0
    assert (table["valid_best_auc_mean"] > 0.5).all()
    rc = main(["review", "--experiment", "sweep-tiny", "--tracking-uri", store, "--out", str(tmp_path / "review")])
    assert rc == 0 and (tmp_path / "review" / "report.html").is_file()


def test_sweep_config_errors():
    with pytest.raises(Exception, match="strategies: unknown 'sf'"):
        load_config(SweepConfig, CONFIG, ["strategies=[nt, sf]"])
    with pytest.raises(Exception, match="unknown key 'finetune.trian'"):
        load_config(SweepConfig, CONFIG, ["finetune.trian.epochs=1"])
