"""The README's first command, end to end on real ML-100K with a reduced budget: every stage runs, nests
under one parent run, and the review report is written."""
import pytest
from mlflow import MlflowClient

from hybrid.jobs import quickstart


@pytest.mark.slow
def test_quickstart_whole_story(tmp_path, ml100k_dir, monkeypatch, capsys):
    monkeypatch.setattr(quickstart, "fetch_movielens_100k", lambda out: ml100k_dir)   # fetched by the fixture
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    results = quickstart.run_quickstart(
        tmp_path / "qs", tracking_uri=store,
        overrides={"pretrain": ["train.epochs=1", "train.eval_every=0"],
                   "gpsd": ["train.epochs=2"], "dcn_v2": ["train.epochs=2", "train.eval_every=80"]},
        seeds={"gpsd": [0, 1]})
    printed = capsys.readouterr().out
    assert "[5/5] reviewing the runs" in printed and "report:" in printed
    assert set(results["finetune"]) == {("gpsd", s, seed) for s in ("nt", "st_sf") for seed in (0, 1)} | {
        ("dcn_v2", s, 0) for s in ("nt", "st_sf")}
    table = results["review"]["table"].set_index(["ranker", "strategy"])
    assert table.loc[("gpsd", "st_sf"), "seeds"] == 2 and table.loc[("dcn_v2", "nt"), "seeds"] == 1
    assert (tmp_path / "qs" / "review" / "report.html").is_file()
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name(quickstart.EXPERIMENT).experiment_id])
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.data.tags.get("stage"), []).append(run)
    assert {k: len(v) for k, v in by_stage.items()} == {"pipeline": 1, "prepare": 2, "pretrain": 2, "finetune": 6,
                                                         "review": 1}
    parent = by_stage["pipeline"][0].info.run_id
    for stage in ("prepare", "pretrain", "finetune"):
        assert all(r.data.tags["mlflow.parentRunId"] == parent for r in by_stage[stage])
    for st_sf in (r for r in by_stage["finetune"] if r.data.tags["strategy"] == "st_sf"):
        assert "transfer_report.json" in {a.path for a in client.list_artifacts(st_sf.info.run_id)}
        assert st_sf.data.tags["pretrain_run_id"] in {r.info.run_id for r in by_stage["pretrain"]}


def test_quickstart_pretrain_stage_refuses_a_corrupt_checkpoint_with_advice_it_can_follow(prepared_last_item_dir,
                                                                                         tmp_path):
    """quickstart has no --resume=previous: its one line says to remove the stage or continue with hybrid pretrain."""
    from hybrid.config import load_config
    from hybrid.core.errors import CheckpointError
    from hybrid.jobs.pretrain import PretrainConfig

    out = tmp_path / "pretrain" / "last-item"
    cfg = load_config(PretrainConfig, quickstart._packaged("quickstart_pretrain.yaml"),
                      [f"data={prepared_last_item_dir}", f"out={out}", "train.max_steps=4", "train.checkpoint_every=2",
                       "train.eval_every=0", "train.progress=false", "tracking.enabled=false"])
    first = quickstart.pretrain_stage(cfg, None)
    assert first["step"] == 4
    (out / "checkpoints" / "LATEST").write_text("step-99999999")   # names a checkpoint that is not there
    with pytest.raises(CheckpointError) as err:
        quickstart.pretrain_stage(cfg, None)
    message = str(err.value)
    assert "the newest complete checkpoint is" in message and f"remove {out}" in message
    assert f"hybrid pretrain --config {out}/config.yaml --resume=previous" in message
    assert (out / "checkpoints" / "step-00000004").is_dir()             # nothing was removed
