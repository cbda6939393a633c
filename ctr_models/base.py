"""The interface every built-in ranker implements, and the constructor steps they share (:class:`Ranker`)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from hybrid.core import CTRBatch
from hybrid.ctr_models.features import CTRFeatures, CTRInputs, FeatureConfig, FeatureSpec
from hybrid.ctr_models.multimodal import MultimodalFeatures


def validate_task_names(task_names: Sequence[str], config: str) -> tuple[str, ...]:
    """Return ``task_names`` as a tuple, or raise ``ValueError`` naming ``task_names`` / ``num_tasks``.

    Example:
        >>> validate_task_names(["click", "rating5"], "MMoEConfig")
        ('click', 'rating5')
    """
    if isinstance(task_names, str):
        raise ValueError(f"{config}: task_names must be a sequence of names, got the string {task_names!r}")
    names = tuple(task_names)
    if len(names) < 1:
        raise ValueError(f"{config}: task_names is empty (num_tasks = 0); a ranker needs at least one task")
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise ValueError(f"{config}: task_names must be non-empty strings, got {list(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{config}: task_names has duplicates: {list(names)}")
    return names


class Ranker(nn.Module):
    """Base class of the built-in CTR rankers: one constructor path, one interface.

    Every ranker is built as ``Ranker(config, vocab_sizes, task_names, embedding_device=None,
    item_vectors=None)`` (:func:`hybrid.ctr_models.build_ranker` calls exactly this). Its ``__init__`` calls
    ``super().__init__(config, vocab_sizes, task_names)`` first, which sets what every ranker has:

    * ``config`` — the ranker's frozen config dataclass;
    * ``task_names`` — validated label columns (one logit per task, in this order);
    * ``spec`` — the :class:`~hybrid.ctr_models.features.FeatureSpec` of ``config.features`` over
      ``vocab_sizes`` (a ranker with its own defaults passes ``features=``).

    ``forward(batch: CTRBatch) -> logits [B, T]`` is two steps, which subclasses implement:

    * :meth:`embed` — the TorchRec part: the batch's KJT through the ranker's
      :class:`~hybrid.ctr_models.features.CTRFeatures` into dense :class:`~hybrid.ctr_models.features.CTRInputs`
      (one per embedding set: a list for the multi-embedding MoE, :attr:`multi_embedding`);
    * :meth:`forward_inputs` — the dense body on those views only. It never reads the batch, so the same body
      runs on views built another way (``hybrid.ctr_models.export.ServingRanker``: plain tables on padded
      ids, exportable with ``torch.export``).

    They may override:

    * :meth:`auxiliary_losses` — extra loss terms of the **last** forward, already weighted, to be added to
      the BCE by the trainer (e.g. ``{"decorrelation": λ·L}``); empty by default.
    * :meth:`logging_metrics` — detached diagnostics of the last forward for MLflow
      (e.g. ``{"moe/cross_expert_corr": 0.12}``); empty by default.

    The multimodal features (at most one :class:`~hybrid.ctr_models.multimodal.MultimodalFeatures` per
    ranker, wherever it sits: in :class:`~hybrid.ctr_models.inputs.FlatInput` for DCN-v2 and MMoE) are found
    by :attr:`multimodal_features`; their loss (``mkmmd``) and metrics (``mm/...``) are included here, so
    subclasses that override these methods merge with ``super()``.

    Args:
        config: the ranker's config dataclass (its class name prefixes every error).
        vocab_sizes: feature → vocabulary size (reserved ids included).
        task_names: label columns.
        features: the feature layout, when it is not ``config.features`` as written.
    """

    task_names: tuple[str, ...]
    #: True when :meth:`embed` returns (and :meth:`forward_inputs` takes) one ``CTRInputs`` per embedding set.
    multi_embedding: ClassVar[bool] = False

    def __init__(self, config: Any, vocab_sizes: Mapping[str, int], task_names: Sequence[str], *,
                 features: FeatureConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.task_names = validate_task_names(task_names, type(config).__name__)
        self.spec = FeatureSpec.from_vocab_sizes(vocab_sizes, config.features if features is None else features)

    @property
    def multimodal_features(self) -> MultimodalFeatures | None:
        """The ranker's multimodal feature module (item-vector buffer, SimTier, MNSE, projection), or None."""
        return next((m for m in self.modules() if isinstance(m, MultimodalFeatures)), None)

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        multimodal = self.multimodal_features
        return multimodal.auxiliary_losses() if multimodal is not None else {}

    def logging_metrics(self) -> dict[str, float]:
        multimodal = self.multimodal_features
        return multimodal.logging_metrics() if multimodal is not None else {}

    def feature_sets(self) -> list[CTRFeatures]:
        """The ranker's embedding modules, in the order :meth:`forward_inputs` takes their views (one; ``K``
        for the multi-embedding MoE)."""
        return [m for m in self.modules() if isinstance(m, CTRFeatures)]

    def embed(self, batch: CTRBatch) -> CTRInputs | list[CTRInputs]:  # pragma: no cover - abstract
        """The batch's dense views: one :class:`CTRInputs`, or a list of one per embedding set."""
        raise NotImplementedError

    def forward_inputs(self, inputs: CTRInputs | list[CTRInputs]) -> torch.Tensor:  # pragma: no cover - abstract
        """Logits ``[B, T]`` from the views :meth:`embed` returns (the body: no KJT, no TorchRec module)."""
        raise NotImplementedError

    def forward(self, batch: CTRBatch) -> torch.Tensor:
        return self.forward_inputs(self.embed(batch))
