"""Generative pretraining (GPSD-style): the model, its objectives and its training loop.

Imports ``hybrid.core`` and torch only (never the jobs, data or MLflow). The job glue that reads prepared data and logs
to MLflow is ``hybrid.jobs.pretrain``; the command is ``hybrid pretrain``.

Example:
    >>> from hybrid.pretrain import GenerativeModelConfig, PretrainTrainConfig, build_model, train
    >>> model = build_model(GenerativeModelConfig.tiny(), vocab_sizes, PretrainTrainConfig().optim)
"""
from hybrid.core.resume import (  # the checkpoint state of a resumable run, as hybrid.pretrain always exported it
    check_resumable,
    init_optimizer_state,
    load_sparse_optimizer_state,
    restore_training_state,
    sparse_optimizer_state,
    training_state,
)
from hybrid.pretrain.model import GenerativeModel, GenerativeModelConfig, table_name
from hybrid.pretrain.objectives import ObjectiveConfig, hr_ndcg_at_k
from hybrid.pretrain.trainer import (
    DEFAULT_SHARDING,
    PretrainResult,
    PretrainTrainConfig,
    build_model,
    evaluate,
    popularity_metrics,
    train,
    unwrap,
)

__all__ = [
    "DEFAULT_SHARDING",
    "GenerativeModel",
    "GenerativeModelConfig",
    "ObjectiveConfig",
    "PretrainResult",
    "PretrainTrainConfig",
    "build_model",
    "check_resumable",
    "evaluate",
    "hr_ndcg_at_k",
    "init_optimizer_state",
    "load_sparse_optimizer_state",
    "popularity_metrics",
    "restore_training_state",
    "sparse_optimizer_state",
    "table_name",
    "train",
    "training_state",
    "unwrap",
]
