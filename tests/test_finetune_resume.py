"""``finetune --resume`` (issue 17.7): a fine-tuning run continued from its ``last/`` checkpoint equals an
uninterrupted run — the same weights, bit for bit, and the same validation curve and best step — whether it
stopped at a periodic checkpoint (a crash) or on a signal; and the job refuses what it cannot continue."""
from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import pytest
import torch
from adapters_support import single_thread

from hybrid.core.checkpoint import latest_checkpoint, read_manifest
from hybrid.core.errors import CheckpointError, TrainingInterrupted
from hybrid.core.training import OptimConfig
from hybrid.ctr_models import build_ranker
from hybrid.ctr_models.trainer import BEST, LAST, CTRTrainConfig, prepare_for_training, train
from hybrid.data.batching import CTRBatchConverter, make_loader

H = 10
CONFIG = {"features": {"embedding_dim": 8, "max_len": H, "pad_impl": "fbgemm"}, "history": {"attention_hidden": [16]},
          "num_cross_layers": 1, "deep_hidden": [32], "dropout": 0.2}   # dropout: the RNG state must resume too
CFG = CTRTrainConfig(epochs=2, batch_size=256, eval_batch_size=2048, eval_every=10, max_history=H, log_every=5,
                     progress=False, checkpoints_per_epoch=2,
                     optim=OptimConfig(lr=3e-3, warmup_steps=5, schedule="cosine", sparse_optimizer="adagrad",
                                       sparse_lr=0.05))


@pytest.fixture(scope="module")
def sample(prepared_ratings):
    """4,000 / 1,500 / 1,500 rows of ML-100K's protocol-B splits: 16 steps per epoch."""
    return dataclasses.replace(
        prepared_ratings,
        ctr_train=prepared_ratings.ctr_train.sample(4000, random_state=1).reset_index(drop=True),
        ctr_valid=prepared_ratings.ctr_valid.sample(1500, random_state=1).reset_index(drop=True),
        ctr_test=prepared_ratings.ctr_test.sample(1500, random_state=1).reset_index(drop=True))


def _run(prepared, checkpoint_dir: Path, *, resume_from=None, on_step=None):
    """One training call on a freshly built model (same seed) and fresh loaders; returns (result, model)."""
    torch.manual_seed(0)
    model = build_ranker("dcn_v2", CONFIG, prepared.feature_map.vocab_sizes(), ("click",))
    model = prepare_for_training(model, CFG.optim)
    fields = list(model.spec.kjt_keys)

    def loader(split, shuffle):
        return make_loader(CTRBatchConverter(prepared, split, max_history=H, fields=fields, task_names=("click",)),
                           CFG.batch_size if shuffle else CFG.eval_batch_size, shuffle=shuffle, seed=CFG.seed)

    def log(metrics, step, epoch):
        if on_step is not None:
            on_step(step)

    result = train(model, loader("ctr_train", True), loader("ctr_valid", False), CFG, checkpoint_dir=checkpoint_dir,
                   manifest={"note": "test"}, log_metrics=log, test_loader=loader("ctr_test", False),
                   resume_from=resume_from)
    return result, model


def _figures(result):
    """Everything a run reports except wall-clock speeds."""
    return ([(e.step, e.epoch, {k: v for k, v in e.metrics.items() if not k.startswith("perf/")},
              {k: v for k, v in (e.test or {}).items() if not k.startswith("perf/")}) for e in result.evaluations],
            result.best.step, {k: v for k, v in result.summary().items()})


def _crash_at(step_to_crash: int):
    def on_step(step):
        if step == step_to_crash:
            raise RuntimeError("simulated crash")
    return on_step


@pytest.fixture(scope="module")
def uninterrupted(sample, tmp_path_factory):
    with single_thread():
        return _run(sample, tmp_path_factory.mktemp("whole"))


def _assert_same_run(resumed, model, uninterrupted):
    whole, whole_model = uninterrupted
    assert resumed.step == whole.step == 32
    assert _figures(resumed) == _figures(whole)
    ours, theirs = model.state_dict(), whole_model.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_resume_after_a_crash_continues_from_the_periodic_checkpoint_exactly(sample, uninterrupted, tmp_path):
    with single_thread():
        with pytest.raises(RuntimeError, match="simulated crash"):
            _run(sample, tmp_path, on_step=_crash_at(20))   # dies between the checkpoints of steps 16 and 24
        last = latest_checkpoint(tmp_path / LAST)
        manifest = read_manifest(last)
        assert last.name == "step-00000016" and manifest["best_step"] is not None
        assert [e["step"] for e in manifest["evaluations"]] == [10, 16]
        resumed, model = _run(sample, tmp_path, resume_from=last)
    _assert_same_run(resumed, model, uninterrupted)
    assert latest_checkpoint(tmp_path / BEST).name == f"step-{resumed.best.step:08d}"
    assert resumed.best_checkpoint == latest_checkpoint(tmp_path / BEST)


def test_resume_after_a_signal_continues_from_that_step_exactly(sample, uninterrupted, tmp_path):
    with single_thread():
        with pytest.raises(TrainingInterrupted) as stopped:
            _run(sample, tmp_path, on_step=lambda step: step == 25 and os.kill(os.getpid(), signal.SIGTERM))
        assert stopped.value.step == 25
        last = latest_checkpoint(tmp_path / LAST)
        assert last.name == "step-00000025"
        resumed, model = _run(sample, tmp_path, resume_from=last)
    _assert_same_run(resumed, model, uninterrupted)


def test_a_checkpoint_of_another_model_is_refused(sample, tmp_path):
    with single_thread():
        with pytest.raises(RuntimeError):
            _run(sample, tmp_path, on_step=_crash_at(20))
        last = latest_checkpoint(tmp_path / LAST)
        other = dict(CONFIG, deep_hidden=[16])
        torch.manual_seed(0)
        model = prepare_for_training(build_ranker("dcn_v2", other, sample.feature_map.vocab_sizes(), ("click",)),
                                     CFG.optim)
        loader = make_loader(CTRBatchConverter(sample, "ctr_train", max_history=H, fields=list(model.spec.kjt_keys),
                                               task_names=("click",)), CFG.batch_size, shuffle=True, seed=0)
        with pytest.raises(CheckpointError, match=r"cannot resume this run from it: model config differs in "
                                                  r"deep_hidden \(checkpoint \[32\] vs now \[16\]\)"):
            train(model, loader, None, CFG, checkpoint_dir=tmp_path, resume_from=last)
