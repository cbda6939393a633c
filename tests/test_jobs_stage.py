"""The skeleton every training stage shares (hybrid.jobs.stage): refusal, process group, rank-0 writes, MLflow."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch.distributed as dist
from mlflow import MlflowClient
from torchrun_support import run_torchrun

import hybrid.jobs.stage as stage_module
from hybrid.core.checkpoint import LATEST, MANIFEST
from hybrid.core.errors import HybridInputError
from hybrid.core.feature_map import FeatureMap
from hybrid.core.training import DistributedContext
from hybrid.jobs.stage import Stage, refuse_existing, training_stage
from hybrid.tracking import TrackingConfig


def _checkpoint(root: Path, name: str = "step-00000010") -> Path:
    (root / name).mkdir(parents=True)
    (root / name / MANIFEST).write_text("{}")
    (root / LATEST).write_text(name)
    return root / name


def test_refuse_existing_names_the_checkpoint_unless_allowed(tmp_path):
    root = tmp_path / "checkpoints"
    assert refuse_existing(root, "choose another out") is None  # nothing there yet
    (root / "step-00000005").mkdir(parents=True)  # a half-written checkpoint (no manifest) is not one
    (root / LATEST).write_text("step-00000005")
    assert refuse_existing(root, "choose another out") is None
    last = _checkpoint(root)
    with pytest.raises(HybridInputError, match=r"checkpoints: already holds a checkpoint \(step-00000010\); "
                                               r"choose another out"):
        refuse_existing(root, "choose another out")
    assert refuse_existing(root, "unused", allow=True) == last


def test_only_rank_zero_writes(tmp_path):
    fm = FeatureMap.fit({"item_id": pd.Series(["a", "b", "a"])})
    for rank in (1, 0):
        stage = Stage(tmp_path / "out", DistributedContext(rank=rank, world_size=2))
        stage.write_json("result.json", {"rank": rank})
        stage.write_inputs(TrackingConfig(experiment="e"), fm)
        if rank == 1:
            assert not (tmp_path / "out").exists()  # rank 1 leaves no file, not even the directory
    assert json.loads((tmp_path / "out/result.json").read_text()) == {"rank": 0}
    assert "experiment: e" in (tmp_path / "out/config.yaml").read_text()
    assert FeatureMap.load(tmp_path / "out/feature_map.json").fingerprint() == fm.fingerprint()


def test_batch_size_must_split_over_the_processes(monkeypatch, tmp_path):
    monkeypatch.setattr(stage_module, "init_distributed", lambda: DistributedContext(rank=0, world_size=3))
    with pytest.raises(HybridInputError, match=r"train.batch_size \(64\) must be divisible by the 3 processes"):
        with training_stage(tmp_path / "out", batch_size=64):
            pytest.fail("the body must not run")
    assert not (tmp_path / "out").exists()


def test_a_callers_process_group_is_left_alone(tmp_path):
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with training_stage(tmp_path / "out", batch_size=8) as stage:
                assert stage.ctx.world_size == 1
                raise RuntimeError("boom")
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_failed_stage_run_is_marked_failed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    stage = Stage(tmp_path / "out", DistributedContext())
    with pytest.raises(ValueError):
        with stage.track(TrackingConfig(tracking_uri=uri, experiment="e"), "s", tags={"stage": "x"}) as (_, run):
            raise ValueError("bad batch")
    got = MlflowClient(uri).get_run(run)
    assert got.info.status == "FAILED"
    assert got.data.tags["stage"] == "x" and got.data.tags["world_size"] == "1"


SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch.distributed as dist
    from hybrid.jobs.stage import training_stage
    from hybrid.tracking import TrackingConfig

    out, uri = Path(sys.argv[1]), sys.argv[2]
    with training_stage(out, batch_size=4) as stage:
        rank, in_group = stage.ctx.rank, dist.is_initialized()
        stage.write_json("result.json", {"written_by": rank})
        with stage.track(TrackingConfig(tracking_uri=uri, experiment="stage"), "two-ranks") as (tracker, run):
            tracker.log_metrics(run, {"eval/auc": 0.5 + rank}, step=1)
    (out.parent / f"rank{rank}.json").write_text(json.dumps(
        {"world": stage.ctx.world_size, "in_group": in_group, "after": dist.is_initialized(), "run": run}))
""")


def test_two_ranks_one_writer_one_run_group_ended(tmp_path):
    script = tmp_path / "stage_job.py"
    script.write_text(SCRIPT)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = run_torchrun([script, tmp_path / "out", uri], timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["in_group"] and not r["after"] for r in ranks)  # the stage ended its group
    assert ranks[0]["run"] is not None and ranks[1]["run"] is None  # rank 1 logs nothing
    assert json.loads((tmp_path / "out/result.json").read_text()) == {"written_by": 0}
    run = MlflowClient(uri).get_run(ranks[0]["run"])
    assert run.info.status == "FINISHED" and run.data.metrics["eval/auc"] == 0.5
    assert run.data.tags["world_size"] == "2"
