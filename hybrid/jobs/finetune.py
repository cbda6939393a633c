"""The fine-tuning stage: prepared data → CTR ranker → best/last checkpoints, logged to MLflow.

``hybrid finetune --config cfg.yaml`` (one process) and ``torchrun --nproc_per_node=N -m hybrid finetune
...`` (sharded) both call :func:`run_finetune`. It is the glue between the data pipeline
(:mod:`hybrid.data`), the training loop (:mod:`hybrid.ctr_models.trainer`, which knows nothing of the jobs) and
MLflow (:mod:`hybrid.tracking`).

The model is built in one place (:func:`build_model`); a ``prepare_model`` hook then sees it before any
optimizer exists — the seam for transfer strategies, which load pretrained weights and freeze tables there,
so a frozen table never gets an in-backward optimizer.

Output layout under ``cfg.out``::

    checkpoints/best/step-00000600/   DCP + manifest.json (config, ranker, feature map, tables, metrics)
    checkpoints/last/step-00001134/
    config.yaml                       the resolved config
    feature_map.json                  the feature map the tables are indexed by
    result.json                       summary figures, eval curve, checkpoint paths

Example:
    >>> cfg = load_config(FinetuneConfig, "configs/finetune_ml1m_ratings_dcn_v2.yaml")   # doctest: +SKIP
    >>> summary = run_finetune(cfg)   # doctest: +SKIP
    >>> summary["valid_best_auc"], summary["test_auc"], summary["one_epoch_drop"]   # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from hybrid.adapters import TransferConfig
from hybrid.config import from_mapping, to_dict
from hybrid.core.checkpoint import (
    load_checkpoint,
    read_manifest,
    resolve_checkpoint,
    resume_checkpoint,
    verify_checkpoint,
)
from hybrid.core.errors import HybridInputError
from hybrid.core.feature_map import FeatureMap
from hybrid.core.precision import pin_memory
from hybrid.core.training import seed_everything
from hybrid.ctr_models import Ranker, build_ranker, ranker_classes
from hybrid.ctr_models.trainer import (
    BEST,
    LAST,
    CTRTrainConfig,
    parameter_counts,
    prepare_for_training,
    train,
    unwrap,
)
from hybrid.data.batching import (
    CANDIDATE_FIELDS,
    SEQUENCE_FEATURES,
    CTRBatchConverter,
    make_loader,
)
from hybrid.data.item_vectors import ItemVectorsConfig, load_item_vectors
from hybrid.data.protocols import USER_FIELDS
from hybrid.data.store import data_hash, open_prepared
from hybrid.data.validation import check_prepared_stats
from hybrid.jobs.prepare import DataConfig
from hybrid.jobs.stage import PREVIOUS, check_resume_value, refuse_existing, training_stage
from hybrid.jobs.transfer import transfer_hook
from hybrid.tracking import FINETUNE_INPUTS, TrackingConfig

CHECKPOINTS = "checkpoints"
#: written when a run ends: a run with it is finished (never overwritten, nothing to resume)
RESULT_FILE = "result.json"
#: Features a CTR batch can carry (``CTRBatchConverter``): user fields, candidate fields, the genres bag and
#: the history sequences. A feature-map key outside this set is never in a batch, so no table is built for it.
CTR_FEATURES = ("user_id", *USER_FIELDS, *CANDIDATE_FIELDS, "genres", *SEQUENCE_FEATURES)

#: ``prepare_model(model, feature_map)``: called on the freshly built ranker before optimizers are attached
#: (load / freeze weights here); may return a JSON-able report, logged as ``transfer_report.json``.
PrepareModel = Callable[[Ranker, FeatureMap], "Mapping[str, Any] | None"]


@dataclass
class RankerSpec:
    """The ranker section of a fine-tuning config.

    Args:
        name: a registered ranker: ``dcn_v2``, ``mmoe``, ``multi_embedding_moe``, ``tin`` or ``gpsd``.
        config: that ranker's config as a nested mapping (``DCNv2Config`` fields for ``dcn_v2``...), checked
            key by key; unset fields keep the ranker's defaults. ``features.max_len`` follows
            ``train.max_history`` (the history window is set once).

    Example:
        >>> spec = RankerSpec("dcn_v2", {"cross_type": "mixture", "features": {"embedding_dim": 16}})
        >>> spec.resolve(max_history=20).features.max_len     # the history window is train.max_history
        20
    """

    name: str = "dcn_v2"
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.resolve()  # a typo fails when the config is loaded, not after the data is read

    def resolve(self, max_history: int | None = None) -> Any:
        """The ranker's config dataclass, with ``features.max_len = max_history`` when given.

        Raises:
            ValueError: unknown ranker, unknown key (named with its full path), bad value, or a
                ``features.max_len`` that contradicts ``max_history``.
        """
        try:
            config_cls, _ = ranker_classes(self.name)
        except ValueError:
            from hybrid.ctr_models import RANKER_NAMES

            raise ValueError(f"name: unknown ranker {self.name!r}; expected one of {list(RANKER_NAMES)}") from None
        raw = dict(self.config)
        if max_history is not None:
            features = dict(raw.get("features") or {})
            if features.get("max_len", max_history) != max_history:
                raise ValueError(f"ranker.config.features.max_len ({features['max_len']}) differs from "
                                 f"train.max_history ({max_history}); set the history window once, with "
                                 "train.max_history")
            raw["features"] = {**features, "max_len": max_history}
        try:
            return from_mapping(config_cls, raw, prefix="ranker.config.", source="ranker")
        except HybridInputError as err:  # re-raised as ValueError: the config loader adds the file name
            raise ValueError(str(err).removeprefix("ranker: ")) from None


@dataclass
class FinetuneConfig:
    """``hybrid finetune``: prepared data → CTR ranker → ``out``.

    Args:
        data: a prepared data directory (``hybrid data prepare --out ...``).
        ranker: which ranker and its config (:class:`RankerSpec`).
        task_names: label columns to train, in order; the first is the primary task (``valid/auc`` selects the best
            checkpoint). ``ratings`` data has ``click`` and ``rating5``.
        train: the loop (:class:`~hybrid.ctr_models.trainer.CTRTrainConfig`).
        out: output directory (checkpoints, resolved config, feature map, default MLflow store).
        tracking: MLflow settings.
        transfer: what to transfer from a pretraining checkpoint before training
            (:class:`~hybrid.adapters.TransferConfig`: ``strategy``, ``checkpoint``, ``table_map``, ``tables``,
            ``new_rows``, ...); ``strategy: nt`` (the default) transfers nothing. ``hybrid finetune --init CKPT
            --strategy st_sf --transfer key=value`` override this section.
        item_vectors: source of the item vectors for the ranker's multimodal features
            (``ranker.config.multimodal``): ``file`` or ``text`` (:mod:`hybrid.data.item_vectors`); ``none`` by default.
    """

    data: str = ""
    ranker: RankerSpec = field(default_factory=RankerSpec)
    task_names: list[str] = field(default_factory=lambda: ["click"])
    train: CTRTrainConfig = field(default_factory=CTRTrainConfig)
    out: str = "runs/finetune"
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="finetune"))
    item_vectors: ItemVectorsConfig = field(default_factory=ItemVectorsConfig)
    transfer: TransferConfig = field(default_factory=lambda: TransferConfig(strategy="nt"))

    def __post_init__(self) -> None:
        if not self.task_names or len(set(self.task_names)) != len(self.task_names):
            raise ValueError(f"task_names must be distinct label columns, at least one; got {self.task_names}")
        self.ranker_config()

    def ranker_config(self) -> Any:
        """The resolved ranker config dataclass (history window = ``train.max_history``)."""
        return self.ranker.resolve(self.train.max_history)


def ctr_vocab_sizes(fm: FeatureMap) -> dict[str, int]:
    """Vocabulary sizes of the feature-map keys a CTR batch can carry (:data:`CTR_FEATURES`)."""
    return {k: v for k, v in fm.vocab_sizes().items() if k in CTR_FEATURES}


def build_model(cfg: FinetuneConfig, feature_map: FeatureMap, *,
                embedding_device: torch.device | str | None = None,
                item_vectors: torch.Tensor | None = None) -> Ranker:
    """The ranker of ``cfg`` over ``feature_map``'s vocabularies, initialised from ``cfg.train.seed``.

    Args:
        cfg: the job config (ranker, task names, seed, history window).
        feature_map: the prepared data's (or a checkpoint's) feature map.
        embedding_device: where the tables are created (``"meta"`` before sharding).
        item_vectors: ``[V, d]`` item vectors for the multimodal features (:func:`job_item_vectors`).

    Raises:
        HybridInputError: a config the ranker refuses (e.g. a field the data does not have).

    Example:
        >>> model = build_model(FinetuneConfig(data=str(prepared_dir)), open_prepared(prepared_dir).feature_map)
        >>> model.spec.kjt_keys          # the KJT keys its batches must carry
        ('item_id', 'user_id', 'category', 'year', 'gender', 'age', 'occupation', 'genres', 'hist_item_id', ...)
    """
    config = cfg.ranker_config()
    seed_everything(cfg.train.seed)
    try:
        return build_ranker(cfg.ranker.name, config, ctr_vocab_sizes(feature_map), cfg.task_names,
                            embedding_device=embedding_device, item_vectors=item_vectors)
    except ValueError as err:
        raise HybridInputError(f"ranker ({cfg.ranker.name}): {err}") from None


def items_of_prepared(prepared_dir: str | Path):
    """The raw items table behind a prepared directory (re-read from the dataset its ``config.yaml`` names)."""
    config_file = Path(prepared_dir) / "config.yaml"
    if not config_file.is_file():
        raise HybridInputError(f"{config_file}: not found; item text needs the prepared data's config to find "
                               "the dataset's items table")
    raw = yaml.safe_load(config_file.read_text()) or {}
    data = from_mapping(DataConfig, raw.get("data") or {}, prefix="data.", source=str(config_file))
    return data.read().items


def job_item_vectors(cfg: FinetuneConfig, feature_map: FeatureMap) -> torch.Tensor | None:
    """The ``[V, d]`` item vectors of ``cfg.item_vectors`` aligned to ``feature_map`` (``None`` for ``none``);
    ``text`` takes the item text from the dataset named in the prepared directory's ``config.yaml``."""
    if cfg.item_vectors.source == "none":
        return None
    items = items_of_prepared(cfg.data) if cfg.item_vectors.source == "text" else None
    return load_item_vectors(cfg.item_vectors, feature_map, items).vectors


