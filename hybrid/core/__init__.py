"""What every part of ``hybrid`` shares, with no import of the jobs above it.

The error hierarchy (:mod:`hybrid.core.errors`), the feature map — vocabularies, reserved ids, raw-id
alignment, table naming (:mod:`hybrid.core.feature_map`) —, the batch types every model consumes
(:mod:`hybrid.core.batch`), the strict config loader (:mod:`hybrid.core.config`), checkpoint I/O
(:mod:`hybrid.core.checkpoint`), the sequence backbones (:mod:`hybrid.core.backbones`) and the distributed
training runtime (:mod:`hybrid.core.training`). Import direction: ``hybrid.jobs`` / CLI → ``hybrid.adapters``
→ ``hybrid.pretrain`` / ``hybrid.ctr_models`` → ``hybrid.core`` (``hybrid.data`` → ``hybrid.core``).
"""
from hybrid.core.feature_map import NUM_RESERVED_IDS, OOV_ID, PAD_ID

__all__ = ["CTRBatch", "SequenceBatch", "PAD_ID", "OOV_ID", "NUM_RESERVED_IDS"]


def __getattr__(name: str):
    # The batch types need torchrec; loaded on first use, so the CLI's error handling and `hybrid bootstrap`
    # (which import hybrid.core.errors) work before torchrec is installed.
    if name in ("CTRBatch", "SequenceBatch"):
        from hybrid.core import batch

        return getattr(batch, name)
    raise AttributeError(f"module 'hybrid.core' has no attribute {name!r}")
