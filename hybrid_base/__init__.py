"""Small pieces shared by ``pretrain``, ``ctr_models`` and ``adapters`` without importing ``hybrid``.

What lives here: the batch types every model consumes (:mod:`hybrid_base.batch`), the reserved
vocabulary ids, and the one strict config loader (:mod:`hybrid_base.config`, raising
:class:`hybrid_base.errors.HybridInputError`) used by the jobs and the model configs alike. Import direction: ``hybrid`` → ``adapters`` → ``pretrain`` / ``ctr_models`` → ``hybrid_base``.
"""
from hybrid_base.batch import CTRBatch, SequenceBatch
from hybrid_base.ids import NUM_RESERVED_IDS, OOV_ID, PAD_ID

__all__ = ["CTRBatch", "SequenceBatch", "PAD_ID", "OOV_ID", "NUM_RESERVED_IDS"]
