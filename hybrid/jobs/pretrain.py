"""The pretraining stage: prepared data → generative model → checkpoints, logged to MLflow.

``hybrid pretrain --config cfg.yaml`` (one process) and ``torchrun --nproc_per_node=N -m hybrid pretrain
...`` (sharded) both call :func:`run_pretrain`. It is the glue between the data pipeline
(:mod:`hybrid.data`), the training loop (:mod:`hybrid.pretrain.trainer`, which knows nothing of the jobs) and
MLflow (:mod:`hybrid.tracking`).

Output layout under ``cfg.out``::

    checkpoints/step-00000400/   DCP shards + manifest.json (config, model, feature map, tables, metrics)
    checkpoints/LATEST
    config.yaml                  the resolved config
    feature_map.json             the feature map the tables are indexed by
    result.json                  final metrics, most-popular baseline, checkpoint path

Example:
    >>> cfg = load_config(PretrainConfig, "configs/pretrain_ml1m_last_item_llama.yaml")   # doctest: +SKIP
    >>> result = run_pretrain(cfg)   # doctest: +SKIP
    >>> result["metrics"]["eval/hr_at_10"], result["checkpoint"]   # doctest: +SKIP
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hybrid.config import from_mapping, to_dict
from hybrid.core.backbones import BackboneConfig
from hybrid.core.backbones.config import BackboneKind
from hybrid.core.checkpoint import CheckpointError, checkpoint_dirs, read_manifest, resume_checkpoint
from hybrid.core.errors import HybridInputError
from hybrid.core.feature_map import FeatureMap, table_name
from hybrid.core.precision import pin_memory
from hybrid.data.batching import SEQUENCE_FEATURES, SequenceBatchConverter, make_loader
from hybrid.data.columns import as_table
from hybrid.data.protocols import PreparedData
from hybrid.data.store import data_hash, open_prepared
from hybrid.data.validation import check_prepared_stats
from hybrid.jobs.stage import PREVIOUS, check_resume_value, refuse_existing, training_stage
from hybrid.pretrain.model import GenerativeModelConfig
from hybrid.pretrain.objectives import ObjectiveConfig
from hybrid.pretrain.trainer import (
    PretrainTrainConfig,
    build_model,
    popularity_metrics,
    train,
    unwrap,
)
from hybrid.tracking import PRETRAIN_INPUTS, TrackingConfig

CHECKPOINTS = "checkpoints"


@dataclass
class PretrainModelSpec:
    """The model section of a pretraining config (what :meth:`build` turns into a GenerativeModelConfig).

    Args:
        size: GPSD size name ``L{layers}H{dim}A{heads}``, e.g. ``L4H64A4``.
        kind: backbone: ``llama`` (GPSD's decoder) or ``hstu``.
        embedding_dim: table width; ``null`` follows the backbone width.
        features: sequence features embedded into each token; ``null``: every one the data has
            (of ``item_id``, ``category``, ``action``).
        dropout: backbone dropout.
        init_std: std of the table initialisation.
        objective: losses (negatives, temperature, category loss weight...).
        backbone: any other :class:`~hybrid.core.backbones.BackboneConfig` field, e.g.
            ``{hstu_num_time_buckets: 64}``; ``max_len`` follows ``train.max_len``.

    Example:
        >>> PretrainModelSpec(size="L4H64A4", kind="hstu").build(max_len=200, available=["item_id"]).backbone.dim
        64
    """

    size: str = "L4H64A4"
    kind: BackboneKind = "llama"
    embedding_dim: int | None = None
    features: list[str] | None = None
    dropout: float = 0.0
    init_std: float = 0.02
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    backbone: dict[str, Any] = field(default_factory=dict)

    def build(self, max_len: int, available: list[str]) -> GenerativeModelConfig:
        """The model config for sequences of at most ``max_len`` events with features ``available``."""
        # shape and dropout have their own keys; everything else is a BackboneConfig field, type-checked
        reserved = sorted(set(self.backbone) & {"kind", "num_layers", "dim", "num_heads", "dropout", "max_len"})
        if reserved:
            raise HybridInputError(f"model.backbone: {', '.join(reserved)} is set by model.size / model.kind / "
                                   "model.dropout / train.max_len, not here")
        features = tuple(self.features) if self.features is not None else tuple(available)
        missing = [f for f in features if f not in available]
        if missing:
            raise HybridInputError(f"model.features: the prepared data has no sequence feature(s) {missing} "
                                   f"(it has: {', '.join(available)})")
        # the category loss needs a category feature: without one in the data, default it off
        objective = self.objective
        if self.features is None and objective.category_feature not in features:
            objective = ObjectiveConfig(**{**objective.to_dict(), "category_loss_weight": 0.0})
        try:
            shape = BackboneConfig.from_size(self.size, kind=self.kind).to_dict()
            backbone = from_mapping(BackboneConfig, {**shape, "max_len": max_len, "dropout": self.dropout,
                                                     **self.backbone}, prefix="model.backbone.", source="model")
            return GenerativeModelConfig(backbone=backbone, embedding_dim=self.embedding_dim, features=features,
                                         objective=objective, init_std=self.init_std)
        except (ValueError, TypeError) as err:
            raise HybridInputError(f"model: {err}") from None


@dataclass
class PretrainConfig:
    """``hybrid pretrain``: prepared data → generative model → ``out``.

    Args:
        data: a prepared data directory (``hybrid data prepare --out ...``).
        model: the model (:class:`PretrainModelSpec`).
        train: the loop (:class:`~hybrid.pretrain.trainer.PretrainTrainConfig`).
        out: output directory (checkpoints, resolved config, feature map, default MLflow store).
        tracking: MLflow settings.
    """

    data: str = ""
    model: PretrainModelSpec = field(default_factory=PretrainModelSpec)
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)
    out: str = "runs/pretrain"
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="pretrain"))


def training_item_counts(prepared: PreparedData, chunk: int = 1 << 22) -> np.ndarray:
    """How often each item id occurs in the pretraining windows (the most-popular baseline's scores).

    Reads the events in chunks of ``chunk`` positions, so memory stays bounded whatever their number.
    """
    windows = as_table(prepared.pretrain_train, "pretrain_train")
    events = as_table(prepared.events, "events")
    starts, ends = np.sort(windows["start"]), np.sort(windows["end"])
    items = events["item_id"]
    counts = np.zeros(prepared.feature_map.vocab_sizes()["item_id"], dtype=np.int64)
    for first in range(0, len(events), chunk):
        position = np.arange(first, min(first + chunk, len(events)))
        # windows covering a position: those started at or before it minus those ended at or before it
        weight = np.searchsorted(starts, position, side="right") - np.searchsorted(ends, position, side="right")
        counts += np.bincount(items[position], weights=weight, minlength=len(counts)).astype(np.int64)
    return counts


def check_feature_map(path: Path, manifest: dict, fm: FeatureMap, features: tuple[str, ...], data_dir: str) -> None:
    """Refuse a checkpoint whose feature map differs from the prepared data's; name features and sizes."""
    saved = manifest.get("feature_map")
    if saved is None:
        raise CheckpointError(f"{path}: the manifest has no feature map; cannot tell which ids its tables use")
    saved_fm = FeatureMap.from_dict(saved, source=f"{path}/manifest.json")
    if saved_fm.fingerprint() == fm.fingerprint():
        return
    saved_sizes, sizes = saved_fm.vocab_sizes(), fm.vocab_sizes()
    parts = []
    for f in features:
        a, b = saved_sizes.get(f), sizes.get(f)
        same = a == b and f in saved_fm and f in fm and saved_fm[f].tokens == fm[f].tokens
        if not same:
            parts.append(f"{f} (table {table_name(f)}): {a} rows in the checkpoint vs {b} in the data"
                         + (" — same size, different ids" if a == b else ""))
    detail = "; ".join(parts) if parts else "vocabularies of features the model does not embed differ"
    raise CheckpointError(f"{path}: trained on a different feature map than {data_dir} "
                          f"(fingerprint {saved_fm.fingerprint()} vs {fm.fingerprint()}): {detail}")



def run_pretrain(cfg: PretrainConfig, resume: bool | str = False, parent_run: str | None = None) -> dict[str, Any]:
    """Train the generative model of ``cfg`` (sharded under ``torchrun``); log to MLflow on rank 0.

    Args:
        cfg: the job config.
        resume: continue from ``<out>/checkpoints``' newest complete checkpoint (a fresh start if there is
            none). Without it, an ``out`` that already holds checkpoints is refused. When the checkpoint
            ``LATEST`` names is corrupt or incomplete, ``True`` refuses (one line naming the newest one that
            verifies) and ``"previous"`` (:data:`PREVIOUS`) continues from that one.
        parent_run: MLflow run id to nest this stage under.

    Returns:
        ``{"metrics": {...}, "baseline": {...}, "checkpoint": str, "step": int, "epoch": float,
        "seconds_per_step": median over log windows (evaluation excluded), "seconds": wall time}``.

    Raises:
        HybridInputError: bad config or data, a checkpoint that does not match (one line, names what differs).
    """
    started = time.perf_counter()
    if not cfg.data:
        raise HybridInputError("data: set the prepared data directory (data: runs/ml1m/last-item)")
    check_prepared_stats(cfg.data, "pretrain")  # an empty split: one line, before anything is built
    prepared = open_prepared(cfg.data)
    fm = prepared.feature_map
    available = [f for f in SEQUENCE_FEATURES if f in prepared.events and f in fm]
    model_cfg = cfg.model.build(cfg.train.max_len, available)
    out = Path(cfg.out)
    root = out / CHECKPOINTS
    check_resume_value(resume)
    if resume:  # verified; a corrupt LATEST is refused here, before anything is written
        last = resume_checkpoint(root, previous=resume == PREVIOUS)
    else:
        advice = "pass --resume to continue it or choose another out"
        last = refuse_existing(root, advice)
        if checkpoint_dirs(root):  # step-* directories but no complete LATEST: never overwrite them
            raise HybridInputError(f"{root}: already holds checkpoints (newest {checkpoint_dirs(root)[0].name}; "
                                   f"LATEST names no complete one); {advice}")

    with training_stage(out, cfg.train.batch_size, tracking=cfg.tracking,
                        collective_timeout_s=cfg.train.collective_timeout_s,
                        single_process_group=cfg.train.shard_tables) as stage:
        ctx = stage.ctx
        # every check before the first write (config.yaml, after the model is built): a refused run leaves ``out`` as it was
        if last is not None:
            check_feature_map(last, read_manifest(last), fm, model_cfg.features, cfg.data)

        features = list(model_cfg.features)
        train_loader = make_loader(
            SequenceBatchConverter(prepared, "pretrain_train", max_len=cfg.train.max_len, features=features),
            batch_size=cfg.train.batch_size // ctx.world_size, shuffle=True, seed=cfg.train.seed,
            num_replicas=ctx.world_size, rank=ctx.rank, num_workers=cfg.train.num_workers,
            pin_memory=pin_memory(ctx.device))
        eval_loader = make_loader(
            SequenceBatchConverter(prepared, "pretrain_eval", max_len=cfg.train.max_len, features=features),
            batch_size=cfg.train.eval_batch_size, shuffle=False,  # whole split on every rank (see evaluate)
            seed=cfg.train.seed, max_users=cfg.train.eval_max_users, pin_memory=pin_memory(ctx.device))
        counts = torch.from_numpy(training_item_counts(prepared))
        baseline = popularity_metrics(eval_loader, counts, k=cfg.train.k)

        try:
            model = build_model(model_cfg, fm.vocab_sizes(), cfg.train.optim, seed=cfg.train.seed, ctx=ctx,
                                shard=cfg.train.shard_tables or ctx.is_distributed)
        except ValueError as err:  # e.g. adam for sharded tables on CPU
            raise HybridInputError(str(err)) from None
        stage.write_inputs(cfg, fm)   # after the last check (the model's): a refused run writes nothing
        core = unwrap(model)
        dhash = prepared.stats.get("data_hash") or data_hash(cfg.data)
        tags = {"stage": "pretrain", "strategy": "none", "model_size": model_cfg.backbone.size_name,
                "backbone_kind": model_cfg.backbone.kind, "dense_params": core.dense_parameter_count(),
                "sparse_params": core.sparse_parameter_count(), "data_hash": dhash}
        if last is not None:
            tags["resumed_from"] = str(last)

        run_name = f"pretrain-{model_cfg.backbone.size_name}-{model_cfg.backbone.kind}"
        # a resumed run continues the MLflow run its checkpoint was written by (when the store has it)
        resume_run = read_manifest(last).get("mlflow_run_id") if last is not None else None
        with stage.track(cfg.tracking, run_name, parent=parent_run, tags=tags, resume=resume_run) as (tracker, run):
            tracker.log_params(run, {**to_dict(cfg), "resolved_model": model_cfg.to_dict()})
            tracker.log_prepared_data(run, cfg.data, prepared.stats, PRETRAIN_INPUTS, digest=dhash)
            tracker.log_metrics(run, {f"baseline/popularity_{k}": v for k, v in baseline.items()}, step=0)

            def log_metrics(metrics: dict[str, float], step: int, epoch: float) -> None:
                tracker.log_metrics(run, metrics, step=step, epoch=epoch)

            manifest = {"config": to_dict(cfg), "feature_map": fm.to_dict(), "data_hash": dhash,
                        "mlflow_run_id": run}
            result = train(model, train_loader, eval_loader, cfg.train, ctx=ctx, checkpoint_dir=root,
                           manifest=manifest, resume=bool(resume), resume_from=last, log_metrics=log_metrics,
                           item_counts=counts)
            summary = {"metrics": result.metrics, "baseline": baseline,
                       "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                       "step": result.step, "epoch": result.epoch,
                       "seconds_per_step": float(np.median(result.step_seconds)) if result.step_seconds else None,
                       "seconds": round(time.perf_counter() - started, 2)}
            stage.write_json("result.json", summary)
            tracker.log_json(run, summary, "pretrain_result.json")
        return summary
