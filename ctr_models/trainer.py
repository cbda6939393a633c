"""The CTR training loop: one readable function, the same code unsharded and under TorchRec sharding.

:func:`train` reads top to bottom::

    seed → steps and schedule → dense AdamW → for each epoch, for each batch:
        logits = model(batch)                                   # [B, T], one column per task
        loss = Σ_t BCE_t(logits, labels) + Σ model.auxiliary_losses()
        loss.backward()                  # the tables update *here*, inside backward (fused optimizer)
        average dense grads across ranks # sharded only (as the pretraining trainer, see below)
        clip dense grads → AdamW step → schedule step
        every log_every: train metrics
        every eval_every steps of the epoch, at every epoch end and at the last step:
            AUC / logloss / gAUC per task on the whole test split → best checkpoint if AUC improved
    last checkpoint → the one-epoch detector over the eval curve

Preparing a model (:func:`prepare_for_training`) is separate from building it: the caller builds the
ranker, may load and freeze pretrained tables (the transfer adapters do), and only then are the in-backward
optimizers attached — to the *trainable* tables only, so a frozen table gets none and stays bit-identical
— and the model sharded.

Sharded runs (``DistributedModelParallel``) call the inner ranker (``dmp.module(batch)``) as the
pretraining trainer does: its sharded tables still run their collective lookups, and the dense gradients
are averaged explicitly (``hybrid.core.training.average_dense_gradients``). ``batch_size`` is the global
batch: each of ``W`` ranks takes ``batch_size / W`` (the loader's job). Evaluation spreads the test batches
over the ranks and gathers every prediction, so each rank computes the same metrics on the *full* split
and takes the same best-checkpoint decision.

Checkpoints (``hybrid.core.checkpoint``, DCP + manifest) hold the model weights only:
``<checkpoint_dir>/best/step-…`` (the weights at the best evaluation, by the primary task's AUC) and
``<checkpoint_dir>/last/step-…``. Fine-tuning is short, so there is no mid-run resume.

This module imports ``hybrid.core``, torch and torchrec only — never the jobs, data or MLflow: metrics leave through a
plain callback ``log_metrics(metrics, step, epoch)`` and loaders come in as arguments.

Example:
    >>> from hybrid.ctr_models import build_ranker
    >>> cfg = CTRTrainConfig(epochs=3, batch_size=1024, eval_every=100)
    >>> model = prepare_for_training(build_ranker("dcn_v2", None, vocab_sizes, ("click",)), cfg.optim)
    >>> result = train(model, train_loader, eval_loader, cfg,                  # doctest: +SKIP
    ...                checkpoint_dir="runs/x/checkpoints", log_metrics=lambda m, step, epoch: print(step, epoch, m))
    >>> result.summary()["best_auc"], result.one_epoch.flagged                # doctest: +SKIP
    (0.7912, True)

(the loaders come from :func:`hybrid.data.batching.make_loader` over a prepared dataset: ``hybrid finetune``
wires them, and ``tests/test_ctr_trainer.py`` runs this loop.)
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hybrid.core.batch import CTRBatch
from hybrid.core.checkpoint import save_checkpoint
from hybrid.core.progress import MetricsCallback, ThroughputWindow, rank0_callback
from hybrid.core.tables import embedding_modules, is_table_key
from hybrid.core.training import (
    DEFAULT_SHARDING,
    DistributedContext,
    OptimConfig,
    apply_sparse_optimizer,
    average_dense_gradients,
    dense_parameters,
    eval_rounds,
    make_dense_optimizer,
    seed_everything,
    shard_model,
    unwrap_dmp,
)
from hybrid.ctr_models.base import Ranker
from hybrid.ctr_models.metrics import OneEpochDrop, ctr_metrics, one_epoch_drop

BEST, LAST = "best", "last"


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
        max_history: most recent history events per sample (the batches' and the ranker's window).
        seed: seeds model init, data order (with the epoch) and dropout.
        optim: dense AdamW + schedule + clipping and the tables' in-backward optimizer.
        log_every: push train metrics every this many steps.
        max_steps: stop after this many steps (the schedule then spans ``min(max_steps, epochs x steps per
            epoch)``); ``None``: train all ``epochs``.
        one_epoch_tolerance: AUC dip below the end-of-epoch-1 value that counts as the one-epoch drop
            (:func:`hybrid.ctr_models.metrics.detect_one_epoch_drop`; ~1e-3 suits ~10^5 test samples).
        progress: show a tqdm progress bar (rank 0 only).

    Example:
        >>> cfg = CTRTrainConfig(epochs=3, batch_size=1024, eval_every=100, optim=OptimConfig(lr=1e-3))
        >>> cfg.optim.sparse_optimizer, cfg.max_history          # tables: in-backward adagrad; 50-event history
        ('adagrad', 50)
    """

    epochs: int = 3
    batch_size: int = 1024
    eval_batch_size: int = 4096
    eval_every: int = 0
    max_history: int = 50
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    log_every: int = 50
    max_steps: int | None = None
    one_epoch_tolerance: float = 1e-3
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "max_history", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"train.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ValueError(f"train.eval_every must be >= 0 (0: only at epoch ends), got {self.eval_every!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"train.max_steps must be a positive integer or null, got {self.max_steps}")
        if self.one_epoch_tolerance < 0:
            raise ValueError(f"train.one_epoch_tolerance must be >= 0, got {self.one_epoch_tolerance}")


