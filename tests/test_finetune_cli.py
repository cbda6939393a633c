"""``hybrid finetune`` end to end on real ML-100K with a real SQLite MLflow store; config and shape errors;
every example config builds its model; the prepare_model seam the transfer adapters use."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_support import refused
from mlflow import MlflowClient

from hybrid.cli import main
from hybrid.config import load_config
from hybrid.core.feature_map import FeatureMap
from hybrid.ctr_models.metrics import one_epoch_drop
from hybrid.data.batching import CTRBatchConverter
from hybrid.jobs.finetune import (
    FinetuneConfig,
    build_model,
    load_finetuned,
    run_finetune,
)

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/finetune_tiny.yaml")


def _store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_cli_trains_logs_and_writes_checkpoints(prepared_ratings_dir, tmp_path, capsys):
    """One run: params once, metrics with steps and fractional epochs, tags, one-epoch tag and metric
    consistent with the logged curve, outputs on disk."""
    out = tmp_path / "out"
    rc = main(["finetune", "--config", TINY, "--set", f"data={prepared_ratings_dir}", "--set", f"out={out}",
               "--set", "train.batch_size=1024", "--set", "train.eval_every=30",
               "--tracking-uri", _store(tmp_path), "--experiment", "ft"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "fine-tuned dcn_v2 for 136 steps (2.00 epochs)" in printed and "one-epoch drop:" in printed
    assert "validation (selects):" in printed and "test at the selected step: AUC" in printed
    result = json.loads((out / "result.json").read_text())
    assert (out / "config.yaml").is_file() and (out / "feature_map.json").is_file()
    assert Path(result["best_checkpoint"]).parent == out / "checkpoints/best"

    client = MlflowClient(_store(tmp_path))
    [run] = client.search_runs([client.get_experiment_by_name("ft").experiment_id])
    tags, params, run_id = run.data.tags, run.data.params, run.info.run_id
    stats = json.loads((Path(prepared_ratings_dir) / "stats.json").read_text())
    assert run.info.status == "FINISHED"
    assert tags["stage"] == "finetune" and tags["ranker"] == "dcn_v2" and tags["strategy"] == "nt"
    assert tags["data_hash"] == stats["data_hash"] and tags["protocol"] == "ratings" and tags["seed"] == "0"
    assert int(tags["dense_params"]) > 0 and int(tags["sparse_params"]) > 0
    assert params["train.batch_size"] == "1024" and params["ranker.config.cross_type"] == "low_rank"
    assert params["resolved_ranker.features.max_len"] == "20"          # = train.max_history

    auc = client.get_metric_history(run_id, "valid/auc")
    epochs = {m.step: m.value for m in client.get_metric_history(run_id, "progress/epoch")}
    # 69,327 training samples / 1024 = 68 steps per epoch, eval_every=30 → positions 30, 60 and 68 of each epoch
    assert [m.step for m in auc] == [30, 60, 68, 98, 128, 136]
    curve = [(epochs[m.step], m.value) for m in auc]
    assert [e for e, _ in curve] == pytest.approx([30 / 68, 60 / 68, 1.0, 98 / 68, 128 / 68, 2.0])
    assert [v for point in curve for v in point] == pytest.approx([v for point in result["curve"] for v in point])
    for name in ("valid/logloss", "valid/gauc", "valid/click/auc", "test/auc", "test/gauc", "train/loss",
                 "train/bce/click", "train/lr", "perf/samples_per_s", "perf/valid_samples_per_s"):
        assert client.get_metric_history(run_id, name), name
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")][:2] == [10, 20]

    drop = one_epoch_drop(curve)                                        # recomputed from the logged curve
    assert tags["one_epoch_drop"] == ("true" if drop.flagged else "false")
    assert run.data.metrics["one_epoch/drop"] == float(drop.flagged) == float(result["one_epoch_drop"])
    assert run.data.metrics["one_epoch/drop_size"] == pytest.approx(drop.drop)
    assert run.data.metrics["summary/valid_best_auc"] == pytest.approx(max(a for _, a in curve))
    assert run.data.metrics["summary/valid_auc_epoch1"] == pytest.approx(curve[2][1])
    assert run.data.metrics["summary/valid_final_auc"] == pytest.approx(curve[-1][1]) == \
        pytest.approx(result["valid_final_auc"])
    assert result["valid_best_auc"] > 0.7 and result["test_auc"] > 0.7
    # test is logged where it is reported: the best validation step (and the last one)
    best_step = max(auc, key=lambda m: m.value).step
    test = {m.step: m.value for m in client.get_metric_history(run_id, "test/auc")}
    assert test[best_step] == pytest.approx(result["test_auc"]) and max(test) == 136
    assert test[136] == pytest.approx(result["test_final_auc"]) == pytest.approx(run.data.metrics["summary/test_final_auc"])

    # the best checkpoint rebuilds without the config file and holds the best evaluation's numbers
    model, manifest = load_finetuned(out / "checkpoints/best")
    assert manifest["metrics"]["valid/auc"] == pytest.approx(result["valid_best_auc"])
    assert manifest["metrics"]["test/auc"] == pytest.approx(result["test_auc"])
    assert manifest["ranker_name"] == "dcn_v2" and manifest["mlflow_run_id"] == run_id

    # a finished run is never overwritten
    err = refused(["finetune", "--config", TINY, "--set", f"data={prepared_ratings_dir}", "--set", f"out={out}",
                "--tracking-uri", _store(tmp_path)], capsys)
    assert "already holds a checkpoint" in err and "a finished run is never overwritten; choose another out" in err


def test_bad_configs_get_one_line_and_exit_2(prepared_ratings_dir, tmp_path, capsys):
    common = ["finetune", "--config", TINY, "--set", f"data={prepared_ratings_dir}", "--set",
              f"out={tmp_path / 'o'}", "--tracking-uri", _store(tmp_path)]
    err = refused([*common, "--set", "ranker.name=dcn3"], capsys)
    assert "finetune_tiny.yaml (with --set overrides): ranker: name: unknown ranker 'dcn3'; expected one of" in err
    err = refused([*common, "--set", "ranker.config.cross_typ=full"], capsys)
    assert "unknown key 'ranker.config.cross_typ' (did you mean 'ranker.config.cross_type'?)" in err
    err = refused([*common, "--set", "ranker.config.features.embeding_dim=8"], capsys)
    assert "unknown key 'ranker.config.features.embeding_dim' (did you mean 'ranker.config.features.embedding_dim'?)" in err
    err = refused([*common, "--set", "ranker.config.cross_type=diagonal"], capsys)
    assert "DCNv2Config.cross_type: unknown value 'diagonal'; expected one of ['full', 'low_rank', 'mixture']" in err
    err = refused([*common, "--set", "ranker.config.num_cross_layers=two"], capsys)
    assert "key 'ranker.config.num_cross_layers' expects an integer, got 'two'" in err
    err = refused([*common, "--set", "ranker.config.features.max_len=50"], capsys)
    assert "ranker.config.features.max_len (50) differs from train.max_history (20)" in err
    err = refused([*common, "--set", "task_names=[clicks]"], capsys)
    assert "ctr_train: no label column 'clicks'" in err
    err = refused([*common, "--set", "train.epochs=0"], capsys)
    assert "train.epochs must be a positive integer, got 0" in err
    err = refused([*common, "--set", "ranker.config.features.single_fields=[user_id, zipcode]"], capsys)
    assert "ranker (dcn_v2): FeatureConfig.single_fields: no vocabulary size for ['zipcode']" in err
    err = refused([*common, "--set", f"data={tmp_path / 'nowhere'}"], capsys)
    assert "nowhere: prepared data directory not found" in err
    assert not (tmp_path / "o" / "checkpoints").exists()               # nothing half-written


def test_task_names_in_the_wrong_order_for_the_heads_cannot_happen(prepared_ratings_dir, tmp_path):
    """The job builds the heads and the batches from the same task_names: a two-task MMoE trains on
    click then rating5, logged per task."""
    cfg = load_config(FinetuneConfig, REPO / "configs/finetune_ml1m_ratings_mmoe.yaml", [
        f"data={prepared_ratings_dir}", f"out={tmp_path / 'o'}", "train.max_steps=8", "train.batch_size=512",
        "train.max_history=10", "train.progress=false", f"tracking.tracking_uri={_store(tmp_path)}",
        "ranker.config.expert_hidden=[16]", "ranker.config.tower_hidden=[8]", "train.eval_batch_size=8192"])
    result = run_finetune(cfg)
    model, manifest = load_finetuned(result["best_checkpoint"])
    assert model.task_names == ("click", "rating5") == tuple(manifest["task_names"])
    client = MlflowClient(_store(tmp_path))
    [run] = client.search_runs([client.get_experiment_by_name("ml1m-partial").experiment_id])
    assert {"valid/click/auc", "valid/rating5/auc", "test/rating5/auc", "train/bce/rating5"} <= set(run.data.metrics)
    assert run.data.tags["tasks"] == "click,rating5"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("finetune_*.yaml")), ids=lambda p: p.stem)
def test_every_example_config_loads_and_builds_its_model(path, prepared_ratings, prepared_last_item):
    """Example configs are checked against ML-100K's feature maps (ml-1m-partial has the same features)."""
    cfg = load_config(FinetuneConfig, path)
    prepared = prepared_last_item if "last_item" in path.name else prepared_ratings
    assert Path(cfg.data).name == ("last-item" if "last_item" in path.name else "ratings")
    model = build_model(cfg, prepared.feature_map)
    assert model.task_names == tuple(cfg.task_names)
    assert model.spec.max_len == cfg.train.max_history
    with torch.no_grad():
        converter = CTRBatchConverter(prepared, "ctr_test", max_history=cfg.train.max_history,
                                      fields=list(model.spec.kjt_keys), task_names=cfg.task_names)
        logits = model.eval()(converter.__getitems__(list(range(4))))
    assert logits.shape == (4, len(cfg.task_names))