def run_finetune(cfg: FinetuneConfig, parent_run: str | None = None, prepare_model: PrepareModel | None = None,
                 strategy: str | None = None, resume: bool | str = False) -> dict[str, Any]:
    """Train the ranker of ``cfg`` (sharded under ``torchrun``); log to MLflow on rank 0.

    Args:
        cfg: the job config.
        parent_run: MLflow run id to nest this stage under.
        prepare_model: ``prepare_model(model, feature_map)`` runs on the built (unsharded, CPU) ranker before
            the tables get their in-backward optimizer and before sharding: load pretrained weights and set
            ``requires_grad=False`` on frozen tables there (a frozen table then gets no optimizer). A
            returned mapping is saved as ``transfer_report.json`` (out dir and MLflow artifact); its
            ``tags`` (e.g. ``pretrain_run_id``), ``config`` (logged as ``transfer.*`` params) and ``metrics``
            (e.g. ``transfer/frozen_params``) are logged with the run.
            Default: the transfer of ``cfg.transfer`` (none for ``nt``); a hook given here replaces it.
        strategy: the ``strategy`` tag; default ``cfg.transfer.strategy`` (``nt`` = no transfer).
        resume: continue an interrupted run of ``cfg.out`` from its ``checkpoints/last`` checkpoint, exactly (same
            steps, weights and validation curve as without the interruption), in the same MLflow run;
            ``"previous"``: from the newest one that verifies when the one ``LATEST`` names is corrupt.

    Returns:
        the validation figures (``valid_best_auc``, ``valid_auc_epoch1``, ``best_epoch``, ``one_epoch_drop``,
        ...: what selected the ``best`` checkpoint), the test figures at the selected step (``test_auc``,
        ``test_logloss``, ``test_gauc``) and of the final weights (``test_final_auc``, ...) — see
        ``CTRTrainResult.summary`` — plus ``curve`` (``[[epoch, valid auc], ...]``), ``best_checkpoint``,
        ``last_checkpoint``, ``run_id``, ``seconds``.

    Raises:
        HybridInputError: bad config or data (one line naming the key, column or file).
    """
    started = time.perf_counter()
    if not cfg.data:
        raise HybridInputError("data: set the prepared data directory (data: runs/ml1m/ratings)")
    if prepare_model is None and cfg.transfer.strategy.moves_tables:
        prepare_model = transfer_hook(cfg.transfer)
    strategy = strategy or cfg.transfer.strategy.value
    check_prepared_stats(cfg.data, "finetune")  # an empty split: one line, before anything is built
    prepared = open_prepared(cfg.data)
    if len(prepared.ctr_valid) == 0:
        raise HybridInputError(f"{cfg.data}: the prepared data has no validation samples (ctr_valid); fine-tuning "
                               "selects its checkpoint on validation: prepare it with protocol.validation_share > 0")
    fm = prepared.feature_map
    out = Path(cfg.out)
    root = out / CHECKPOINTS
    check_resume_value(resume)
    finished = (out / RESULT_FILE).is_file()
    last = None
    if resume:
        if finished:
            raise HybridInputError(f"{out}: this fine-tuning run finished ({RESULT_FILE} is written); nothing to resume")
        last = resume_checkpoint(root / LAST, previous=resume == PREVIOUS)  # verified, before anything is written
        if last is None:
            raise HybridInputError(f"{root / LAST}: no checkpoint to resume from; start without --resume")
        saved_fm = FeatureMap.from_dict(read_manifest(last)["feature_map"], source=f"{last}/manifest.json")
        if saved_fm.fingerprint() != fm.fingerprint():
            raise HybridInputError(f"{last}: written over another prepared dataset (feature map {saved_fm.fingerprint()} "
                                   f"vs {fm.fingerprint()} of {cfg.data}); resume with the data it was trained on")
    else:
        advice = ("a finished run is never overwritten; choose another out" if finished else
                  "an interrupted run: pass --resume to continue it, or choose another out")
        for kind in (BEST, LAST):
            refuse_existing(root / kind, advice)

    with training_stage(out, cfg.train.batch_size, tracking=cfg.tracking,
                        collective_timeout_s=cfg.train.collective_timeout_s,
                        single_process_group=cfg.train.shard_tables) as stage:
        ctx = stage.ctx
        # Built on CPU on every rank (same seed, same values) even when sharded: prepare_model sees real
        # tables it can load into, and shard_model carries non-meta table values into the shards.
        item_vectors = job_item_vectors(cfg, fm)
        model = build_model(cfg, fm, item_vectors=item_vectors)
        counts = parameter_counts(model)
        report = prepare_model(model, fm) if prepare_model is not None else None
        try:
            model = prepare_for_training(model, cfg.train.optim, ctx=ctx,
                                         shard=cfg.train.shard_tables or ctx.is_distributed)
        except ValueError as err:
            raise HybridInputError(str(err)) from None
        core = unwrap(model)

        # Batches carry exactly the keys the ranker reads; a missing label column is a one-line error.
        fields = list(core.spec.kjt_keys)
        tasks = tuple(cfg.task_names)
        window = cfg.train.max_history
        train_loader = make_loader(
            CTRBatchConverter(prepared, "ctr_train", max_history=window, fields=fields, task_names=tasks),
            batch_size=cfg.train.batch_size // ctx.world_size, shuffle=True, seed=cfg.train.seed,
            num_replicas=ctx.world_size, rank=ctx.rank, num_workers=cfg.train.num_workers,
            pin_memory=pin_memory(ctx.device))
        # select on validation, report test: both whole splits on every rank
        valid_loader, test_loader = (make_loader(
            CTRBatchConverter(prepared, split, max_history=window, fields=fields, task_names=tasks),
            batch_size=cfg.train.eval_batch_size, shuffle=False, seed=cfg.train.seed,
            max_users=cfg.train.eval_max_users, pin_memory=pin_memory(ctx.device)) for split in ("ctr_valid", "ctr_test"))

        stage.write_inputs(cfg, fm)
        if report is not None:
            stage.write_json("transfer_report.json", report)

        dhash = prepared.stats.get("data_hash") or data_hash(cfg.data)
        # dense_params is GPSD's count (the backbone's) when the ranker has a transformer backbone — the N
        # of the scaling fit, as the pretraining stage tags it — else every non-table parameter.
        tags = {"stage": "finetune", "ranker": cfg.ranker.name, "strategy": strategy, "seed": cfg.train.seed,
                "dense_params": counts["backbone"] or counts["dense"], "dense_params_total": counts["dense"],
                "sparse_params": counts["sparse"], "data_hash": dhash,
                "protocol": prepared.stats.get("protocol", "unknown"), "tasks": ",".join(tasks)}
        backbone = _backbone_config(core.config)
        if backbone is not None:
            tags["model_size"] = backbone.size_name
        if report is not None:
            # a transfer report (adapters.TransferReport.to_dict) links the run to its pretraining run
            tags.update({k: v for k, v in (report.get("tags") or {}).items() if k not in tags})

        run_name = f"finetune-{cfg.ranker.name}-{strategy}-seed{cfg.train.seed}"
        if last is not None:
            tags["resumed_from"] = str(last)
        # a resumed run continues the MLflow run its checkpoint was written by (when the store has it)
        resume_run = read_manifest(last).get("mlflow_run_id") if last is not None else None
        with stage.track(cfg.tracking, run_name, parent=parent_run, tags=tags, resume=resume_run) as (tracker, run):
            params = {**to_dict(cfg), "resolved_ranker": dataclasses.asdict(core.config)}
            if report is not None and report.get("config"):
                # the transfer that ran (a prepare_model hook's, which may differ from cfg.transfer) is logged
                # as the transfer.* params, once: MLflow refuses a param changed within a run
                params["transfer"] = report["config"]
            tracker.log_params(run, params)
            tracker.log_prepared_data(run, cfg.data, prepared.stats, FINETUNE_INPUTS, digest=dhash)
            if report is not None:
                tracker.log_json(run, report, "transfer_report.json")
                # what was loaded / frozen: metrics (counts) beside the JSON
                if report.get("metrics"):
                    tracker.log_metrics(run, report["metrics"], step=0)

            def log_metrics(metrics: dict[str, float], step: int, epoch: float) -> None:
                tracker.log_metrics(run, metrics, step=step, epoch=epoch)

            manifest = {"config": to_dict(cfg), "ranker_name": cfg.ranker.name, "feature_map": fm.to_dict(),
                        "data_hash": dhash, "strategy": strategy, "mlflow_run_id": run,
                        # load_finetuned rebuilds the ranker with a placeholder of this shape; the vectors
                        # themselves are the ranker's buffer, restored with the weights.
                        "item_vectors_shape": list(item_vectors.shape) if item_vectors is not None else None}
            result = train(model, train_loader, valid_loader, cfg.train, ctx=ctx, checkpoint_dir=root,
                           manifest=manifest, log_metrics=log_metrics, test_loader=test_loader, resume_from=last)
            summary = result.summary()
            drop = result.one_epoch
            tracker.set_tags(run, {"one_epoch_drop": "true" if drop.flagged else "false"})
            final = {"one_epoch/drop": float(drop.flagged), **{f"summary/{k}": v for k, v in summary.items()
                                                                  if k not in ("one_epoch_drop", "steps", "epochs")}}
            if not math.isnan(drop.drop):
                final["one_epoch/drop_size"] = drop.drop
            final["one_epoch/tolerance"] = drop.tolerance  # the dip that counts: the validation set's noise
            tracker.log_metrics(run, {k: float(v) for k, v in final.items() if not math.isnan(float(v))},
                                step=result.step, epoch=result.epoch)
            summary.update(curve=[list(p) for p in result.curve()], run_id=run,
                           best_checkpoint=str(result.best_checkpoint) if result.best_checkpoint else None,
                           last_checkpoint=str(result.last_checkpoint) if result.last_checkpoint else None,
                           seconds=round(time.perf_counter() - started, 2))
            stage.write_json(RESULT_FILE, summary)
            tracker.log_json(run, summary, "finetune_result.json")
        return summary


