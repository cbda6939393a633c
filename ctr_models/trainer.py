"""The CTR training loop: one readable function, the same code unsharded and under TorchRec sharding.

:func:`train` reads top to bottom::

    seed → steps and schedule → dense AdamW → for each epoch, for each batch:
        with autocast(precision):                               # fp32: no-op; bf16: the dense towers in bfloat16
            logits = model(batch).float()                       # [B, T], one column per task
        loss = Σ_t BCE_t(logits, labels) + Σ model.auxiliary_losses()
        loss.backward()                  # the tables update *here*, inside backward (fused optimizer)
        average dense grads across ranks # sharded only (as the pretraining trainer, see below)
        clip dense grads → AdamW step → schedule step
        every log_every: train metrics
        every eval_every steps of the epoch, at every epoch end and at the last step:
            AUC / logloss / gAUC per task on the whole validation split → if it improved: best checkpoint,
            and the same metrics on test (reported for the selected step, never used to select)
    final weights on test → last checkpoint → the one-epoch detector over the validation curve

Preparing a model (:func:`prepare_for_training`) is separate from building it: the caller builds the
ranker, may load and freeze pretrained tables (the transfer adapters do), and only then are the in-backward
optimizers attached — to the *trainable* tables only, so a frozen table gets none and stays bit-identical
— and the model sharded.

Sharded runs (``DistributedModelParallel``) call the inner ranker (``dmp.module(batch)``) as the
pretraining trainer does: its sharded tables still run their collective lookups, and the dense gradients
are averaged explicitly (``hybrid.core.training.average_dense_gradients``). ``batch_size`` is the global
batch: each of ``W`` ranks takes ``batch_size / W`` (the loader's job). Evaluation spreads the batches of a split
over the ranks and gathers every prediction, so each rank computes the same metrics on the *full* split
and takes the same best-checkpoint decision.

Checkpoints (``hybrid.core.checkpoint``, DCP + manifest): ``<checkpoint_dir>/best/step-…`` holds the weights at
the best validation evaluation (by the primary task's AUC); ``<checkpoint_dir>/last/step-…`` the whole training
state (``hybrid.core.resume.training_state``: weights, optimizer states, schedule, RNG) with the evaluations so far
in its manifest, written every ``checkpoints_per_epoch`` / ``checkpoint_every``, on SIGTERM / SIGINT and at the
end — so ``resume_from`` continues a run exactly: the same steps, weights and validation curve as an uninterrupted
run (only the first training-metrics window after the resume covers fewer steps).

This module imports ``hybrid.core``, torch and torchrec only — never the jobs, data or MLflow: metrics leave through a
plain callback ``log_metrics(metrics, step, epoch)`` and loaders come in as arguments.

Example:
    >>> from hybrid.ctr_models import build_ranker
    >>> cfg = CTRTrainConfig(epochs=3, batch_size=1024, eval_every=100)
    >>> model = prepare_for_training(build_ranker("dcn_v2", None, vocab_sizes, ("click",)), cfg.optim)
    >>> result = train(model, train_loader, eval_loader, cfg,                  # doctest: +SKIP
    ...                checkpoint_dir="runs/x/checkpoints", log_metrics=lambda m, step, epoch: print(step, epoch, m))
    >>> result.summary()["valid_best_auc"], result.summary()["test_auc"]      # doctest: +SKIP
    (0.7912, True)

(the loaders come from :func:`hybrid.data.batching.make_loader` over a prepared dataset: ``hybrid finetune``
wires them, and ``tests/test_ctr_trainer.py`` runs this loop.)
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from hybrid.core.batch import CTRBatch
from hybrid.core.checkpoint import latest_checkpoint, save_checkpoint, verify_checkpoint
from hybrid.core.errors import TrainingInterrupted
from hybrid.core.precision import Precision, autocast, check_precision, to_device
from hybrid.core.progress import MetricsCallback, Progress, ThroughputWindow, rank0_callback
from hybrid.core.resume import (
    MODEL_KEY,
    check_resumable,
    epoch_batches,
    restore_training_state,
    rng_neutral_iter,
    training_state,
)
from hybrid.core.tables import embedding_modules, is_table_key
from hybrid.core.training import (
    DEFAULT_SHARDING,
    DistributedContext,
    OptimConfig,
    StopSignals,
    apply_sparse_optimizer,
    average_dense_gradients,
    check_per_epoch,
    check_sharded_sparse_optimizer,
    dense_parameters,
    eval_rounds,
    make_dense_optimizer,
    per_epoch_positions,
    seed_everything,
    shard_model,
    unwrap_dmp,
)
from hybrid.ctr_models.base import Ranker
from hybrid.ctr_models.metrics import OneEpochDrop, auc, auc_standard_error, ctr_metrics, one_epoch_drop

BEST, LAST = "best", "last"
#: metric-name prefixes of the two evaluation splits: ``valid/auc`` selects, ``test/auc`` is only reported
VALID, TEST = "valid", "test"


@dataclass
class CTRTrainConfig:
    """How to train a CTR ranker.

    Args:
        epochs: passes over the training samples (>= 1; the one-epoch detector needs >= 2).
        batch_size: samples per optimizer step, *across all ranks* (each of ``W`` ranks takes
            ``batch_size / W``; must divide evenly).
        eval_batch_size: samples per evaluation batch (per rank).
        eval_every: also evaluate every this many steps *inside* each epoch (counted from the epoch's
            start, so every epoch is evaluated at the same fractional points); ``0``: only at epoch ends.
            Every epoch end and the last step are always evaluated.
        evals_per_epoch: instead of ``eval_every`` steps, evaluate this many times each epoch, evenly spaced
            (the last at the epoch's end; :func:`~hybrid.core.training.per_epoch_positions`); ``0``: use
            ``eval_every``.
        max_history: most recent history events per sample (the batches' and the ranker's window).
        seed: seeds model init, data order (with the epoch) and dropout.
        optim: dense AdamW + schedule + clipping and the tables' in-backward optimizer.
        log_every: push train metrics every this many steps.
        max_steps: stop after this many steps (the schedule then spans ``min(max_steps, epochs x steps per
            epoch)``); ``None``: train all ``epochs``.
        one_epoch_tolerance: AUC dip below the end-of-epoch-1 value that counts as the one-epoch drop
            (:func:`hybrid.ctr_models.metrics.detect_one_epoch_drop`). ``null`` (default): judged against the
            validation set's noise — ``one_epoch_z`` standard errors of its end-of-epoch-1 AUC
            (:func:`~hybrid.ctr_models.metrics.auc_standard_error`: ~0.02 on 500 samples, ~0.002 on 10^5).
        one_epoch_z: how many standard errors a dip must exceed when ``one_epoch_tolerance`` is ``null``.
        progress: show progress (rank 0 only): a tqdm bar on a terminal, one line per log step otherwise.
        num_workers: loader worker processes gathering training batches ahead of the step (prefetch;
            they share the memory-mapped tables); ``0``: in the training process.
        eval_max_users: evaluate on a seeded random subset of this many users of the validation and test
            splits (the same subset at every evaluation); ``null``: every user. For splits of ~10^6 users,
            where a full pass costs more than the training it checks.
        collective_timeout_s: seconds a collective (all-reduce, sharded lookup, checkpoint barrier) waits for
            the other ranks before this rank fails with one line (a hung or lost peer); ``null``: torch's
            default (30 min gloo, 10 min nccl). One process: unused.
        checkpoints_per_epoch: write the resumable ``last/`` checkpoint this many times each epoch, evenly
            spaced (the last at the epoch's end); ``0``: use ``checkpoint_every``. Default: at every epoch end.
        checkpoint_every: instead, every this many steps (``0`` with ``checkpoints_per_epoch: 0``: only on a
            signal and at the end).
        shard_tables: put the tables in TorchRec's ``DistributedModelParallel`` also in one process (a 1-rank
            process group; under ``torchrun`` they always are): FBGEMM's table-batched kernels, the table
            optimizer fused into the backward pass over the rows of the batch only. Unsharded, a table is an
            ``nn.Embedding`` weight with a dense gradient, stepped whole every step: at a 4.2M-row item table,
            sharding trains DCN-v2 about 10x faster (``bench/ctr_scale_throughput.py``). On CPU, FBGEMM's kernels
            take ``optim.sparse_optimizer`` adagrad, rowwise_adagrad or sgd (not adam).
        precision: ``fp32`` or ``bf16`` — bf16 runs the ranker's forward pass under bfloat16 autocast (the DCN-v2
            cross and deep layers, MoE experts and gates, TIN's attention and MLPs, a transformer backbone, the
            heads), training and evaluation alike; the tables, their optimizer states, the dense master weights
            and AdamW states, the logits the loss and the metrics read, and the BCE stay fp32
            (:mod:`hybrid.core.precision`). Meant for CUDA; on CPU it runs, usually slower.

    Example:
        >>> cfg = CTRTrainConfig(epochs=3, batch_size=1024, eval_every=100, optim=OptimConfig(lr=1e-3))
        >>> cfg.optim.sparse_optimizer, cfg.max_history          # tables: in-backward adagrad; 50-event history
        ('adagrad', 50)
    """

    epochs: int = 3
    batch_size: int = 1024
    eval_batch_size: int = 4096
    eval_every: int = 0
    evals_per_epoch: int = 0
    max_history: int = 50
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    log_every: int = 50
    max_steps: int | None = None
    one_epoch_tolerance: float | None = None
    one_epoch_z: float = 1.0
    progress: bool = True
    num_workers: int = 0
    eval_max_users: int | None = None
    collective_timeout_s: float | None = None
    checkpoints_per_epoch: int = 1
    checkpoint_every: int = 0
    shard_tables: bool = False
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.eval_max_users is not None and (not isinstance(self.eval_max_users, int)
                                                or isinstance(self.eval_max_users, bool) or self.eval_max_users < 1):
            raise ValueError(f"train.eval_max_users must be a positive integer or null, got {self.eval_max_users!r}")
        if not isinstance(self.num_workers, int) or isinstance(self.num_workers, bool) or self.num_workers < 0:
            raise ValueError(f"train.num_workers must be an integer >= 0, got {self.num_workers!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "max_history", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"train.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ValueError(f"train.eval_every must be >= 0 (0: only at epoch ends), got {self.eval_every!r}")
        check_per_epoch("evals_per_epoch", self.evals_per_epoch)
        check_per_epoch("checkpoints_per_epoch", self.checkpoints_per_epoch)
        if not isinstance(self.checkpoint_every, int) or isinstance(self.checkpoint_every, bool) \
                or self.checkpoint_every < 0:
            raise ValueError(f"train.checkpoint_every must be an integer >= 0, got {self.checkpoint_every!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"train.max_steps must be a positive integer or null, got {self.max_steps}")
        if self.one_epoch_tolerance is not None and self.one_epoch_tolerance < 0:
            raise ValueError(f"train.one_epoch_tolerance must be >= 0 or null, got {self.one_epoch_tolerance}")
        if self.one_epoch_z <= 0:
            raise ValueError(f"train.one_epoch_z must be > 0, got {self.one_epoch_z}")
        if self.collective_timeout_s is not None and not self.collective_timeout_s > 0:
            raise ValueError(f"train.collective_timeout_s must be > 0 seconds or null, got {self.collective_timeout_s!r}")


@dataclass
class Evaluation:
    """One validation evaluation: after ``step`` optimizer steps, at fractional ``epoch``.

    Args:
        metrics: the validation metrics as logged (``valid/auc``, ...).
        test: the test metrics at the same weights (``test/auc``, ...), computed only where they are
            reported: when this evaluation became the best on validation, and at the end.
    """

    step: int
    epoch: float
    metrics: dict[str, float]
    test: dict[str, float] | None = None

    @property
    def auc(self) -> float:
        return self.metrics[f"{VALID}/auc"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Evaluation:
        return cls(step=int(data["step"]), epoch=float(data["epoch"]), metrics=dict(data["metrics"]),
                   test=dict(data["test"]) if data.get("test") is not None else None)


@dataclass
class CTRTrainResult:
    """What :func:`train` returns.

    Args:
        metrics: the last validation evaluation (``valid/...``), the last train window (``train/...``,
            ``perf/...``) and the final test evaluation (``test/...``) when there is a test loader.
        step: optimizer steps done.
        epoch: fractional epoch reached.
        evaluations: every validation evaluation, in order.
        best: the evaluation with the highest primary-task validation AUC (``None`` without evaluations):
            the selected checkpoint; its ``test`` holds the test metrics at that step.
        final_test: the test metrics of the final weights (``None`` without a test loader).
        best_checkpoint, last_checkpoint: checkpoint directories (``None`` without a checkpoint dir).
        one_epoch: the one-epoch detector over the ``(epoch, valid/auc)`` curve.
    """

    metrics: dict[str, float]
    step: int
    epoch: float
    evaluations: list[Evaluation]
    best: Evaluation | None
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    one_epoch: OneEpochDrop
    final_test: dict[str, float] | None = None

    def curve(self) -> list[tuple[float, float]]:
        """``[(fractional epoch, validation AUC), ...]`` — the one-epoch picture."""
        return [(e.epoch, e.auc) for e in self.evaluations]

    def summary(self) -> dict[str, Any]:
        """The figures a run is reported by (BENCHMARKS.md); every name says its split.

        Validation (what selects): ``valid_auc_epoch1`` (the last evaluation at or before the end of epoch
        1), ``valid_best_auc`` / ``valid_best_logloss`` / ``valid_best_gauc`` (at the best evaluation, at
        ``best_epoch`` / ``best_step``), ``valid_final_auc`` / ``_logloss`` / ``_gauc`` (last evaluation),
        ``one_epoch_drop`` (bool) and ``one_epoch_auc_drop`` (end-of-epoch-1 AUC minus the lowest AUC after
        it; ``nan`` when undefined) with ``one_epoch_tolerance`` (the dip it had to exceed). Test (only
        reported): ``test_auc`` / ``test_logloss`` / ``test_gauc`` at the selected (best-validation) step,
        ``test_final_auc`` / ``_logloss`` / ``_gauc`` of the final weights (``nan`` without a test loader).
        And ``steps``, ``epochs``.
        """
        nan = float("nan")
        last = self.evaluations[-1].metrics if self.evaluations else {}
        best = self.best.metrics if self.best else {}
        test = (self.best.test if self.best else None) or {}
        final_test = self.final_test or {}
        out: dict[str, Any] = {
            "valid_auc_epoch1": self.one_epoch.boundary_auc,
            "valid_best_auc": best.get(f"{VALID}/auc", nan),
            "valid_best_logloss": best.get(f"{VALID}/logloss", nan),
            "valid_best_gauc": best.get(f"{VALID}/gauc", nan),
            "best_epoch": self.best.epoch if self.best else nan,
            "best_step": self.best.step if self.best else -1,
            "valid_final_auc": last.get(f"{VALID}/auc", nan),
            "valid_final_logloss": last.get(f"{VALID}/logloss", nan),
            "valid_final_gauc": last.get(f"{VALID}/gauc", nan),
            "one_epoch_drop": bool(self.one_epoch.flagged),
            "one_epoch_auc_drop": self.one_epoch.drop,
            "one_epoch_tolerance": self.one_epoch.tolerance,
        }
        for kind in ("auc", "logloss", "gauc"):
            out[f"test_{kind}"] = test.get(f"{TEST}/{kind}", nan)
        for kind in ("auc", "logloss", "gauc"):
            out[f"test_final_{kind}"] = final_test.get(f"{TEST}/{kind}", nan)
        out.update(steps=self.step, epochs=self.epoch)
        return out


# ---------------------------------------------------------------------------------------------- the model

def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``{"dense", "sparse", "backbone"}`` parameter counts of a ranker.

    ``dense``: every parameter outside the embedding tables; ``sparse``: the tables; ``backbone``: GPSD's
    "dense parameters" of the transformer backbone(s) (blocks + final norm, as the pretraining model
    counts them; 0 for a ranker without one) — the ``N`` of the scaling law. Works on a model whose tables
    are on the ``meta`` device (only shapes are read); call it before sharding (DMP replaces the tables).
    """
    table_params = {id(p) for m in embedding_modules(model) for p in m.parameters()}
    counts = {"dense": 0, "sparse": 0, "backbone": 0}
    for p in model.parameters():
        counts["sparse" if id(p) in table_params else "dense"] += p.numel()
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "backbone" and hasattr(module, "dense_parameter_count"):
            counts["backbone"] += module.dense_parameter_count()
    return counts


