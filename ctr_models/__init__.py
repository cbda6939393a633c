"""Built-in CTR rankers, their layers and metrics.

Rankers (each: a frozen config dataclass with ``tiny()``, and an ``nn.Module`` with
``forward(batch: CTRBatch) -> logits [B, T]``, ``auxiliary_losses()`` and ``logging_metrics()``):

==========================  =============================  ==============================================
registry name               config                         module
==========================  =============================  ==============================================
``dcn_v2``                  :class:`DCNv2Config`           :class:`hybrid.ctr_models.dcn_v2.DCNv2`
``mmoe``                    :class:`MMoEConfig`            :class:`hybrid.ctr_models.moe.MMoE`
``multi_embedding_moe``     :class:`MultiEmbeddingMoEConfig`  :class:`hybrid.ctr_models.moe.MultiEmbeddingMoE`
``tin``                     :class:`TINConfig`             :class:`hybrid.ctr_models.tin.TIN`
``gpsd``                    :class:`GPSDRankerConfig`      :class:`hybrid.ctr_models.gpsd_ranker.GPSDRanker`
==========================  =============================  ==============================================

Serving: :mod:`hybrid.ctr_models.export` turns any of them into a ``torch.export`` program over plain tables and
padded ids (``export_ranker``, ``save_exported``, ``load_exported``).

Example:
    >>> model = build_ranker("dcn_v2", {"cross_type": "mixture"}, vocab_sizes, ("click",))
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hybrid.ctr_models._config import config_from_dict
from hybrid.ctr_models.base import Ranker
from hybrid.ctr_models.dcn_v2 import DCNv2, DCNv2Config
from hybrid.ctr_models.features import (
    CTRFeatures,
    CTRInputs,
    FeatureConfig,
    FeatureSpec,
)
from hybrid.ctr_models.gpsd_ranker import GPSDRanker, GPSDRankerConfig
from hybrid.ctr_models.history import HistoryConfig
from hybrid.ctr_models.metrics import (
    auc,
    ctr_metrics,
    detect_one_epoch_drop,
    gauc,
    logloss,
    one_epoch_drop,
)
from hybrid.ctr_models.moe import (
    MMoE,
    MMoEConfig,
    MultiEmbeddingMoE,
    MultiEmbeddingMoEConfig,
    cross_expert_correlation,
)
from hybrid.ctr_models.multimodal import (
    MNSE,
    MultimodalConfig,
    MultimodalFeatures,
    SimTier,
    mk_mmd,
)
from hybrid.ctr_models.tin import TIN, TINConfig

# name -> (module, config class name, model class name). hybrid.core.backbones is imported only when a
# transformer is actually built, so the other rankers never depend on it.
_RANKERS: dict[str, tuple[str, str, str]] = {
    "dcn_v2": ("hybrid.ctr_models.dcn_v2", "DCNv2Config", "DCNv2"),
    "mmoe": ("hybrid.ctr_models.moe", "MMoEConfig", "MMoE"),
    "multi_embedding_moe": ("hybrid.ctr_models.moe", "MultiEmbeddingMoEConfig", "MultiEmbeddingMoE"),
    "tin": ("hybrid.ctr_models.tin", "TINConfig", "TIN"),
    "gpsd": ("hybrid.ctr_models.gpsd_ranker", "GPSDRankerConfig", "GPSDRanker"),
}
RANKER_NAMES: tuple[str, ...] = tuple(_RANKERS)


def ranker_classes(name: str) -> tuple[type, type]:
    """``(config class, model class)`` of the registered ranker ``name``."""
    if name not in _RANKERS:
        raise ValueError(f"ranker: unknown name {name!r}; expected one of {list(_RANKERS)}")
    module_name, config_cls, model_cls = _RANKERS[name]
    module = importlib.import_module(module_name)
    return getattr(module, config_cls), getattr(module, model_cls)


def build_ranker(name: str, config: Any, vocab_sizes: Mapping[str, int], task_names: Sequence[str],
                 embedding_device: torch.device | str | None = None,
                 item_vectors: torch.Tensor | None = None) -> Ranker:
    """Build a registered ranker.

    Args:
        name: one of :data:`RANKER_NAMES`.
        config: the ranker's config dataclass, a (nested) mapping of its fields (from YAML), or ``None``
            for the defaults. Unknown keys raise ``ValueError`` naming them.
        vocab_sizes: feature → vocabulary size (reserved ids included), from the feature map.
        task_names: label columns; the model returns one logit per task, in this order.
        embedding_device: where embedding tables are created (``"meta"`` before sharding).
        item_vectors: ``[V, d]`` item-vector matrix aligned to the ``item_id`` vocabulary
            (``hybrid.data.item_vectors``), for a config whose ``multimodal`` section switches a feature on
            (DCN-v2, MMoE, multi-embedding MoE, TIN); ``None`` otherwise.

    Example:
        >>> build_ranker("tin", TINConfig.tiny(), {"item_id": 50, "category": 8}, ("click",))
        TIN(...)
    """
    config_cls, model_cls = ranker_classes(name)
    cfg = config_cls() if config is None else config_from_dict(config_cls, config)
    return model_cls(cfg, vocab_sizes, task_names, embedding_device=embedding_device, item_vectors=item_vectors)


__all__ = [
    "RANKER_NAMES", "build_ranker", "ranker_classes", "Ranker", "CTRFeatures", "CTRInputs", "FeatureConfig",
    "FeatureSpec", "HistoryConfig", "DCNv2", "DCNv2Config", "MMoE", "MMoEConfig",
    "MultiEmbeddingMoE", "MultiEmbeddingMoEConfig", "cross_expert_correlation", "TIN", "TINConfig",
    "GPSDRanker", "GPSDRankerConfig", "auc", "logloss", "gauc", "ctr_metrics", "one_epoch_drop",
    "detect_one_epoch_drop", "MultimodalConfig", "MultimodalFeatures", "SimTier", "MNSE", "mk_mmd",
]
