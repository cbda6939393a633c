"""The CTR training loop on real ML-100K (protocol B): learning, evaluation schedule, checkpoints, one-epoch
detector, task order, frozen tables, and the sharded path (2 processes)."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from torchrun_support import run_torchrun

from hybrid.core.checkpoint import latest_checkpoint, load_checkpoint, read_manifest
from hybrid.core.training import OptimConfig
from hybrid.ctr_models import build_ranker
from hybrid.ctr_models.metrics import auc_standard_error, one_epoch_drop
from hybrid.ctr_models.trainer import (
    BEST,
    LAST,
    CTRTrainConfig,
    Evaluation,
    bce_per_task,
    evaluate,
    one_epoch_tolerance,
    parameter_counts,
    prepare_for_training,
    train,
)
from hybrid.data.batching import CTRBatchConverter, make_loader
from hybrid.data.store import load_prepared
from hybrid.jobs.finetune import load_finetuned

REPO = Path(__file__).resolve().parents[1]
H = 20  # history window of every test model
SMALL = {  # small but real configurations of every ranker
    "dcn_v2": {"features": {"embedding_dim": 16}, "history": {"attention_hidden": [32]}, "num_cross_layers": 2,
               "deep_hidden": [64, 32]},
    "mmoe": {"features": {"embedding_dim": 16}, "history": {"attention_hidden": [32]}, "num_experts": 3,
             "expert_hidden": [64, 32], "tower_hidden": [16]},
    "multi_embedding_moe": {"features": {"embedding_dim": 8}, "history": {"attention_hidden": [16]}, "num_experts": 2,
                            "expert_hidden": [32], "tower_hidden": [16]},
    "tin": {"features": {"embedding_dim": 16}, "mlp_hidden": [64, 32]},
    "gpsd": {"features": {"embedding_dim": 16},
             "backbone": {"num_layers": 1, "dim": 16, "num_heads": 2, "max_len": H + 1}},
}
FAST = OptimConfig(lr=3e-3, warmup_steps=0, schedule="constant", sparse_optimizer="adagrad", sparse_lr=0.05)


def make_model(prepared, name="dcn_v2", tasks=("click",), seed=0):
    torch.manual_seed(seed)
    # fbgemm jagged→padded: the same values as the default gather, several times faster backward on CPU
    config = {**SMALL[name], "features": {**SMALL[name]["features"], "max_len": H, "pad_impl": "fbgemm"}}
    return build_ranker(name, config, prepared.feature_map.vocab_sizes(), tasks)


def loaders(prepared, model, cfg, tasks=("click",)):
    fields = list(model.spec.kjt_keys)
    train_loader = make_loader(CTRBatchConverter(prepared, "ctr_train", max_history=H, fields=fields,
                                                 task_names=tasks), cfg.batch_size, shuffle=True, seed=cfg.seed)
    valid_loader = split_loader(prepared, model, cfg, "ctr_valid", tasks)
    return train_loader, valid_loader


def split_loader(prepared, model, cfg, split, tasks=("click",)):
    return make_loader(CTRBatchConverter(prepared, split, max_history=H, fields=list(model.spec.kjt_keys),
                                         task_names=tasks), cfg.eval_batch_size, shuffle=False)


@pytest.fixture(scope="module")
def small_ratings(prepared_ratings):
    """A random 6,000 / 3,000 / 3,000 sample of ML-100K's protocol-B train / validation / test splits."""
    return dataclasses.replace(
        prepared_ratings,
        ctr_train=prepared_ratings.ctr_train.sample(6000, random_state=0).reset_index(drop=True),
        ctr_valid=prepared_ratings.ctr_valid.sample(3000, random_state=0).reset_index(drop=True),
        ctr_test=prepared_ratings.ctr_test.sample(3000, random_state=0).reset_index(drop=True))


# --------------------------------------------------------------------------------------------- learning

