"""The pretraining checkpoint's layout: where each part of the generative model lives in the saved state.

A pretraining checkpoint (:func:`hybrid.pretrain.trainer.training_state`) is a DCP directory whose state
holds the model's state dict under :data:`MODEL_KEY` beside optimizer, schedule and RNG state; its
``manifest.json`` holds the config, the feature map the tables are indexed by, the table shapes and the
MLflow run id. The key names follow :class:`hybrid.pretrain.model.GenerativeModel`'s attributes
(``embeddings`` — a TorchRec ``EmbeddingCollection`` —, ``input_proj``, ``backbone``); this module is the one
place that spells them, and the transfer adapters read checkpoints through it.

Example:
    >>> table_key("t_item_id")
    'model.embeddings.embeddings.t_item_id.weight'
    >>> key_table("model.embeddings.embeddings.t_item_id.weight"), key_table("model.backbone.norm.weight")
    ('t_item_id', None)
"""
from __future__ import annotations

from hybrid.core.resume import MODEL_KEY  # the model's state dict inside the checkpoint state

#: ``GenerativeModel.embeddings`` (an ``EmbeddingCollection``: ``.embeddings.<table>.weight``).
TABLE_PREFIX = f"{MODEL_KEY}.embeddings.embeddings."
#: ``GenerativeModel.backbone`` (a :mod:`hybrid.core.backbones` module).
BACKBONE_PREFIX = f"{MODEL_KEY}.backbone."
#: ``GenerativeModel.input_proj`` (present when the table width differs from the backbone width).
INPUT_PROJ_KEY = f"{MODEL_KEY}.input_proj.weight"


def table_key(table: str) -> str:
    """DCP key of a pretrained table: ``t_item_id`` → ``model.embeddings.embeddings.t_item_id.weight``."""
    return f"{TABLE_PREFIX}{table}.weight"


def key_table(key: str) -> str | None:
    """Inverse of :func:`table_key`: the table name of a DCP key, ``None`` for a key that is no table."""
    if key.startswith(TABLE_PREFIX) and key.endswith(".weight"):
        return key[len(TABLE_PREFIX):-len(".weight")]
    return None
