"""The pretraining loop: one readable function, the same code unsharded and under TorchRec sharding.

:func:`train` reads top to bottom::

    seed → steps and schedule → (resume) → for each epoch, for each batch:
        with autocast(precision):             # fp32: no-op; bf16: the dense part in bfloat16
            losses = model.loss(batch)        # one embedding lookup: sequences + negatives + categories
        losses["loss"].backward()             # the tables update *here*, inside backward (fused optimizer)
        average dense grads across ranks      # sharded only (see below)
        clip dense grads → AdamW step → schedule step
        every log_every: train metrics · every eval_every: HR@10/NDCG@10 · every checkpoint_every: save

Sharded runs wrap the model in ``DistributedModelParallel`` (:func:`build_model`). The trainer calls
``dmp.module.loss(...)`` because DMP's forward only runs ``forward``; that bypasses the DDP wrapper DMP
puts around the dense modules, whose gradient hooks only fire after a DDP forward. So the dense
gradients are averaged across ranks explicitly (``hybrid.core.training.average_dense_gradients``) — one
all-reduce of one flat buffer per step — and the ranks keep identical dense weights (the distributed test
checks it).

Batch sizes: ``batch_size`` is the *global* batch per step; each of ``W`` ranks gets ``batch_size / W``
sequences, so one config gives the same number of steps and the same schedule on 1 or ``W`` processes.

Checkpoints (``hybrid.core.checkpoint``) hold the model (``ShardedTensor`` tables when sharded), the
dense AdamW and schedule state, the tables' optimizer state (DMP's fused optimizer, or the in-backward
``torch.optim`` instances of an unsharded model), and each rank's RNG states (negative sampling, torch's
global RNG). The data order is a function of ``seed`` and the epoch, so a resumed run skips the batches
of the current epoch it already consumed and ends with the same weights as an uninterrupted one.

This module imports ``hybrid.core`` and torch only — never the jobs, data or MLflow: metrics leave through a plain
callback ``log_metrics(metrics, step, epoch)`` and loaders come in as arguments.

Example:
    >>> from hybrid.pretrain.model import GenerativeModelConfig
    >>> cfg = PretrainTrainConfig(epochs=2, batch_size=64, eval_every=50)
    >>> model = build_model(GenerativeModelConfig.tiny(), vocab_sizes, cfg.optim, seed=cfg.seed)
    >>> result = train(model, train_loader, eval_loader, cfg,                  # doctest: +SKIP
    ...                checkpoint_dir="runs/x/checkpoints", log_metrics=lambda m, step, epoch: print(step, m))
    >>> result.metrics["eval/hr_at_10"]                                       # doctest: +SKIP
    0.0893

(the loaders come from :func:`hybrid.data.batching.make_loader` over a prepared dataset: ``hybrid pretrain``
wires them, and ``tests/test_pretrain_trainer.py`` runs this loop, resumed and sharded.)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from hybrid.core.batch import SequenceBatch
from hybrid.core.checkpoint import (
    resume_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from hybrid.core.errors import TrainingInterrupted
from hybrid.core.feature_map import NUM_RESERVED_IDS
from hybrid.core.precision import Precision, autocast, check_precision, to_device
from hybrid.core.progress import MetricsCallback, Progress, ThroughputWindow, rank0_callback
from hybrid.core.resume import check_resumable, epoch_batches, restore_training_state, rng_neutral_iter, training_state
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
from hybrid.pretrain.model import ITEM_FEATURE, GenerativeModel, GenerativeModelConfig
from hybrid.pretrain.objectives import hr_ndcg_at_k

# Seeds of the per-rank negative-sampling generators are spread apart so ranks draw different negatives.
_RANK_SEED_STRIDE = 1_000_003
# The evaluation loss draws its negatives from its own generator, so evaluating never shifts training RNG.
_EVAL_SEED_OFFSET = 7_777


@dataclass
class PretrainTrainConfig:
    """How to train the generative model.

    Args:
        epochs: passes over the pretraining sequences.
        batch_size: sequences per optimizer step, *across all ranks* (each of ``W`` ranks takes
            ``batch_size / W``; must divide evenly).
        eval_batch_size: sequences per evaluation batch (per rank).
        eval_every: evaluate every this many steps (``0``: only at the end; the end is always evaluated).
        max_len: most recent events kept per sequence (held-out eval targets included).
        seed: seeds model init, data order (with the epoch), negatives and dropout.
        optim: dense AdamW + schedule + clipping and the tables' in-backward optimizer.
        checkpoint_every: save every this many steps (``0``: only at the end; the end is always saved
            when a checkpoint directory is given).
        evals_per_epoch, checkpoints_per_epoch: instead of ``eval_every`` / ``checkpoint_every`` steps, this
            many times each epoch, evenly spaced, the last at the epoch's end
            (:func:`~hybrid.core.training.per_epoch_positions`); ``0`` (default): the step intervals.
        keep_last: complete checkpoints kept (older ones are pruned).
        log_every: push train metrics every this many steps.
        max_steps: stop after this many steps; the schedule then spans ``min(max_steps, epochs x steps
            per epoch)`` steps. ``None``: train all ``epochs``.
        k: cut-off of the retrieval metrics, logged as ``eval/hr_at_{k}`` and ``eval/ndcg_at_{k}`` (MLflow
            rejects ``@`` in metric names).
        progress: show progress (rank 0 only): a tqdm bar on a terminal, one line per log step otherwise.
        num_workers: loader worker processes gathering training batches ahead of the step (prefetch;
            they share the memory-mapped tables); ``0``: in the training process.
        eval_max_users: evaluate on a seeded random subset of this many users of the evaluation split
            (the same subset at every evaluation); ``null``: every user. For ~10^6 users scored against a
            catalogue of millions, where a full pass costs more than the training it checks.
        collective_timeout_s: seconds a collective (all-reduce, sharded lookup, checkpoint barrier) waits for
            the other ranks before this rank fails with one line (a hung or lost peer); ``null``: torch's
            default (30 min gloo, 10 min nccl). One process: unused.
        shard_tables: put the tables in TorchRec's ``DistributedModelParallel`` also in one process (a 1-rank
            process group; under ``torchrun`` they always are): FBGEMM's fused kernels update only the rows of
            the batch, where an unsharded table is stepped whole on a dense gradient
            (``hybrid.ctr_models.trainer.CTRTrainConfig.shard_tables``; CPU: adagrad, rowwise_adagrad or sgd).
            Sharded tables are initialised by their shards (``meta`` build), so values differ from unsharded.
        precision: ``fp32`` or ``bf16`` — bf16 runs the forward pass and the loss under bfloat16 autocast (the
            backbone's matmuls and attention); the tables, their optimizer states, the dense master weights and
            AdamW states and the losses stay fp32, and the evaluation's full-catalogue ranking is fp32
            (:mod:`hybrid.core.precision`). Meant for CUDA; on CPU it runs, usually slower.

    Example:
        >>> cfg = PretrainTrainConfig(epochs=1, batch_size=128, optim=OptimConfig(lr=5e-3, warmup_steps=20))
        >>> cfg.max_len, cfg.optim.schedule
        (200, 'cosine')
    """

    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 256
    eval_every: int = 200
    max_len: int = 200
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint_every: int = 500
    evals_per_epoch: int = 0
    checkpoints_per_epoch: int = 0
    keep_last: int = 2
    log_every: int = 10
    max_steps: int | None = None
    k: int = 10
    progress: bool = True
    num_workers: int = 0
    eval_max_users: int | None = None
    collective_timeout_s: float | None = None
    shard_tables: bool = False
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.eval_max_users is not None and (not isinstance(self.eval_max_users, int)
                                                or isinstance(self.eval_max_users, bool) or self.eval_max_users < 1):
            raise ValueError(f"train.eval_max_users must be a positive integer or null, got {self.eval_max_users!r}")
        if not isinstance(self.num_workers, int) or isinstance(self.num_workers, bool) or self.num_workers < 0:
            raise ValueError(f"train.num_workers must be an integer >= 0, got {self.num_workers!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "max_len", "keep_last", "log_every", "k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"train.{name} must be a positive integer, got {value!r}")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0 (0: only at the end), got {getattr(self, name)}")
        for name in ("evals_per_epoch", "checkpoints_per_epoch"):
            check_per_epoch(name, getattr(self, name))
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"train.max_steps must be a positive integer or null, got {self.max_steps}")
        if self.collective_timeout_s is not None and not self.collective_timeout_s > 0:
            raise ValueError(f"train.collective_timeout_s must be > 0 seconds or null, got {self.collective_timeout_s!r}")


@dataclass
class PretrainResult:
    """What :func:`train` returns.

    Args:
        metrics: the last evaluation (``eval/...``) and the last train window (``train/...``, ``perf/...``).
        step: optimizer steps done (in total, across resumes).
        epoch: fractional epoch reached.
        checkpoint: the final checkpoint directory (``None`` without a checkpoint directory).
        evaluations: every evaluation of this process's run, as ``(step, metrics)``.
        step_seconds: mean wall time of a training step in each log window of this process's run
            (evaluation and checkpoint time excluded); their median is a robust time per step.
    """

    metrics: dict[str, float]
    step: int
    epoch: float
    checkpoint: Path | None
    evaluations: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- the model

def build_model(config: GenerativeModelConfig, vocab_sizes: Mapping[str, int], optim: OptimConfig, *,
                seed: int = 0, ctx: DistributedContext | None = None,
                sharding_types: Mapping[str, str] | None = None, shard: bool | None = None) -> nn.Module:
    """The model ready for :func:`train`: tables with their in-backward optimizer, sharded when distributed.

    One process (``ctx.world_size == 1``): a plain :class:`GenerativeModel` on ``ctx.device``.
    Several: tables built on the ``meta`` device and materialised on their shards by
    ``DistributedModelParallel`` (row-wise item table by default); dense modules built on the device from
    the same seed on every rank.

    Args:
        config: the model.
        vocab_sizes: rows per feature table (``FeatureMap.vocab_sizes()``).
        optim: its ``sparse_optimizer`` / ``sparse_lr`` are attached to the tables here.
        seed: seeds the initialisation.
        ctx: from ``hybrid.core.training.init_distributed`` (default: one CPU process).
        sharding_types: table → sharding type (default :data:`DEFAULT_SHARDING`).
        shard: shard the tables (default: when distributed); ``True`` in one process needs a 1-rank process
            group (``init_distributed(single_process_group=True)``): ``PretrainTrainConfig.shard_tables``.

    Returns:
        the :class:`GenerativeModel`, or the ``DistributedModelParallel`` wrapping it.

    Raises:
        ValueError: sharding on CPU with ``optim.sparse_optimizer`` adam.
    """
    ctx = ctx or DistributedContext()
    seed_everything(seed)
    shard = ctx.is_distributed if shard is None else shard
    if shard:
        check_sharded_sparse_optimizer(optim, ctx)
    if not shard:
        model = GenerativeModel(config, vocab_sizes, device=ctx.device)
        apply_sparse_optimizer([model.embeddings], optim)
        return model
    model = GenerativeModel(config, vocab_sizes, device=ctx.device, embedding_device="meta")
    apply_sparse_optimizer([model.embeddings], optim)  # DMP reads these settings and fuses the update
    return shard_model(model, ctx, sharding_types if sharding_types is not None else DEFAULT_SHARDING)


def unwrap(model: nn.Module) -> GenerativeModel:
    """The :class:`GenerativeModel` inside a ``DistributedModelParallel`` (or the model itself)."""
    return unwrap_dmp(model, GenerativeModel)


# ---------------------------------------------------------------------------------------------- the loop

def train(
    model: nn.Module,
    train_loader: DataLoader,
    eval_loader: Iterable[SequenceBatch] | None,
    cfg: PretrainTrainConfig,
    *,
    ctx: DistributedContext | None = None,
    checkpoint_dir: str | Path | None = None,
    manifest: Mapping[str, Any] | None = None,
    resume: bool = False,
    resume_from: str | Path | None = None,
    log_metrics: MetricsCallback | None = None,
    item_counts: torch.Tensor | None = None,
) -> PretrainResult:
    """Train ``model`` on ``train_loader``, evaluate on ``eval_loader``, checkpoint into ``checkpoint_dir``.

    Args:
        model: from :func:`build_model` (plain or ``DistributedModelParallel``).
        train_loader: a ``DataLoader`` of :class:`SequenceBatch` whose ``batch_sampler`` has
            ``set_epoch(epoch)`` and a deterministic order per (seed, epoch) — e.g.
            ``hybrid.data.batching.make_loader(..., shuffle=True, seed=cfg.seed, num_replicas=W, rank=r)``.
            All ranks must yield the same number of batches.
        eval_loader: evaluation batches (``num_eval_targets > 0``), the *whole* split on every rank (ranks
            take turns over its batches; results are summed across ranks). ``None``: no evaluation.
        cfg: the training settings.
        ctx: rank / world size / device (default: one CPU process).
        checkpoint_dir: where checkpoints go (``None``: none are written).
        manifest: extra JSON-able facts stored in every checkpoint's manifest (config, feature map...).
        resume: continue from the newest complete checkpoint in ``checkpoint_dir`` (if there is one): the
            one ``LATEST`` names; a corrupt or incomplete one is refused
            (:func:`~hybrid.core.checkpoint.resume_checkpoint`).
        resume_from: continue from this checkpoint directory instead (e.g. the newest one that verifies,
            chosen by ``hybrid pretrain --resume=previous``).
        log_metrics: called on rank 0 as ``log_metrics(metrics, step, epoch)`` with names like
            ``train/loss``, ``eval/hr_at_10``, ``perf/events_per_s``; ``epoch`` is fractional.
        item_counts: ``[V_item]`` training frequencies, needed by in-batch negatives with logQ correction.

    Returns:
        :class:`PretrainResult`.
    """
    ctx = ctx or DistributedContext()
    core = unwrap(model)
    rank0 = ctx.rank == 0
    log = rank0_callback(log_metrics, ctx.rank)

    # 1. Seeds: torch's global RNG (dropout) and the generator of this rank's negative samples.
    seed_everything(cfg.seed)
    negatives = torch.Generator(device=ctx.device).manual_seed(cfg.seed + _RANK_SEED_STRIDE * ctx.rank)
    if item_counts is not None:
        item_counts = item_counts.to(ctx.device)

    # 2. How long: the schedule spans the whole run, so a resumed run sees the same learning rates.
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("the training loader yields no batches (too few sequences for one batch per rank?)")
    total_steps = cfg.epochs * steps_per_epoch
    eval_points = per_epoch_positions(steps_per_epoch, cfg.evals_per_epoch)
    checkpoint_points = per_epoch_positions(steps_per_epoch, cfg.checkpoints_per_epoch)
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    # 3. Optimizers: the tables already carry their in-backward optimizer; AdamW + schedule for the rest.
    dense = dense_parameters(model)
    optimizer, schedule = make_dense_optimizer(model, cfg.optim, total_steps)

    # 4. Resume: weights, optimizer states, RNG states and the step (hence epoch and batch position).
    step, metrics = 0, {}
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    manifest = dict(manifest or {})
    manifest.update(model=core.config.to_dict(), tables=_table_shapes(core), world_size=ctx.world_size,
                    steps_per_epoch=steps_per_epoch, train_config=dataclasses.asdict(cfg))
    if resume_from is not None:
        last = Path(resume_from)
    else:
        last = resume_checkpoint(checkpoint_dir) if (resume and checkpoint_dir is not None) else None
    if last is not None:
        check_resumable(last, verify_checkpoint(last), manifest)
        step, metrics = restore_training_state(last, model, optimizer, schedule, negatives, rank=ctx.rank)

    evaluations: list[tuple[int, dict[str, float]]] = []
    step_seconds: list[float] = []
    saved: Path | None = last
    saved_step = step
    window = ThroughputWindow(unit="events")  # non-padding events: the throughput of real tokens
    bar = Progress("pretrain", total_steps, enabled=rank0 and cfg.progress, initial=step)
    core.train()
    with StopSignals(ctx) as stop:
        while step < total_steps:
            epoch, position = divmod(step, steps_per_epoch)
            for batch in rng_neutral_iter(epoch_batches(train_loader, epoch, skip=position)):
                batch = to_device(batch, ctx.device)  # non-blocking from pinned memory on CUDA

                # 5. One step: the forward and the loss in cfg.precision (bf16: autocast of the dense part; the
                #    tables and the loss stay fp32). backward() also applies the tables' optimizer (TorchRec's
                #    fused in-backward update), so only the dense parameters are left for AdamW.
                with autocast(cfg.precision, ctx.device):
                    losses = core.loss(batch, item_counts=item_counts, generator=negatives)
                losses["loss"].backward()
                if ctx.is_distributed:
                    average_dense_gradients(dense, ctx.world_size)
                if cfg.optim.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(dense, cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                step += 1
                window.add(losses, int(batch.lengths.sum()))
                bar.update(1)

                # 6. Logging, evaluation, checkpoints — at step boundaries, identically on every rank.
                done = step >= total_steps
                frac_epoch = step / steps_per_epoch
                if step % cfg.log_every == 0 or done:
                    step_seconds.append(window.seconds_per_step())
                    train_metrics = window.flush(ctx.world_size)
                    train_metrics["train/lr"] = optimizer.param_groups[0]["lr"]
                    metrics.update(train_metrics)
                    bar.log(step, frac_epoch, {"loss": f"{train_metrics['train/loss']:.3f}",
                                               "events/s": f"{train_metrics['perf/events_per_s']:,.0f}"})
                    log(train_metrics, step, frac_epoch)
                in_epoch = (step - 1) % steps_per_epoch + 1  # the step's position in its epoch, 1-based
                due_eval = (in_epoch in eval_points if cfg.evals_per_epoch
                            else bool(cfg.eval_every) and step % cfg.eval_every == 0)
                due_checkpoint = (in_epoch in checkpoint_points if cfg.checkpoints_per_epoch
                                  else bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0)
                if eval_loader is not None and (due_eval or done):
                    with window.paused():
                        eval_metrics = evaluate(model, eval_loader, ctx=ctx, k=cfg.k, seed=cfg.seed,
                                                item_counts=item_counts, precision=cfg.precision)
                    core.train()
                    metrics.update(eval_metrics)
                    evaluations.append((step, eval_metrics))
                    log(eval_metrics, step, frac_epoch)
                if checkpoint_dir is not None and (due_checkpoint or done):
                    with window.paused():
                        saved = _save(checkpoint_dir, step, model, optimizer, schedule, negatives, ctx, cfg,
                                      manifest, metrics)
                    saved_step = step
                if done:
                    break
                signum = stop.requested()
                if signum is not None:  # SIGTERM / SIGINT: stop here, with a complete checkpoint of this step
                    if checkpoint_dir is not None and saved_step != step:
                        saved = _save(checkpoint_dir, step, model, optimizer, schedule, negatives, ctx, cfg,
                                      manifest, metrics)
                    bar.close()
                    raise TrainingInterrupted(signum, step, saved)
    bar.close()
    return PretrainResult(metrics=metrics, step=step, epoch=step / steps_per_epoch, checkpoint=saved,
                          evaluations=evaluations, step_seconds=step_seconds)


# ---------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: nn.Module, eval_loader: Iterable[SequenceBatch], *, ctx: DistributedContext | None = None,
             k: int = 10, seed: int = 0, item_counts: torch.Tensor | None = None,
             precision: str = "fp32") -> dict[str, float]:
    """HR@k / NDCG@k over the full item set on held-out next items, and the evaluation losses.

    Every rank iterates the whole ``eval_loader``; rank ``r`` scores batches ``r, r + W, ...`` and the
    sums are all-reduced. Sharded lookups are collective, so a rank with fewer batches repeats one and
    discards the result (every rank issues the same number of lookups: ``hybrid.core.training.eval_rounds``
    gives each rank its turns). The loss draws its negatives from its own generator, seeded per batch, so
    evaluating never changes the training RNG and gives the same numbers on any number of ranks.

    ``precision`` (``train.precision``) is that of the evaluation losses; the ranking over the full item set
    stays fp32 whatever it is (in bfloat16, thousands of items would tie with the target, and ties count as
    misses).

    Returns:
        ``{"eval/hr_at_k", "eval/ndcg_at_k", "eval/loss", "eval/item_loss", ["eval/category_loss"],
        "eval/targets", "eval/oov_targets"}`` — losses are means over targets (each batch weighted by its
        targets); HR/NDCG count the targets unknown to the feature map (``eval/oov_targets`` of
        ``eval/targets``) as misses.
    """
    ctx = ctx or DistributedContext()
    core = unwrap(model)
    core.eval()
    generator = torch.Generator(device=ctx.device)
    table = core.item_table()  # once per pass: every batch ranks against the same [V, E] rows
    sums: dict[str, float] = {}

    def score(index: int, batch: SequenceBatch, keep: bool) -> None:
        batch = to_device(batch, ctx.device)
        scores = core.retrieval_metrics(batch, k, item_table=table)  # fp32: the ranking (see above)
        # negatives seeded by the batch's index: the loss does not depend on which rank scores which batch
        generator.manual_seed(seed + _EVAL_SEED_OFFSET + index)
        with autocast(precision, ctx.device):
            losses = core.loss(batch, item_counts=item_counts, generator=generator)
        if not keep:
            return  # a filler round: only here to keep the collective lookups in step
        n = scores[f"hr@{k}"].numel()
        sums["targets"] = sums.get("targets", 0.0) + n
        sums["oov_targets"] = sums.get("oov_targets", 0.0) + float(scores["oov"].sum())
        for name in ("hr", "ndcg"):
            sums[f"{name}_at_{k}"] = sums.get(f"{name}_at_{k}", 0.0) + float(scores[f"{name}@{k}"].sum())
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + float(value) * n

    for i, batch, keep in eval_rounds(rng_neutral_iter(eval_loader), ctx):
        score(i, batch, keep)
    # a fixed list of names: every rank must all-reduce the same tensor, even one that scored nothing
    names = ["targets", "oov_targets", f"hr_at_{k}", f"ndcg_at_{k}", "loss", "item_loss"]
    if core.config.objective.category_loss_weight > 0:
        names.append("category_loss")
    # on the device: an nccl process group all-reduces CUDA tensors only (gloo on CPU: the same as before)
    totals = torch.tensor([sums.get(n, 0.0) for n in names], dtype=torch.float64, device=ctx.device)
    if ctx.is_distributed:
        dist.all_reduce(totals)
    total = dict(zip(names, totals.tolist()))
    targets = max(total["targets"], 1.0)
    out = {f"eval/{n}": v / targets for n, v in total.items() if n not in ("targets", "oov_targets")}
    out["eval/targets"], out["eval/oov_targets"] = total["targets"], total["oov_targets"]
    return out


@torch.no_grad()
def popularity_metrics(eval_loader: Iterable[SequenceBatch], item_counts: torch.Tensor, k: int = 10) -> dict[str, float]:
    """The most-popular baseline: every user gets the same ranking, by training frequency.

    Same targets as :func:`evaluate` (the trailing ``num_eval_targets`` events that have a predecessor; a
    target unknown to the feature map counts as a miss) and the same ranking rule
    (:func:`~hybrid.pretrain.objectives.hr_ndcg_at_k`: ties count against the target, reserved ids never
    ranked). The history is not excluded, as in the model's metric.

    Args:
        eval_loader: evaluation batches.
        item_counts: ``[V_item]`` training frequency per item id.
        k: cut-off.

    Returns:
        ``{"hr_at_k": ..., "ndcg_at_k": ..., "targets": ..., "oov_targets": ...}``.
    """
    scores = item_counts.to(torch.float32).unsqueeze(1)  # [V, 1]: an item's score is its count
    hits, gains, n, oov = 0.0, 0.0, 0, 0
    for batch in eval_loader:
        targets = _eval_targets(batch)
        known = targets[targets >= NUM_RESERVED_IDS]  # unknown targets: misses (in n, never a hit)
        n, oov = n + targets.numel(), oov + targets.numel() - known.numel()
        if known.numel() == 0:
            continue
        hr, ndcg = hr_ndcg_at_k(torch.ones(known.numel(), 1), scores, known, k, normalize=False)
        hits, gains = hits + float(hr.sum()), gains + float(ndcg.sum())
    return {f"hr_at_{k}": hits / max(n, 1), f"ndcg_at_{k}": gains / max(n, 1), "targets": float(n),
            "oov_targets": float(oov)}


def _eval_targets(batch: SequenceBatch) -> torch.Tensor:
    """Item ids of the events the model is scored on (see ``GenerativeModel._target_mask``)."""
    items = batch.features[ITEM_FEATURE].values()
    lengths = batch.lengths.to(torch.int64)
    ends = torch.cumsum(lengths, 0)
    pos_in_seq = torch.arange(items.numel()) - (ends - lengths).repeat_interleave(lengths)
    seq_len = lengths.repeat_interleave(lengths)
    n = batch.num_eval_targets
    keep = pos_in_seq >= 1  # the first event has nothing before it to predict from
    if n > 0:
        keep &= pos_in_seq >= seq_len - n
    return items[keep]  # events are never padding: an id below NUM_RESERVED_IDS here is OOV


# ---------------------------------------------------------------------------------------------- checkpoints

def _table_shapes(core: GenerativeModel) -> dict[str, list[int]]:
    return {core.table_names[f]: [rows, core.config.table_dim] for f, rows in core.vocab_sizes.items()}


def _save(root: Path, step: int, model: nn.Module, optimizer, schedule, negatives: torch.Generator,
          ctx: DistributedContext, cfg: PretrainTrainConfig, manifest: Mapping[str, Any],
          metrics: Mapping[str, float]) -> Path:
    state = training_state(model, optimizer, schedule, negatives, ctx.rank)
    epoch, position = divmod(step, manifest["steps_per_epoch"])
    facts = {**manifest, "epoch": epoch, "batch_in_epoch": position, "metrics": dict(metrics)}
    return save_checkpoint(root, step, state, facts, keep_last=cfg.keep_last)