@pytest.mark.parametrize("name", ["dcn_v2", "mmoe", "multi_embedding_moe", "tin", "gpsd"])
def test_every_ranker_learns_on_ml100k(prepared_ratings, name):
    """60 steps of 512 samples (0.4 epoch, seconds): test AUC well above chance (~0.74 measured for all five;
    an item-popularity-free random model sits at 0.5), and the train loss falls."""
    tasks = ("click", "rating5") if name == "mmoe" else ("click",)
    model = make_model(prepared_ratings, name, tasks)
    cfg = CTRTrainConfig(epochs=1, batch_size=512, max_steps=60, max_history=H, log_every=10, optim=FAST,
                         progress=False)
    model = prepare_for_training(model, cfg.optim)
    logged = []
    result = train(model, *loaders(prepared_ratings, model, cfg, tasks), cfg,
                   log_metrics=lambda m, step, epoch: logged.append((step, m)))
    losses = [m["train/loss"] for _, m in logged if "train/loss" in m]
    assert losses[-1] < losses[0] - 0.05
    train_aucs = [m["train/auc"] for _, m in logged if "train/loss" in m]  # logged with every train window
    assert len(train_aucs) == len(losses) and train_aucs[-1] > 0.65
    final = result.evaluations[-1].metrics
    assert final["valid/auc"] > 0.70 and final["valid/gauc"] > 0.65, final
    assert final["valid/samples"] == len(prepared_ratings.ctr_valid)
    if name == "mmoe":
        assert final["valid/rating5/auc"] > 0.70 and final["valid/auc"] == final["valid/click/auc"]
        assert any("moe/cross_expert_corr" in m for _, m in logged)     # the ranker's diagnostics
    if name == "multi_embedding_moe":
        assert any("train/decorrelation" in m for _, m in logged)  # the auxiliary loss is in the step
    assert result.metrics["perf/samples_per_s"] > 0


# --------------------------------------------------------------------------------------------- schedule

def test_eval_every_n_steps_inside_each_epoch_and_at_epoch_ends(small_ratings):
    """6,000 samples / 512 = 12 steps per epoch; eval_every=5 → positions 5, 10 and the end (12) of each epoch."""
    model = make_model(small_ratings)
    cfg = CTRTrainConfig(epochs=2, batch_size=512, eval_batch_size=1024, eval_every=5, max_history=H, log_every=4,
                         optim=FAST, progress=False)
    model = prepare_for_training(model, cfg.optim)
    calls = []
    result = train(model, *loaders(small_ratings, model, cfg), cfg,
                   log_metrics=lambda m, step, epoch: calls.append((step, epoch, m)))
    evals = [(step, epoch) for step, epoch, m in calls if "valid/auc" in m]
    assert [s for s, _ in evals] == [5, 10, 12, 17, 22, 24]
    assert [e for _, e in evals] == pytest.approx([5 / 12, 10 / 12, 1.0, 17 / 12, 22 / 12, 2.0])
    assert [(e.step, e.epoch) for e in result.evaluations] == evals
    trains = [step for step, _, m in calls if "train/loss" in m]
    assert trains == [4, 8, 12, 16, 20, 24]                           # log_every, and the last step
    assert all(epoch == pytest.approx(step / 12) for step, epoch, _ in calls)
    assert result.step == 24 and result.epoch == 2.0
    # the one-epoch detector reads exactly this curve
    assert result.one_epoch == one_epoch_drop(result.curve(), tolerance=one_epoch_tolerance(cfg, result.evaluations))
    assert result.summary()["valid_auc_epoch1"] == result.evaluations[2].auc


def test_max_steps_stops_mid_epoch_and_evaluates_there(small_ratings):
    model = make_model(small_ratings)
    cfg = CTRTrainConfig(epochs=3, batch_size=512, eval_batch_size=1024, max_steps=7, max_history=H, optim=FAST,
                         progress=False)
    model = prepare_for_training(model, cfg.optim)
    result = train(model, *loaders(small_ratings, model, cfg), cfg)
    assert result.step == 7 and [e.step for e in result.evaluations] == [7]
    assert not result.one_epoch.flagged and result.summary()["valid_auc_epoch1"] == result.evaluations[0].auc


# --------------------------------------------------------------------------------------------- checkpoints

