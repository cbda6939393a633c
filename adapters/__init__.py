"""Transfer of generatively pretrained weights into CTR models (GPSD's NT / FT / ST / FT&SF / ST&SF).

One config, one call, one report — PEFT-style::

    from hybrid.adapters import TransferConfig, apply_transfer

    report = apply_transfer(model, TransferConfig(strategy="st_sf", checkpoint="runs/pretrain/checkpoints"),
                            target_feature_map)
    print(report)                                  # what was loaded / initialised / frozen / skipped
    model = prepare_for_training(model, optim)     # optimizers (trainable tables only), then sharding

Targets: the built-in rankers (tables found by name; FT also moves every ``hybrid.core`` backbone — the
GPSD ranker's, a transformer history encoder's) and any model of your own built on TorchRec
``EmbeddingCollection`` / ``EmbeddingBagCollection`` (sharded under DMP or not) or ``nn.Embedding``
tables, through ``table_map``. Rows are aligned by raw value through the two feature maps, never by
position. Imports ``hybrid.core``, the checkpoint layout of ``hybrid.pretrain``, torch and torchrec (never
the jobs): feature maps come in as ``FeatureMap`` objects or their dict form, and the raw-id alignment is
``hybrid.core.feature_map``'s.

Order matters for freezing: ``apply_transfer`` → optimizers (trainable tables only) → sharding with
:func:`shard_model` (``hybrid.core.training.shard_model``: tables without an optimizer get a learning-rate-0
fused kernel, transferred values stay in the shards). A plain ``DistributedModelParallel(model)`` would undo the
transfer; the model's first forward then stops with one line saying so (``hybrid.adapters.guard``).
``save_transfer`` / ``load_transfer`` keep only what the transfer owns (its tables, which are frozen, its
report) and re-apply it to a freshly built model.
"""
from hybrid.adapters.config import (
    NEW_ROW_POLICIES,
    PROJECTIONS,
    Strategy,
    TableTarget,
    TransferConfig,
    TransferError,
)
from hybrid.adapters.persist import load_transfer, save_transfer
from hybrid.adapters.report import ModuleEntry, TableEntry, TransferReport
from hybrid.adapters.source import PretrainedCheckpoint
from hybrid.adapters.transfer import apply_transfer, project
from hybrid.core.training import shard_model

__all__ = [
    "NEW_ROW_POLICIES",
    "PROJECTIONS",
    "ModuleEntry",
    "PretrainedCheckpoint",
    "Strategy",
    "TableEntry",
    "TableTarget",
    "TransferConfig",
    "TransferError",
    "TransferReport",
    "apply_transfer",
    "load_transfer",
    "project",
    "save_transfer",
    "shard_model",
]