def prepare_for_training(model: Ranker, optim: OptimConfig, *, ctx: DistributedContext | None = None,
                         sharding_types: Mapping[str, str] | None = None, shard: bool | None = None) -> nn.Module:
    """Attach the tables' in-backward optimizer, then shard when distributed: the model :func:`train` takes.

    Only *trainable* table parameters get an optimizer: a table frozen beforehand (``requires_grad=False``,
    e.g. by a sparse-freeze transfer) gets none, so no fused update ever touches it.

    Args:
        model: a ranker; for a sharded run built with ``embedding_device="meta"`` (DMP materialises the
            tables on their shards).
        optim: its ``sparse_optimizer`` / ``sparse_lr`` are attached to the tables here.
        ctx: from ``hybrid.core.training.init_distributed`` (default: one CPU process, no sharding).
        sharding_types: table → sharding type (default :data:`DEFAULT_SHARDING`).
        shard: shard the tables (default: when distributed); ``True`` in one process needs a process group
            (``init_distributed(single_process_group=True)``): ``CTRTrainConfig.shard_tables``.

    Returns:
        ``model`` itself, or the ``DistributedModelParallel`` wrapping it.

    Raises:
        ValueError: sharding on CPU with ``optim.sparse_optimizer`` adam (FBGEMM's CPU kernels do not take it).
    """
    ctx = ctx or DistributedContext()
    shard = ctx.is_distributed if shard is None else shard
    if shard:
        check_sharded_sparse_optimizer(optim, ctx)
    if not shard:
        model = model.to(ctx.device)  # first: the optimizers then hold the parameters where they will live
    apply_sparse_optimizer(embedding_modules(model), optim)  # DMP reads these settings and fuses the update
    if not shard:
        return model
    return shard_model(model, ctx, sharding_types if sharding_types is not None else DEFAULT_SHARDING)