@dataclass
class Evaluation:
    """One evaluation: after ``step`` optimizer steps, at fractional ``epoch``; ``metrics`` as logged."""

    step: int
    epoch: float
    metrics: dict[str, float]

    @property
    def auc(self) -> float:
        return self.metrics["eval/auc"]


@dataclass
class CTRTrainResult:
    """What :func:`train` returns.

    Args:
        metrics: the last evaluation (``eval/...``) and the last train window (``train/...``, ``perf/...``).
        step: optimizer steps done.
        epoch: fractional epoch reached.
        evaluations: every evaluation, in order.
        best: the evaluation with the highest primary-task AUC (``None`` without evaluations).
        best_checkpoint, last_checkpoint: checkpoint directories (``None`` without a checkpoint dir).
        one_epoch: the one-epoch detector over the ``(epoch, eval/auc)`` curve.
    """

    metrics: dict[str, float]
    step: int
    epoch: float
    evaluations: list[Evaluation]
    best: Evaluation | None
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    one_epoch: OneEpochDrop

    def curve(self) -> list[tuple[float, float]]:
        """``[(fractional epoch, eval AUC), ...]`` — the one-epoch picture."""
        return [(e.epoch, e.auc) for e in self.evaluations]

    def summary(self) -> dict[str, Any]:
        """The figures a run is reported by (BENCHMARKS.md).

        Keys: ``auc_epoch1`` (the last evaluation at or before the end of epoch 1, i.e. the end of epoch 1
        when the run got there), ``best_auc``, ``best_epoch``, ``best_step``, ``final_auc``,
        ``final_logloss``, ``final_gauc`` (last evaluation), ``best_logloss``, ``best_gauc`` (at the best
        evaluation), ``one_epoch_drop`` (bool), ``one_epoch_auc_drop`` (end-of-epoch-1 AUC minus the
        lowest AUC after it; ``nan`` when undefined), ``steps``, ``epochs``.
        """
        nan = float("nan")
        last = self.evaluations[-1].metrics if self.evaluations else {}
        best = self.best.metrics if self.best else {}
        return {
            "auc_epoch1": self.one_epoch.boundary_auc,
            "best_auc": best.get("eval/auc", nan),
            "best_epoch": self.best.epoch if self.best else nan,
            "best_step": self.best.step if self.best else -1,
            "best_logloss": best.get("eval/logloss", nan),
            "best_gauc": best.get("eval/gauc", nan),
            "final_auc": last.get("eval/auc", nan),
            "final_logloss": last.get("eval/logloss", nan),
            "final_gauc": last.get("eval/gauc", nan),
            "one_epoch_drop": bool(self.one_epoch.flagged),
            "one_epoch_auc_drop": self.one_epoch.drop,
            "steps": self.step,
            "epochs": self.epoch,
        }


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
                         sharding_types: Mapping[str, str] | None = None) -> nn.Module:
    """Attach the tables' in-backward optimizer, then shard when distributed: the model :func:`train` takes.

    Only *trainable* table parameters get an optimizer: a table frozen beforehand (``requires_grad=False``,
    e.g. by a sparse-freeze transfer) gets none, so no fused update ever touches it.

    Args:
        model: a ranker; for a sharded run built with ``embedding_device="meta"`` (DMP materialises the
            tables on their shards).
        optim: its ``sparse_optimizer`` / ``sparse_lr`` are attached to the tables here.
        ctx: from ``hybrid.core.training.init_distributed`` (default: one CPU process, no sharding).
        sharding_types: table → sharding type (default :data:`DEFAULT_SHARDING`).

    Returns:
        ``model`` itself, or the ``DistributedModelParallel`` wrapping it.
    """
    ctx = ctx or DistributedContext()
    if not ctx.is_distributed:
        model = model.to(ctx.device)  # first: the optimizers then hold the parameters where they will live
    apply_sparse_optimizer(embedding_modules(model), optim)  # DMP reads these settings and fuses the update
    if not ctx.is_distributed:
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
) -> CTRTrainResult:
    """Train ``model`` on ``train_loader``, evaluate on ``eval_loader``, keep the best and last weights.

    Args:
        model: from :func:`prepare_for_training` (plain ranker or ``DistributedModelParallel``).
        train_loader: a ``DataLoader`` of :class:`CTRBatch` whose ``batch_sampler`` has ``set_epoch(epoch)``
            (``hybrid.data.batching.make_loader(..., shuffle=True, seed=cfg.seed, num_replicas=W, rank=r)``).
            All ranks must yield the same number of batches.
        eval_loader: the whole test split on every rank (ranks take turns over its batches and gather the
            predictions). ``None``: no evaluation, no best checkpoint.
        cfg: the training settings.
        ctx: rank / world size / device (default: one CPU process).
        checkpoint_dir: where ``best/`` and ``last/`` go (``None``: no checkpoints).
        manifest: extra JSON-able facts stored in every checkpoint's manifest (config, feature map...).
        log_metrics: called on rank 0 as ``log_metrics(metrics, step, epoch)`` with ``train/loss``,
            ``train/bce/<task>``, ``train/<auxiliary loss>``, ``train/lr``, the ranker's diagnostics,
            ``perf/samples_per_s``, ``eval/auc`` ... (see :func:`evaluate`); ``epoch`` is fractional.

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

    step, metrics = 0, {}
    evaluations: list[Evaluation] = []
    best: Evaluation | None = None
    best_path: Path | None = None
    window = ThroughputWindow(unit="samples")
    bar = tqdm(total=total_steps, disable=not (rank0 and cfg.progress), desc="finetune", unit="step",
               dynamic_ncols=True)
    core.train()
    for epoch in range(cfg.epochs):
        sampler.set_epoch(epoch)
        for position, batch in enumerate(train_loader, start=1):
            batch = batch.to(ctx.device)
            if step == 0:
                check_task_names(batch, core)

            # 4. One step. backward() also applies the tables' optimizer (TorchRec's fused in-backward
            #    update), so only the dense parameters are left for AdamW.
            logits = core(batch)
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
            bar.update(1)

            # 5. Logging and evaluation, at step boundaries, identically on every rank.
            done = step >= total_steps
            frac_epoch = step / steps_per_epoch
            if step % cfg.log_every == 0 or done:
                train_metrics = window.flush(ctx.world_size)
                train_metrics["train/lr"] = optimizer.param_groups[0]["lr"]
                train_metrics.update(core.logging_metrics())  # diagnostics of the last forward
                metrics.update(train_metrics)
                bar.set_postfix(loss=f"{train_metrics['train/loss']:.4f}",
                                samples_s=f"{train_metrics['perf/samples_per_s']:,.0f}")
                log(train_metrics, step, frac_epoch)
            epoch_end = position == steps_per_epoch
            if eval_loader is not None and ((cfg.eval_every and position % cfg.eval_every == 0)
                                            or epoch_end or done):
                with window.paused():
                    eval_metrics = evaluate(model, eval_loader, ctx=ctx)
                    evaluation = Evaluation(step, frac_epoch, eval_metrics)
                    evaluations.append(evaluation)
                    metrics.update(eval_metrics)
                    log(eval_metrics, step, frac_epoch)
                    if best is None or _better(evaluation.auc, best.auc):
                        best = evaluation
                        if checkpoint_dir is not None:
                            best_path = _save(checkpoint_dir / BEST, model, evaluation, manifest)
                core.train()
            if done:
                break
        if done:
            break
    bar.close()

    last_path = None
    if checkpoint_dir is not None:
        last_eval = evaluations[-1] if evaluations else Evaluation(step, step / steps_per_epoch, {})
        last_path = _save(checkpoint_dir / LAST, model, last_eval, manifest)
    # 6. The one-epoch phenomenon: does eval AUC fall after the first epoch boundary?
    drop = one_epoch_drop([(e.epoch, e.auc) for e in evaluations], tolerance=cfg.one_epoch_tolerance)
    return CTRTrainResult(metrics=metrics, step=step, epoch=step / steps_per_epoch, evaluations=evaluations,
                          best=best, best_checkpoint=best_path, last_checkpoint=last_path, one_epoch=drop)


def _better(auc: float, best_auc: float) -> bool:
    """Strictly higher AUC; a NaN AUC (single-class test set) never replaces a real one."""
    if math.isnan(auc):
        return False
    return math.isnan(best_auc) or auc > best_auc


def _save(root: Path, model: nn.Module, evaluation: Evaluation, manifest: Mapping[str, Any]) -> Path:
    facts = {**manifest, "epoch": evaluation.epoch, "metrics": dict(evaluation.metrics)}
    return save_checkpoint(root, evaluation.step, {"model": model.state_dict()}, facts, keep_last=1)


def _jsonable(config: Any) -> Any:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config


# ---------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def predict(model: nn.Module, loader: Iterable[CTRBatch], *,
            ctx: DistributedContext | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits of every sample of ``loader``, with their labels and users (gathered from all ranks).

    Every rank iterates the whole ``loader``; rank ``r`` scores batches ``r, r + W, ...``. Sharded lookups
    are collective, so a rank with fewer batches repeats one and discards the result
    (``hybrid.core.training.eval_rounds``). The model is left in eval mode.

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
        batch = batch.to(ctx.device)
        if not keep:
            core(batch)  # a filler round: keeps the collective lookups in step
            continue
        logits.append(core(batch).float().cpu().numpy())
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


def evaluate(model: nn.Module, loader: Iterable[CTRBatch], *, ctx: DistributedContext | None = None) -> dict[str, float]:
    """AUC, logloss and gAUC of every task on the whole ``loader`` (``hybrid.ctr_models.metrics.ctr_metrics``).

    Returns:
        ``eval/auc``, ``eval/logloss``, ``eval/gauc`` (the primary task = the model's first task),
        ``eval/<task>/auc``, ``eval/<task>/logloss``, ``eval/<task>/gauc`` for every task,
        ``eval/samples`` and ``perf/eval_samples_per_s``. The same on every rank.
    """
    core = unwrap(model)
    started = time.perf_counter()
    labels, logits, users = predict(model, loader, ctx=ctx)
    seconds = time.perf_counter() - started
    per_task = ctr_metrics(labels, logits, users, core.task_names)
    primary = core.task_names[0]
    out = {f"eval/{name}": value for name, value in per_task.items()}
    for kind in ("auc", "logloss", "gauc"):
        out[f"eval/{kind}"] = per_task[f"{primary}/{kind}"]
    out["eval/samples"] = float(len(users))
    out["perf/eval_samples_per_s"] = len(users) / max(seconds, 1e-9)
    return out
