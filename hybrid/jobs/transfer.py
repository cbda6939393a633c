"""Glue between the fine-tuning stage and the adapters: a strategy + a pretraining checkpoint → the
``prepare_model`` hook that :func:`hybrid.jobs.finetune.run_finetune` calls on the freshly built ranker
(before its tables get optimizers and before sharding, so sparse-frozen tables get none).

Used by ``hybrid finetune --init CKPT --strategy ...`` and by ``hybrid sweep``.

Example:
    >>> config = transfer_config("st_sf", "runs/pretrain/checkpoints", {"new_rows": "mean"})
    >>> config.strategy.freezes_tables, config.new_rows
    (True, 'mean')
    >>> hook = transfer_hook(config)                 # hook(model, feature_map) -> the transfer report
    >>> run_finetune(cfg, prepare_model=hook)        # doctest: +SKIP
    >>> # usually no hook: cfg.transfer = config, and run_finetune(cfg) applies it
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hybrid.adapters import Strategy, TransferConfig, apply_transfer
from hybrid.tracking import is_rank_zero

STRATEGIES = tuple(s.value for s in Strategy)


def transfer_config(strategy: str, checkpoint: str | None, options: Mapping[str, Any] | None = None) -> TransferConfig:
    """A :class:`~hybrid.adapters.TransferConfig` (a bad strategy / option raises ``TransferError``, a
    ``HybridInputError``: one line, exit 2)."""
    return TransferConfig.from_dict({"strategy": strategy, "checkpoint": checkpoint, **(options or {})})


def transfer_hook(config: TransferConfig):
    """``prepare_model(model, feature_map)`` applying the transfer ``config``; returns the report as a dict."""

    def prepare_model(model, feature_map) -> dict[str, Any]:
        report = apply_transfer(model, config, feature_map)
        if is_rank_zero():   # every rank applies the transfer; one prints what it did
            print(report, flush=True)
        return report.to_dict()

    return prepare_model