def test_best_checkpoint_holds_the_weights_of_the_best_evaluation(small_ratings, tmp_path):
    """Reloaded into a fresh model, the best checkpoint re-evaluates to exactly the best AUC; the last one
    holds the final weights."""
    model = make_model(small_ratings, "tin")
    cfg = CTRTrainConfig(epochs=3, batch_size=256, eval_batch_size=1024, eval_every=8, max_history=H,
                         optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", sparse_optimizer="adam",
                                           sparse_lr=1e-2), progress=False)
    model = prepare_for_training(model, cfg.optim)
    train_loader, eval_loader = loaders(small_ratings, model, cfg)
    result = train(model, train_loader, eval_loader, cfg, checkpoint_dir=tmp_path,
                   manifest={"note": "test"})
    best = max(result.evaluations, key=lambda e: e.auc)
    assert result.best is best and result.summary()["valid_best_auc"] == best.auc
    assert result.best_checkpoint == latest_checkpoint(tmp_path / BEST)
    assert result.best_checkpoint.name == f"step-{best.step:08d}"
    assert len(list((tmp_path / BEST).glob("step-*"))) == 1          # only the best is kept

    fresh = make_model(small_ratings, "tin", seed=123)                # different init: the load must matter
    state = {"model": fresh.state_dict()}
    manifest = load_checkpoint(result.best_checkpoint, state)
    fresh.load_state_dict(state["model"])
    assert evaluate(fresh, eval_loader)["valid/auc"] == pytest.approx(best.auc, abs=1e-12)
    assert manifest["metrics"]["valid/auc"] == best.auc and manifest["epoch"] == best.epoch
    assert manifest["note"] == "test" and manifest["task_names"] == ["click"]
    assert manifest["tables"]["features.ec.embeddings.t_item_id.weight"] == [
        small_ratings.feature_map.vocab_sizes()["item_id"], 16]

    last = make_model(small_ratings, "tin", seed=123)
    state = {"model": last.state_dict()}
    load_checkpoint(result.last_checkpoint, state)
    for key, value in model.state_dict().items():
        assert torch.equal(state["model"][key], value), key
    assert read_manifest(result.last_checkpoint)["step"] == result.step
    assert (tmp_path / LAST).is_dir()


def test_test_split_is_reported_at_the_selected_step_and_never_selects(small_ratings, tmp_path):
    """Validation selects; test is evaluated at each new best validation step and at the end, and reads the
    same as re-evaluating the saved checkpoints. With or without a test loader, training and selection are
    identical."""
    cfg = CTRTrainConfig(epochs=2, batch_size=512, eval_batch_size=1024, eval_every=4, max_history=H, optim=FAST,
                         progress=False)
    calls = []
    model = prepare_for_training(make_model(small_ratings), cfg.optim)
    test_loader = split_loader(small_ratings, model, cfg, "ctr_test")
    with_test = train(model, *loaders(small_ratings, model, cfg), cfg, checkpoint_dir=tmp_path,
                      test_loader=test_loader, log_metrics=lambda m, step, epoch: calls.append((step, m)))
    other = prepare_for_training(make_model(small_ratings), cfg.optim)
    without = train(other, *loaders(small_ratings, other, cfg), cfg)
    assert [(e.step, e.auc) for e in with_test.evaluations] == [(e.step, e.auc) for e in without.evaluations]
    assert with_test.best.step == without.best.step

    improved, best = [], float("-inf")
    for e in with_test.evaluations:
        if e.auc > best:
            improved.append(e.step)
            best = e.auc
    final = [with_test.step] if with_test.evaluations[-1] is not with_test.best else []
    assert [step for step, m in calls if "test/auc" in m] == improved + final
    summary = with_test.summary()
    fresh = make_model(small_ratings, seed=9)
    state = {"model": fresh.state_dict()}
    manifest = load_checkpoint(with_test.best_checkpoint, state)
    fresh.load_state_dict(state["model"])
    assert evaluate(fresh, test_loader, split="test")["test/auc"] == pytest.approx(summary["test_auc"], abs=1e-12)
    assert manifest["metrics"]["test/auc"] == summary["test_auc"]  # the best checkpoint says its test figure
    assert evaluate(model, test_loader, split="test")["test/auc"] == pytest.approx(summary["test_final_auc"],
                                                                                   abs=1e-12)
    assert summary["valid_best_auc"] == with_test.best.auc and math.isnan(without.summary()["test_auc"])