def unwrap(model: nn.Module) -> Ranker:
    """The :class:`~hybrid.ctr_models.base.Ranker` inside a ``DistributedModelParallel`` (or the model itself)."""
    return unwrap_dmp(model, Ranker)


def table_shapes(model: nn.Module) -> dict[str, list[int]]:
    """State-dict key → global ``[rows, dim]`` of every embedding table (sharded or not), for manifests."""
    return {k: list(v.size()) for k, v in model.state_dict().items() if is_table_key(k)}


def check_task_names(batch: CTRBatch, model: Ranker) -> None:
    """Raise ``ValueError`` unless the batch's label columns are the model's tasks, in the same order.

    The model's logit column ``t`` is trained against label column ``t``: a swapped order would silently
    train each head on the other task.
    """
    if tuple(batch.task_names) != tuple(model.task_names):
        raise ValueError(f"task order: the batch's labels are {list(batch.task_names)} but the model's heads "
                         f"are {list(model.task_names)}; build both with the same task_names, in order")


def bce_per_task(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of every task column; NaN labels (task absent for a sample) are skipped.

    Args:
        logits: ``[B, T]``.
        labels: ``[B, T]`` 0/1 or NaN.

    Returns:
        ``[T]`` losses (0 for a column with no label in the batch).

    Example:
        >>> bce_per_task(torch.zeros(2, 1), torch.tensor([[1.0], [0.0]]))
        tensor([0.6931])
    """
    if logits.shape != labels.shape:
        raise ValueError(f"logits {list(logits.shape)} and labels {list(labels.shape)} must have the same shape "
                         "[B, T]")
    known = ~torch.isnan(labels)
    per = F.binary_cross_entropy_with_logits(logits, torch.where(known, labels, 0.0), reduction="none")
    known = known.to(per.dtype)
    return (per * known).sum(0) / known.sum(0).clamp(min=1.0)


# ---------------------------------------------------------------------------------------------- the loop

def train(
    model: nn.Module,
    train_loader: DataLoader,
    eval_loader: Iterable[CTRBatch] | None,
    cfg: CTRTrainConfig,
    *,
    ctx: DistributedContext | None = None,
    checkpoint_dir: str | Path | None = None,
    manifest: Mapping[str, Any] | None = None,
    log_metrics: MetricsCallback | None = None,
    test_loader: Iterable[CTRBatch] | None = None,
    resume_from: str | Path | None = None,
) -> CTRTrainResult:
    """Train ``model`` on ``train_loader``, select on ``eval_loader`` (validation), report on ``test_loader``.

    Args:
        model: from :func:`prepare_for_training` (plain ranker or ``DistributedModelParallel``).
        train_loader: a ``DataLoader`` of :class:`CTRBatch` whose ``batch_sampler`` has ``set_epoch(epoch)``
            (``hybrid.data.batching.make_loader(..., shuffle=True, seed=cfg.seed, num_replicas=W, rank=r)``).
            All ranks must yield the same number of batches.
        eval_loader: the whole **validation** split on every rank (ranks take turns over its batches and
            gather the predictions): every evaluation, the ``best`` checkpoint and the one-epoch detector use
            it. ``None``: no evaluation, no best checkpoint.
        test_loader: the whole test split on every rank, evaluated only where it is reported: each time the
            validation AUC reaches a new best (the test figures of the selected step) and once at the end
            (the final weights). Nothing is selected on it. ``None``: no test figures.
        cfg: the training settings.
        ctx: rank / world size / device (default: one CPU process).
        checkpoint_dir: where ``best/`` and ``last/`` go (``None``: no checkpoints).
        manifest: extra JSON-able facts stored in every checkpoint's manifest (config, feature map...).
        log_metrics: called on rank 0 as ``log_metrics(metrics, step, epoch)`` with ``train/loss``,
            ``train/bce/<task>``, ``train/<auxiliary loss>``, ``train/lr``, the ranker's diagnostics,
            ``perf/samples_per_s``, ``valid/auc`` ..., and ``test/auc`` ... at the steps where test is
            evaluated (see :func:`evaluate`); ``epoch`` is fractional.
        resume_from: a ``last/`` checkpoint of this run to continue from (verified; refused with one line
            when the model, world size or steps per epoch differ): weights, optimizer states, schedule, RNG,
            the evaluations so far and the best of them are restored, and training goes on from its step.

    Returns:
        :class:`CTRTrainResult`.

    Raises:
        ValueError: the batches' task columns differ from the model's (:func:`check_task_names`), or the
            loader is empty.
    """
    ctx = ctx or DistributedContext()
    core = unwrap(model)
    rank0 = ctx.rank == 0
    log = rank0_callback(log_metrics, ctx.rank)
    sampler = train_loader.batch_sampler
    if not hasattr(sampler, "set_epoch"):
        raise TypeError("train_loader.batch_sampler needs set_epoch(epoch) (use hybrid.data.batching.make_loader)")

    # 1. Seeds: dropout and anything else drawing from torch's global RNG (data order: the sampler's seed).
    seed_everything(cfg.seed)

    # 2. How long: the schedule spans the whole run.
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("the training loader yields no batches (too few samples for one batch per rank?)")
    total_steps = cfg.epochs * steps_per_epoch
    eval_points = per_epoch_positions(steps_per_epoch, cfg.evals_per_epoch)
    checkpoint_points = per_epoch_positions(steps_per_epoch, cfg.checkpoints_per_epoch)
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    # 3. Optimizers: the tables already carry their in-backward optimizer; AdamW + schedule for the rest.
    dense = dense_parameters(model)
    optimizer, schedule = make_dense_optimizer(model, cfg.optim, total_steps)

    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    manifest = dict(manifest or {})
    manifest.update(ranker=type(core).__name__, ranker_config=_jsonable(core.config),
                    task_names=list(core.task_names), tables=table_shapes(model), world_size=ctx.world_size,
                    steps_per_epoch=steps_per_epoch, train_config=dataclasses.asdict(cfg))

    # 4. Resume: weights, optimizer states, schedule, RNG, and the evaluations so far (the best among them).
    step, metrics = 0, {}
    evaluations: list[Evaluation] = []
    best: Evaluation | None = None
    best_path: Path | None = None
    if resume_from is not None:
        resume_from = Path(resume_from)
        saved = verify_checkpoint(resume_from)
        check_resumable(resume_from, saved, manifest, config_key="ranker_config")
        step, metrics = restore_training_state(resume_from, model, optimizer, schedule, rank=ctx.rank)
        metrics = {**saved.get("train_metrics", {}), **metrics}
        evaluations = [Evaluation.from_dict(e) for e in saved.get("evaluations", [])]
        best = next((e for e in evaluations if e.step == saved.get("best_step")), None)
        best_path = latest_checkpoint(checkpoint_dir / BEST) if checkpoint_dir is not None else None
    window = ThroughputWindow(unit="samples")
    window_scores: list[tuple[torch.Tensor, torch.Tensor]] = []  # primary-task (logits, labels) since the last log
    bar = Progress("finetune", total_steps, enabled=rank0 and cfg.progress, initial=step)
    saved_step = step
    core.train()

    def save_last(frac_epoch: float) -> Path:
        return _save_last(checkpoint_dir / LAST, step, frac_epoch, model, optimizer, schedule, ctx, manifest,
                          metrics, evaluations, best)

    with StopSignals(ctx) as stop:
        while step < total_steps:
            epoch, skip = divmod(step, steps_per_epoch)
            # the same batches, in the same order, as an uninterrupted run (skip: the ones a resumed run did)
            batches = rng_neutral_iter(epoch_batches(train_loader, epoch, skip=skip))
            for position, batch in enumerate(batches, start=skip + 1):
                batch = to_device(batch, ctx.device)  # non-blocking from pinned memory on CUDA
                if step == 0:
                    check_task_names(batch, core)

                # 4. One step: the forward in cfg.precision (bf16: autocast of the dense towers), the logits and
                #    the BCE in fp32. backward() also applies the tables' optimizer (TorchRec's fused in-backward
                #    update), so only the dense parameters are left for AdamW.
                with autocast(cfg.precision, ctx.device):
                    logits = core(batch).float()
                    bce = bce_per_task(logits, batch.labels)
                auxiliary = core.auxiliary_losses()  # of this forward, already weighted; {} for most rankers
                loss = bce.sum() + sum(auxiliary.values(), torch.zeros((), device=bce.device))
                loss.backward()
                if ctx.is_distributed:
                    average_dense_gradients(dense, ctx.world_size)
                if cfg.optim.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(dense, cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                step += 1
                window.add({"loss": loss, **{f"bce/{t}": bce[i] for i, t in enumerate(core.task_names)},
                            **auxiliary}, batch.batch_size)
                window_scores.append((logits[:, 0].detach(), batch.labels[:, 0]))
                bar.update(1)

                # 5. Logging and evaluation, at step boundaries, identically on every rank.
                done = step >= total_steps
                frac_epoch = step / steps_per_epoch
                if step % cfg.log_every == 0 or done:
                    train_metrics = window.flush(ctx.world_size)
                    # AUC of the window's own training batches, beside the validation AUC: memorisation shows
                    # as train AUC rising while validation AUC stalls (the model moved during the window)
                    train_metrics["train/auc"] = _window_auc(window_scores, ctx)
                    window_scores.clear()
                    train_metrics["train/lr"] = optimizer.param_groups[0]["lr"]
                    train_metrics.update(core.logging_metrics())  # diagnostics of the last forward
                    metrics.update(train_metrics)
                    bar.log(step, frac_epoch, {"loss": f"{train_metrics['train/loss']:.4f}",
                                               "train AUC": f"{train_metrics['train/auc']:.4f}",
                                               "samples/s": f"{train_metrics['perf/samples_per_s']:,.0f}"})
                    log(train_metrics, step, frac_epoch)
                epoch_end = position == steps_per_epoch
                in_epoch = (position in eval_points if cfg.evals_per_epoch
                            else bool(cfg.eval_every) and position % cfg.eval_every == 0)
                if eval_loader is not None and (in_epoch or epoch_end or done):
                    with window.paused():
                        eval_metrics = evaluate(model, eval_loader, ctx=ctx, split=VALID, precision=cfg.precision)
                        evaluation = Evaluation(step, frac_epoch, eval_metrics)
                        evaluations.append(evaluation)
                        metrics.update(eval_metrics)
                        log(eval_metrics, step, frac_epoch)
                        if best is None or _better(evaluation.auc, best.auc):
                            best = evaluation
                            # the test figures of the selected step: measured here, never used to select
                            if test_loader is not None:
                                best.test = evaluate(model, test_loader, ctx=ctx, split=TEST,
                                                     precision=cfg.precision)
                                log(best.test, step, frac_epoch)
                            if checkpoint_dir is not None:
                                best_path = _save(checkpoint_dir / BEST, model, evaluation, manifest)
                    core.train()
                due_checkpoint = (position in checkpoint_points if cfg.checkpoints_per_epoch
                                  else bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0)
                if checkpoint_dir is not None and due_checkpoint and not done:
                    with window.paused():
                        save_last(frac_epoch)
                    saved_step = step
                if done:
                    break
                signum = stop.requested()
                if signum is not None:  # SIGTERM / SIGINT: stop here, the training state of this step in last/
                    last_path = None
                    if checkpoint_dir is not None:
                        last_path = save_last(frac_epoch) if saved_step != step else latest_checkpoint(
                            checkpoint_dir / LAST)
                    bar.close()
                    raise TrainingInterrupted(signum, step, last_path)
            if done:
                break
    bar.close()

    # 6. The final weights on test (already measured when the last evaluation was the best).
    final_test = None
    if test_loader is not None:
        if evaluations and evaluations[-1] is best:  # the last evaluation (at the last step) is the best
            final_test = best.test
        else:
            final_test = evaluate(model, test_loader, ctx=ctx, split=TEST, precision=cfg.precision)
            log(final_test, step, step / steps_per_epoch)
        metrics.update(final_test)

    last_path = None
    if checkpoint_dir is not None:
        last_path = save_last(step / steps_per_epoch)
    # 7. The one-epoch phenomenon: does validation AUC fall after the first epoch boundary by more than the
    #    validation set's noise (or the configured tolerance)?
    drop = one_epoch_drop([(e.epoch, e.auc) for e in evaluations], tolerance=one_epoch_tolerance(cfg, evaluations))
    return CTRTrainResult(metrics=metrics, step=step, epoch=step / steps_per_epoch, evaluations=evaluations,
                          best=best, best_checkpoint=best_path, last_checkpoint=last_path, one_epoch=drop,
                          final_test=final_test)


def _window_auc(scores: Sequence[tuple[torch.Tensor, torch.Tensor]], ctx: DistributedContext) -> float:
    """Primary-task AUC over the (logits, labels) of a log window, gathered from every rank."""
    logits = torch.cat([s for s, _ in scores]).float().cpu().numpy() if scores else np.zeros(0, np.float32)
    labels = torch.cat([y for _, y in scores]).float().cpu().numpy() if scores else np.zeros(0, np.float32)
    if ctx.is_distributed:
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, (labels, logits))
        labels, logits = np.concatenate([g[0] for g in gathered]), np.concatenate([g[1] for g in gathered])
    known = ~np.isnan(labels)
    return auc(labels[known], logits[known])


def one_epoch_tolerance(cfg: CTRTrainConfig, evaluations: Sequence[Evaluation]) -> float:
    """The dip the one-epoch detector must see: ``cfg.one_epoch_tolerance``, else ``cfg.one_epoch_z`` standard
    errors of the end-of-epoch-1 validation AUC on the validation set's positives and negatives."""
    if cfg.one_epoch_tolerance is not None:
        return cfg.one_epoch_tolerance
    # the detector's own reference evaluation (one rule: metrics.one_epoch_drop picks it)
    ref_epoch = one_epoch_drop([(e.epoch, e.auc) for e in evaluations], tolerance=0.0).boundary_epoch
    found = [e for e in evaluations if e.epoch == ref_epoch]
    if not found:
        return 0.0  # nothing to compare against: the detector flags nothing anyway
    ref = found[-1].metrics
    positives = int(ref.get(f"{VALID}/positives", 0))
    se = auc_standard_error(ref[f"{VALID}/auc"], positives, int(ref.get(f"{VALID}/samples", 0)) - positives)
    return cfg.one_epoch_z * se if not math.isnan(se) else 0.0


def _better(auc: float, best_auc: float) -> bool:
    """Strictly higher AUC; a NaN AUC (single-class test set) never replaces a real one."""
    if math.isnan(auc):
        return False
    return math.isnan(best_auc) or auc > best_auc


def _save(root: Path, model: nn.Module, evaluation: Evaluation, manifest: Mapping[str, Any]) -> Path:
    """A ``best/`` checkpoint: the weights of ``evaluation``'s step, its validation and test figures."""
    facts = {**manifest, "epoch": evaluation.epoch, "metrics": {**evaluation.metrics, **(evaluation.test or {})}}
    return save_checkpoint(root, evaluation.step, {MODEL_KEY: model.state_dict()}, facts, keep_last=1)


def _save_last(root: Path, step: int, epoch: float, model: nn.Module, optimizer, schedule, ctx: DistributedContext,
               manifest: Mapping[str, Any], metrics: Mapping[str, float], evaluations: Sequence[Evaluation],
               best: Evaluation | None) -> Path:
    """A ``last/`` checkpoint: the whole training state at ``step`` and the evaluations so far (resumable).

    Its ``metrics`` are those of the last evaluation (and test at it, when measured), as a ``best/`` one's."""
    last = evaluations[-1] if evaluations else None
    facts = {**manifest, "epoch": epoch, "train_metrics": {k: v for k, v in metrics.items() if k.startswith("train/")},
             "metrics": {**last.metrics, **(last.test or {})} if last else {},
             "evaluations": [e.to_dict() for e in evaluations], "best_step": best.step if best else None}
    state = training_state(model, optimizer, schedule, rank=ctx.rank)
    return save_checkpoint(root, step, state, facts, keep_last=1)


def _jsonable(config: Any) -> Any:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config


# ---------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def predict(model: nn.Module, loader: Iterable[CTRBatch], *, ctx: DistributedContext | None = None,
            precision: str = "fp32") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits of every sample of ``loader``, with their labels and users (gathered from all ranks).

    Every rank iterates the whole ``loader``; rank ``r`` scores batches ``r, r + W, ...``. Sharded lookups
    are collective, so a rank with fewer batches repeats one and discards the result
    (``hybrid.core.training.eval_rounds``). The model is left in eval mode. ``precision``
    (``train.precision``): that of the forward pass; the logits come back as fp32.

    Returns:
        ``(labels [N, T], logits [N, T], user_index [N])`` numpy arrays, every sample once (sharded runs:
        grouped by rank, not in loader order).
    """
    ctx = ctx or DistributedContext()
    core = unwrap(model)
    core.eval()
    labels, logits, users = [], [], []
    for _, batch, keep in eval_rounds(loader, ctx):
        check_task_names(batch, core)
        batch = to_device(batch, ctx.device)
        with autocast(precision, ctx.device):
            scores = core(batch)  # a filler round (not keep) only keeps the collective lookups in step
        if not keep:
            continue
        logits.append(scores.float().cpu().numpy())
        labels.append(batch.labels.cpu().numpy())
        users.append(batch.user_index.cpu().numpy())
    T = len(core.task_names)
    out = (np.concatenate(labels) if labels else np.zeros((0, T), np.float32),
           np.concatenate(logits) if logits else np.zeros((0, T), np.float32),
           np.concatenate(users) if users else np.zeros(0, np.int64))
    if ctx.is_distributed:
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, out)
        out = tuple(np.concatenate([g[k] for g in gathered]) for k in range(3))  # type: ignore[assignment]
    return out


def evaluate(model: nn.Module, loader: Iterable[CTRBatch], *, ctx: DistributedContext | None = None,
             split: str = VALID, precision: str = "fp32") -> dict[str, float]:
    """AUC, logloss and gAUC of every task on the whole ``loader`` (``hybrid.ctr_models.metrics.ctr_metrics``).

    Args:
        model, loader, ctx: as in :func:`train`.
        split: the name the metrics carry: ``valid`` or ``test``.
        precision: of the forward pass (``train.precision``; :func:`predict`).

    Returns:
        ``<split>/auc``, ``<split>/logloss``, ``<split>/gauc`` (the primary task = the model's first task),
        ``<split>/<task>/auc``, ``<split>/<task>/logloss``, ``<split>/<task>/gauc`` for every task,
        ``<split>/samples`` and ``perf/<split>_samples_per_s``. The same on every rank.
    """
    core = unwrap(model)
    started = time.perf_counter()
    labels, logits, users = predict(model, loader, ctx=ctx, precision=precision)
    seconds = time.perf_counter() - started
    per_task = ctr_metrics(labels, logits, users, core.task_names)
    primary = core.task_names[0]
    out = {f"{split}/{name}": value for name, value in per_task.items()}
    for kind in ("auc", "logloss", "gauc"):
        out[f"{split}/{kind}"] = per_task[f"{primary}/{kind}"]
    out[f"{split}/samples"] = float(len(users))
    known = labels[:, 0][~np.isnan(labels[:, 0])]  # the primary task's positives: the AUC's standard error
    out[f"{split}/positives"] = float((known > 0.5).sum())
    out[f"perf/{split}_samples_per_s"] = len(users) / max(seconds, 1e-9)
    return out
