"""``hybrid sweep``: a grid of backbone sizes × transfer strategies × seeds, as nested MLflow runs.

For every size the generative model is pretrained once (``pretrain_seed``); every (size, strategy, seed)
point then fine-tunes the ranker with that transfer. All runs nest under one ``sweep`` parent run in one
experiment, so ``hybrid review --experiment ...`` draws the strategy table, the one-epoch picture and the
scaling curve from them.

- A point that fails (bad size, diverging run, ...) is recorded — its MLflow run ends FAILED, the parent
  gets a ``failed/<point>`` tag with the error, ``<point>/error.txt`` holds it — and the others go on.
- A re-run skips finished points (their ``result.json`` exists) and retries unfinished ones from scratch.

Output layout under ``out``: ``pretrain/<size>/`` and ``finetune/<size>/<strategy>/seed<k>/``.

Example:
    >>> cfg = load_config(SweepConfig, "configs/sweep_ml1m_last_item.yaml")   # doctest: +SKIP
    >>> summary = run_sweep(cfg)   # doctest: +SKIP
    >>> # then: hybrid review --experiment <cfg.tracking.experiment>
"""
from __future__ import annotations

import copy
import json
import shutil
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hybrid.core.backbones import BackboneConfig
from hybrid.core.errors import HybridInputError
from hybrid.jobs.finetune import FinetuneConfig, RankerSpec, run_finetune
from hybrid.jobs.pretrain import PretrainConfig, run_pretrain
from hybrid.jobs.transfer import STRATEGIES, transfer_config
from hybrid.tracking import FALLBACK_NAME, TAGS, TrackingConfig, make_tracker

RESULT = "result.json"


@dataclass
class SweepConfig:
    """``hybrid sweep``: what to vary and the two stage templates.

    Args:
        sizes: backbone sizes ``L{layers}H{dim}A{heads}``; each sets the pretrained backbone, the ranker's
            backbone (GPSD ranker / transformer history) and the embedding width.
        strategies: transfer strategies, of ``nt``, ``ft``, ``st``, ``ft_sf``, ``st_sf``.
        seeds: fine-tuning seeds (every point is run once per seed).
        pretrain_seed: the seed of the one pretraining run per size.
        pretrain: the pretraining template (``model.size`` and ``out`` are set per size).
        finetune: the fine-tuning template (size, seed, ``out`` and tracking are set per point).
        transfer: extra transfer settings for every point (``new_rows``, ``tables``; see ``TransferConfig``).
        out: root of all outputs.
        tracking: MLflow settings; every stage logs into this experiment, nested under the sweep run
            (named ``tracking.run_name``, default ``sweep``), each named for its point (``pretrain L4H64A4 seed0``,
            ``finetune gpsd L4H64A4 st_sf seed1``).
    """

    sizes: list[str] = field(default_factory=lambda: ["L4H32A4", "L4H64A4", "L4H128A4", "L4H256A4"])
    strategies: list[str] = field(default_factory=lambda: ["nt", "st_sf"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    pretrain_seed: int = 0
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    transfer: dict[str, Any] = field(default_factory=dict)
    out: str = "runs/sweep"
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="sweep"))

    def __post_init__(self) -> None:
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            raise ValueError(f"strategies: unknown {unknown[0]!r} (expected some of {', '.join(STRATEGIES)})")
        if not self.sizes or not self.strategies or not self.seeds:
            raise ValueError("sizes, strategies and seeds must each name at least one value")


def _size_dims(size: str) -> BackboneConfig:
    try:
        return BackboneConfig.from_size(size)
    except ValueError as err:
        raise HybridInputError(f"sizes: {err}") from None


def finetune_for(cfg: SweepConfig, size: str, strategy: str, seed: int) -> FinetuneConfig:
    """The fine-tuning config of one point: the template with this size, seed, output and tracking."""
    dims = _size_dims(size)
    raw = copy.deepcopy(cfg.finetune.ranker.config)
    # Tables must be as wide as the pretrained ones for a transfer; a transformer must have the size swept.
    raw["features"] = {**(raw.get("features") or {}), "embedding_dim": dims.dim}
    shape = {"num_layers": dims.num_layers, "dim": dims.dim, "num_heads": dims.num_heads}
    if "backbone" in raw or cfg.finetune.ranker.name == "gpsd":
        raw["backbone"] = {**(raw.get("backbone") or {}), **shape}
    history = raw.get("history") or {}
    if history.get("encoder") == "transformer":
        raw["history"] = {**history, "backbone": {**(history.get("backbone") or {}), **shape}}
    point_out = Path(cfg.out) / "finetune" / size / strategy / f"seed{seed}"
    name = f"finetune {cfg.finetune.ranker.name} {size} {strategy} seed{seed}"
    return replace(cfg.finetune, ranker=RankerSpec(cfg.finetune.ranker.name, raw),
                   train=replace(cfg.finetune.train, seed=seed), out=str(point_out),
                   tracking=replace(cfg.tracking, run_name=name))