def test_adam_with_a_high_learning_rate_shows_the_one_epoch_drop(small_ratings):
    """Tables with Adam at a high LR memorise the 6,000 training samples in the first epoch: the test AUC
    falls after the epoch boundary, and the detector flags it (the measured drop is several points)."""
    model = make_model(small_ratings, "dcn_v2")
    cfg = CTRTrainConfig(epochs=3, batch_size=256, eval_batch_size=1024, eval_every=12, max_history=H,
                         optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", sparse_optimizer="adam",
                                           sparse_lr=3e-2), progress=False)
    model = prepare_for_training(model, cfg.optim)
    result = train(model, *loaders(small_ratings, model, cfg), cfg)
    drop = result.one_epoch
    assert drop.flagged and drop.drop > 0.01, result.curve()
    assert drop.boundary_epoch == 1.0 and drop.drop == pytest.approx(drop.boundary_auc - min(
        a for e, a in result.curve() if e > 1.0))
    # the dip is judged against the validation set's noise: one standard error of its end-of-epoch-1 AUC
    ref = next(e for e in result.evaluations if e.epoch == 1.0).metrics
    positives = ref["valid/positives"]
    assert 0 < positives < ref["valid/samples"] == len(small_ratings.ctr_valid)
    se = auc_standard_error(drop.boundary_auc, int(positives), int(ref["valid/samples"] - positives))
    assert drop.tolerance == pytest.approx(se) and 0.005 < se < 0.015    # 3,000 samples
    assert result.summary()["one_epoch_tolerance"] == drop.tolerance