def test_prepare_model_runs_before_the_optimizers(prepared_ratings_dir, tmp_path):
    """The seam for the transfer adapters: the hook gets the built ranker and the feature map; a table it
    freezes gets no in-backward optimizer and is bit-identical in the checkpoints; its report is kept."""
    cfg = load_config(FinetuneConfig, TINY, [f"data={prepared_ratings_dir}", f"out={tmp_path / 'o'}",
                                             "train.max_steps=12", "train.eval_every=6",
                                             "train.optim.sparse_optimizer=adam",
                                             f"tracking.tracking_uri={_store(tmp_path)}"])
    seen = {}

    def freeze_items(model, feature_map):
        weight = model.input.features.ec.embeddings["t_item_id"].weight
        seen["before"] = weight.detach().clone()
        seen["optimizer_attached"] = hasattr(weight, "_in_backward_optimizers")
        seen["items"] = feature_map.vocab_sizes()["item_id"]
        with torch.no_grad():
            weight.fill_(0.01)                                           # "load" pretrained values
        weight.requires_grad_(False)
        return {"frozen": ["t_item_id"], "loaded": ["t_item_id"]}

    result = run_finetune(cfg, prepare_model=freeze_items, strategy="st_sf")
    assert seen["optimizer_attached"] is False and seen["items"] == seen["before"].shape[0]
    model, _ = load_finetuned(result["last_checkpoint"])
    item = model.input.features.ec.embeddings["t_item_id"].weight
    assert torch.equal(item, torch.full_like(item, 0.01))                # loaded, then never updated
    initial = build_model(cfg, FeatureMap.load(tmp_path / "o" / "feature_map.json"))  # same seed, same init
    user = model.input.features.ec.embeddings["t_user_id"].weight
    assert not torch.equal(user, initial.input.features.ec.embeddings["t_user_id"].weight)  # trained
    assert json.loads((tmp_path / "o" / "transfer_report.json").read_text())["frozen"] == ["t_item_id"]
    client = MlflowClient(_store(tmp_path))
    [run] = client.search_runs([client.get_experiment_by_name("finetune-tiny").experiment_id])
    assert run.data.tags["strategy"] == "st_sf"
    assert "transfer_report.json" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_data_without_a_validation_split_is_refused(ml100k, tmp_path, capsys):
    """Fine-tuning selects on validation: data prepared with validation_share=0 (or by an older version, with
    no ctr_valid table) gets one line naming the directory, and nothing is written."""
    from hybrid.data.protocols import ProtocolConfig, prepare
    from hybrid.data.store import save_prepared

    bare = save_prepared(prepare(ml100k, ProtocolConfig(protocol="ratings", validation_share=0.0)), tmp_path / "d")
    common = ["finetune", "--config", TINY, "--set", f"out={tmp_path / 'o'}", "--tracking-uri", _store(tmp_path)]
    err = refused([*common, "--set", f"data={bare}"], capsys)
    assert f"{bare}: the prepared data has no validation samples (ctr_valid)" in err
    assert "protocol.validation_share > 0" in err
    (bare / "ctr_valid.parquet").unlink()   # as an older version wrote it: no table, no stats entry
    stats = json.loads((bare / "stats.json").read_text())
    stats.pop("ctr_valid", None)
    (bare / "stats.json").write_text(json.dumps(stats))
    err = refused([*common, "--set", f"data={bare}"], capsys)
    assert "ctr_valid.parquet: missing from the prepared data directory (prepared by an older version" in err
    assert not (tmp_path / "o").exists()


def test_a_redirected_log_gets_plain_progress_lines(prepared_ratings_dir, tmp_path):
    """Output to a file or pipe (not a terminal): no tqdm carriage-return frames, one line per log step."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "hybrid", "finetune", "--config", str(TINY), "--set", f"data={prepared_ratings_dir}",
         "--set", f"out={tmp_path / 'o'}", "--set", "train.max_steps=20", "--set", "train.log_every=10",
         "--set", "train.eval_every=10", "--set", "train.progress=true", "--tracking-uri", _store(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "\r" not in done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("finetune step ")]
    assert [line.split(" (")[0] for line in lines] == ["finetune step 10/20", "finetune step 20/20"]
    assert "loss" in lines[0] and "train AUC" in lines[0] and "samples/s" in lines[0]