def pretrain_for(cfg: SweepConfig, size: str) -> PretrainConfig:
    _size_dims(size)
    return replace(cfg.pretrain, model=replace(cfg.pretrain.model, size=size),
                   train=replace(cfg.pretrain.train, seed=cfg.pretrain_seed),
                   out=str(Path(cfg.out) / "pretrain" / size),
                   tracking=replace(cfg.tracking, run_name=f"pretrain {size} seed{cfg.pretrain_seed}"))


def _finished(out: str | Path) -> dict | None:
    result = Path(out) / RESULT
    return json.loads(result.read_text()) if result.is_file() else None


def _fresh(out: str | Path) -> None:
    """An unfinished point starts over: what a crashed attempt left would be refused as 'already there'."""
    shutil.rmtree(out, ignore_errors=True)


def run_sweep(cfg: SweepConfig) -> dict[str, Any]:
    """Run every point not finished yet; returns ``{"done": [...], "skipped": [...], "failed": {...}}``."""
    tracker = make_tracker(cfg.tracking, fallback=Path(cfg.out) / FALLBACK_NAME)
    # every stage logs into the sweep's store, resolved once (MLFLOW_TRACKING_URI could change under a long sweep)
    cfg = replace(cfg, tracking=replace(cfg.tracking, tracking_uri=tracker.tracking_uri))
    done, skipped, failed = [], [], {}
    with tracker.run(cfg.tracking.run_name or "sweep", tags={TAGS.stage: "sweep"}) as parent:
        tracker.log_params(parent, {"sizes": cfg.sizes, "strategies": cfg.strategies, "seeds": cfg.seeds,
                                    "pretrain_seed": cfg.pretrain_seed, "transfer": cfg.transfer})

        def record_failure(point: str, out: Path, err: BaseException) -> None:
            failed[point] = f"{type(err).__name__}: {err}"
            print(f"[sweep] {point} FAILED: {failed[point]}", flush=True)
            out.mkdir(parents=True, exist_ok=True)
            (out / "error.txt").write_text("".join(traceback.format_exception(err)))
            tracker.set_tags(parent, {f"failed/{point}": failed[point][:500]})

        for size in cfg.sizes:
            checkpoint, pretrain_error = None, None
            if any(s != "nt" for s in cfg.strategies):
                point = f"pretrain/{size}"
                out = Path(cfg.out) / point
                result = _finished(out)
                if result is not None:
                    skipped.append(point)
                else:
                    try:
                        _fresh(out)
                        print(f"[sweep] {point}", flush=True)
                        result = run_pretrain(pretrain_for(cfg, size), parent_run=parent)
                        done.append(point)
                    except Exception as err:  # noqa: BLE001 - a failed point must not stop the others
                        record_failure(point, out, err)
                        pretrain_error = failed[point]
                if result is not None:
                    checkpoint = result["checkpoint"]
            for strategy in cfg.strategies:
                for seed in cfg.seeds:
                    point = f"finetune/{size}/{strategy}/seed{seed}"
                    out = Path(cfg.out) / point
                    if _finished(out) is not None:
                        skipped.append(point)
                        continue
                    try:
                        _fresh(out)
                        if strategy != "nt" and checkpoint is None:
                            raise RuntimeError(f"no pretrained checkpoint for {size} ({pretrain_error})")
                        print(f"[sweep] {point}", flush=True)
                        point_cfg = replace(finetune_for(cfg, size, strategy, seed),
                                            transfer=transfer_config(strategy, checkpoint, cfg.transfer))
                        run_finetune(point_cfg, parent_run=parent)
                        done.append(point)
                    except Exception as err:  # noqa: BLE001
                        record_failure(point, out, err)
        tracker.log_metrics(parent, {"sweep/done": len(done), "sweep/skipped": len(skipped),
                                     "sweep/failed": len(failed)}, step=0)
    return {"done": done, "skipped": skipped, "failed": failed}