def test_the_one_epoch_detector_judges_a_dip_against_the_validation_set_noise():
    """A 0.01 dip after epoch 1 is noise on 300 validation samples (SE ≈ 0.028: not flagged) and a drop on
    30,000 (SE ≈ 0.0028: flagged); a configured tolerance replaces the rule."""
    def evaluations(samples):
        metrics = lambda a: {"valid/auc": a, "valid/samples": samples, "valid/positives": samples / 2}  # noqa: E731
        return [Evaluation(10, 0.5, metrics(0.74)), Evaluation(20, 1.0, metrics(0.75)),
                Evaluation(30, 1.5, metrics(0.74)), Evaluation(40, 2.0, metrics(0.745))]

    cfg = CTRTrainConfig()
    for samples, flagged in ((300, False), (30_000, True)):
        evals = evaluations(samples)
        tolerance = one_epoch_tolerance(cfg, evals)
        assert tolerance == pytest.approx(auc_standard_error(0.75, samples // 2, samples // 2))
        assert one_epoch_drop([(e.epoch, e.auc) for e in evals], tolerance=tolerance).flagged is flagged
    assert one_epoch_tolerance(dataclasses.replace(cfg, one_epoch_z=2.0), evaluations(300)) == pytest.approx(
        2 * auc_standard_error(0.75, 150, 150))
    assert one_epoch_tolerance(dataclasses.replace(cfg, one_epoch_tolerance=1e-3), evaluations(300)) == 1e-3
    assert one_epoch_tolerance(cfg, evaluations(300)[2:]) == 0.0   # no evaluation before the boundary


# --------------------------------------------------------------------------------------------- contracts

def test_task_order_is_checked_against_the_batch(small_ratings):
    model = make_model(small_ratings, "mmoe", ("click", "rating5"))
    cfg = CTRTrainConfig(epochs=1, batch_size=512, max_steps=2, max_history=H, optim=FAST, progress=False)
    model = prepare_for_training(model, cfg.optim)
    swapped = loaders(small_ratings, model, cfg, tasks=("rating5", "click"))
    with pytest.raises(ValueError, match=r"batch's labels are \['rating5', 'click'\] but the model's heads are "
                                         r"\['click', 'rating5'\]"):
        train(model, *swapped, cfg)


def test_bce_skips_missing_labels():
    logits = torch.zeros(3, 2)
    labels = torch.tensor([[1.0, float("nan")], [0.0, float("nan")], [1.0, 1.0]])
    assert bce_per_task(logits, labels) == pytest.approx(torch.tensor([0.6931472, 0.6931472]))
    with pytest.raises(ValueError, match="same shape"):
        bce_per_task(logits, labels[:, :1])


def test_frozen_table_gets_no_optimizer_and_stays_bit_identical(small_ratings):
    """The seam the transfer adapters use: freeze before prepare_for_training → no in-backward optimizer."""
    model = make_model(small_ratings, "dcn_v2")
    item = model.input.features.ec.embeddings["t_item_id"].weight
    item.requires_grad_(False)
    before = item.detach().clone()
    user_before = model.input.features.ec.embeddings["t_user_id"].weight.detach().clone()
    counts = parameter_counts(model)
    assert counts["sparse"] == sum(p.numel() for n, p in model.named_parameters() if "embedding" in n)
    cfg = CTRTrainConfig(epochs=1, batch_size=512, max_steps=5, max_history=H,
                         optim=OptimConfig(lr=1e-2, sparse_optimizer="adam"), progress=False)
    model = prepare_for_training(model, cfg.optim)
    assert not hasattr(item, "_in_backward_optimizers")
    train(model, *loaders(small_ratings, model, cfg), cfg)
    assert torch.equal(item, before)
    assert not torch.equal(model.input.features.ec.embeddings["t_user_id"].weight, user_before)


def test_parameter_counts_split_tables_dense_and_backbone(prepared_ratings):
    dcn, gpsd = make_model(prepared_ratings, "dcn_v2"), make_model(prepared_ratings, "gpsd")
    for model in (dcn, gpsd):
        counts = parameter_counts(model)
        tables = sum(p.numel() for n, p in model.named_parameters() if ".embeddings.t_" in n
                     or ".embedding_bags.t_" in n)
        assert counts["sparse"] == tables and counts["dense"] + tables == sum(p.numel() for p in model.parameters())
    assert parameter_counts(dcn)["backbone"] == 0
    assert parameter_counts(gpsd)["backbone"] == gpsd.backbone.dense_parameter_count() > 0  # GPSD's N


# --------------------------------------------------------------------------------------------- sharded


@pytest.mark.slow
def test_two_process_sharded_run_learns_and_its_checkpoint_loads_unsharded(prepared_ratings_dir, tmp_path):
    """``torchrun --nproc_per_node=2 -m hybrid finetune``: DMP tables (row-wise item table), dense gradients
    averaged across ranks, evaluation gathered from both ranks; the best checkpoint (written by 2 ranks)
    loads into an unsharded model and re-evaluates to the logged AUC."""
    out = tmp_path / "out"
    args = ["-m", "hybrid", "finetune", "--config", REPO / "configs/finetune_tiny.yaml", "--set",
            f"data={prepared_ratings_dir}", "--set", f"out={out}", "--set", "train.max_steps=40", "--set",
            "train.eval_every=20", "--set", "train.epochs=1", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]

    def reset() -> None:
        shutil.rmtree(out, ignore_errors=True)
        (tmp_path / "mlflow.db").unlink(missing_ok=True)

    done = run_torchrun(args, timeout=600, cwd=REPO, reset=reset)
    assert done.returncode == 0, done.stderr[-6000:]
    result = json.loads((out / "result.json").read_text())
    assert result["valid_best_auc"] > 0.70 and result["test_auc"] > 0.70 and result["steps"] == 40
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("finetune-tiny").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["world_size"] == "2"  # only rank 0 logs
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "valid/auc")] == [20, 40]
    model, manifest = load_finetuned(result["best_checkpoint"])
    assert manifest["world_size"] == 2
    converter = CTRBatchConverter(load_prepared(prepared_ratings_dir), "ctr_test", max_history=20,
                                  fields=list(model.spec.kjt_keys))
    loader = make_loader(converter, 4096, shuffle=False)
    assert evaluate(model, loader, split="test")["test/auc"] == pytest.approx(result["test_auc"], abs=1e-6)
