"""``train.shard_tables`` (issue 18): one process trains its tables in TorchRec's DistributedModelParallel (a 1-rank
process group, FBGEMM's fused kernels) — the same model as unsharded, checkpointed and reloaded the same way."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from cli_support import refused

from hybrid.cli import main
from hybrid.config import load_config
from hybrid.data.store import open_prepared
from hybrid.jobs.finetune import FinetuneConfig, build_model, load_finetuned

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "finetune_tiny.yaml")   # sparse_optimizer adagrad: FBGEMM's CPU kernels take it


def _finetune(data: Path, out: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["finetune", "--config", TINY, "--set", f"data={data}", "--set", f"out={out}", "--set", "train.max_steps=40",
            "--set", "train.eval_every=20", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--quiet", *extra]


#: plain SGD for the tables: FBGEMM's fused exact SGD and torch's are the same update (their adagrads differ in
#: where eps goes and in the initial accumulator), so the two runs must agree to float rounding
SGD = ("--set", "train.optim.sparse_optimizer=sgd", "--set", "train.optim.sparse_lr=0.5")


@pytest.mark.slow
def test_sharded_tables_in_one_process_train_the_same_model(prepared_ratings_dir, tmp_path):
    assert main(_finetune(prepared_ratings_dir, tmp_path / "plain", tmp_path, *SGD)) == 0
    assert main(_finetune(prepared_ratings_dir, tmp_path / "sharded", tmp_path, *SGD,
                          "--set", "train.shard_tables=true")) == 0
    assert not dist.is_initialized()   # the stage's own 1-rank group is gone with it
    plain, sharded = (json.loads((tmp_path / run / "result.json").read_text()) for run in ("plain", "sharded"))
    for key in ("valid_best_auc", "test_auc", "test_final_auc"):
        assert sharded[key] == pytest.approx(plain[key], abs=2e-4), key
    model, manifest = load_finetuned(tmp_path / "sharded" / "checkpoints" / "best")   # rebuilt unsharded
    assert manifest["train_config"]["shard_tables"] is True
    reference, _ = load_finetuned(tmp_path / "plain" / "checkpoints" / "best")
    ours, theirs = model.state_dict(), reference.state_dict()
    table = next(k for k in ours if k.endswith("t_item_id.weight"))
    assert ours[table].shape == theirs[table].shape
    built = build_model(load_config(FinetuneConfig, TINY, [f"data={prepared_ratings_dir}"]),
                        open_prepared(prepared_ratings_dir).feature_map).state_dict()[table]   # the init (seed 0)
    moved = (ours[table] - built).abs().amax(1) > 0
    assert moved.sum() > 100                                  # trained: the rows of the batches moved
    assert torch.allclose(ours[table], theirs[table], atol=1e-5)


def test_sharded_tables_refuse_adam_on_cpu_in_one_line(prepared_ratings_dir, tmp_path, capsys):
    err = refused(_finetune(prepared_ratings_dir, tmp_path / "adam", tmp_path, "--set", "train.shard_tables=true",
                            "--set", "train.optim.sparse_optimizer=adam"), capsys)
    assert "FBGEMM's CPU kernels take train.optim.sparse_optimizer adagrad, rowwise_adagrad or sgd, not adam" in err
    assert not (tmp_path / "adam" / "checkpoints").exists()


@pytest.mark.slow
def test_pretraining_with_sharded_tables_in_one_process_transfers_into_a_ranker(prepared_ratings_dir, tmp_path):
    out, store = tmp_path / "pre", f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["pretrain", "--config", str(REPO / "configs" / "pretrain_tiny.yaml"), "--set", f"data={prepared_ratings_dir}",
                 "--set", f"out={out}", "--set", "train.max_steps=30", "--set", "train.eval_every=30",
                 "--set", "train.shard_tables=true", "--tracking-uri", store, "--quiet"]) == 0
    assert not dist.is_initialized()
    result = json.loads((out / "result.json").read_text())
    assert result["step"] == 30 and result["metrics"]["eval/hr_at_10"] > result["baseline"]["hr_at_10"] / 2
    # its checkpoint (sharded state, one rank) is what a transfer reads, as one written by torchrun
    assert main(_finetune(prepared_ratings_dir, tmp_path / "ft", tmp_path, "--init", str(out / "checkpoints"),
                          "--strategy", "st_sf", "--set", "ranker.config.features.embedding_dim=16")) == 0
    report = json.loads((tmp_path / "ft" / "transfer_report.json").read_text())
    assert report["metrics"]["transfer/frozen_params"] > 0


def test_pretraining_with_sharded_tables_refuses_adam_on_cpu_before_writing(prepared_ratings_dir, tmp_path, capsys):
    out = tmp_path / "pre-adam"
    err = refused(["pretrain", "--config", str(REPO / "configs" / "pretrain_tiny.yaml"),
                   "--set", f"data={prepared_ratings_dir}", "--set", f"out={out}", "--set", "train.shard_tables=true",
                   "--set", "train.optim.sparse_optimizer=adam", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                   "--quiet"], capsys)
    assert "FBGEMM's CPU kernels take train.optim.sparse_optimizer adagrad, rowwise_adagrad or sgd, not adam" in err
    assert not dist.is_initialized()
    assert not out.exists() or not any(out.iterdir())   # nothing written: no config.yaml, no checkpoints
