"""The interface every built-in ranker implements (see :class:`Ranker`)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hybrid.core import CTRBatch


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
    """Base class of the built-in CTR rankers.

    Subclasses implement ``forward(batch: CTRBatch) -> logits [B, T]`` with one column per entry of
    ``task_names`` (same order as ``CTRBatch.labels``), and may override:

    * :meth:`auxiliary_losses` — extra loss terms of the **last** forward, already weighted, to be added to
      the BCE by the trainer (e.g. ``{"decorrelation": λ·L}``); empty by default.
    * :meth:`logging_metrics` — detached diagnostics of the last forward for MLflow
      (e.g. ``{"moe/cross_expert_corr": 0.12}``); empty by default.

    A ranker with multimodal features keeps them in ``self.multimodal``
    (:class:`hybrid.ctr_models.multimodal.MultimodalFeatures`, or ``None``); their loss (``mkmmd``) and metrics
    (``mm/...``) are included here, so subclasses that override these methods merge with ``super()``.
    """

    task_names: tuple[str, ...]

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        multimodal = getattr(self, "multimodal", None)
        return multimodal.auxiliary_losses() if multimodal is not None else {}

    def logging_metrics(self) -> dict[str, float]:
        multimodal = getattr(self, "multimodal", None)
        return multimodal.logging_metrics() if multimodal is not None else {}

    def forward(self, batch: CTRBatch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