def _backbone_config(config: Any) -> Any:
    """The transformer backbone config of a ranker config (GPSD ranker, transformer history), or None."""
    backbone = getattr(config, "backbone", None)
    if backbone is None:
        backbone = getattr(getattr(config, "history", None), "backbone", None)
    return backbone if hasattr(backbone, "size_name") else None


def load_finetuned(checkpoint: str | Path) -> tuple[Ranker, dict[str, Any]]:
    """Rebuild the ranker saved in a fine-tuning checkpoint (unsharded, on CPU) and load its weights.

    Args:
        checkpoint: a checkpoint directory (``<out>/checkpoints/best/step-…``) or a ``best`` / ``last``
            root (the checkpoint its ``LATEST`` names is used). It is verified before anything is read
        (:func:`~hybrid.core.checkpoint.verify_checkpoint`).

    Returns:
        ``(model in eval mode, manifest)``; ``manifest["feature_map"]`` is the feature map of its ids.

    Example:
        >>> model, manifest = load_finetuned("runs/ml1m/finetune-dcn_v2/checkpoints/best")   # doctest: +SKIP
        >>> manifest["metrics"]["valid/auc"], manifest["metrics"]["test/auc"]   # doctest: +SKIP
    """
    path = resolve_checkpoint(checkpoint)
    if path is None:
        raise HybridInputError(f"{checkpoint}: no complete fine-tuning checkpoint here")
    manifest = verify_checkpoint(path)  # a corrupt / incomplete one: one line naming the file (exit 2)
    try:
        fm = FeatureMap.from_dict(manifest["feature_map"], source=f"{path}/manifest.json")
        shape = manifest.get("item_vectors_shape")
        model = build_ranker(manifest["ranker_name"], manifest["ranker_config"], ctr_vocab_sizes(fm),
                             manifest["task_names"], item_vectors=torch.zeros(shape) if shape else None)
    except (KeyError, ValueError) as err:
        raise HybridInputError(f"{path}: not a fine-tuning checkpoint this version can rebuild ({err})") from None
    state = {"model": model.state_dict()}
    load_checkpoint(path, state)  # a CheckpointError is a HybridInputError: one line, exit 2
    model.load_state_dict(state["model"])
    return model.eval(), manifest
