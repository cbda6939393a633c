"""GPSD sequence ranker: the pretrained backbone reads the history with the candidate as its last token.

GPSD (Wang et al., KDD 2025) fine-tunes the generatively pretrained transformer as a ranker:

* tokens = sum of the event's feature embeddings (``item_id`` + ``category`` + ``action``; the same
  ``t_<feature>`` tables as the pretraining model, so ST/FT transfer loads them by name);
* the candidate (``item_id`` + ``category``; its action is what is predicted, so it has none) is appended
  right after the last real history event;
* a segment embedding marks the candidate (1) against history tokens (0). It is zero-initialised, so at
  step 0 a transferred backbone sees an ordinary next-event token and training moves away from there;
* the causal backbone's state at the candidate position — which has attended to the whole history and to
  the candidate — goes through a head ``Linear(d → 4d) → ReLU → Linear(4d → 1)``, one head per task.

Module names mirror :class:`hybrid.pretrain.model.GenerativeModel` where weights transfer: ``backbone.*`` and
``input_proj.weight`` (when ``embedding_dim != backbone.dim``); tables live at
``features.ec.embeddings.t_<feature>.weight`` (pretraining: ``embeddings.embeddings.t_<feature>.weight``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hybrid.core import CTRBatch
from hybrid.ctr_models._config import freeze_lists, require
from hybrid.ctr_models.base import Ranker
from hybrid.ctr_models.features import (
    HISTORY_ONLY_FIELDS,
    CTRFeatures,
    CTRInputs,
    FeatureConfig,
    base_feature,
)
from hybrid.ctr_models.history import (
    backbone_config_from_dict,
    build_backbone,
    gather_last,
    input_projection,
)
from hybrid.ctr_models.layers import TaskHeads


def _default_backbone() -> Any:
    from hybrid.core.backbones import BackboneConfig

    return BackboneConfig()


@dataclass(frozen=True)
class GPSDRankerConfig:
    """Configuration of :class:`GPSDRanker`.

    Args:
        features: embedding settings. The ranker reads only the history sequences and the candidate
            fields that share their tables (``single_fields``/``multi_fields`` default to those / none;
            naming other fields is a ``ValueError``); ``max_len`` is the history window (the backbone
            sees ``max_len + 1`` tokens).
        backbone: a ``hybrid.core.backbones.BackboneConfig`` (or a mapping of its fields); must be the
            pretrained one for FT transfer. ``kind="hstu"`` needs history and candidate timestamps.
        head_mult: head width multiplier: ``Linear(d → head_mult·d) → ReLU → Linear(→ 1)`` (GPSD: 4).
        dropout: dropout inside the heads.
    """

    features: FeatureConfig = field(default_factory=FeatureConfig)
    backbone: Any = field(default_factory=_default_backbone)
    head_mult: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        freeze_lists(self)
        name = "GPSDRankerConfig"
        if isinstance(self.backbone, Mapping):
            object.__setattr__(self, "backbone", backbone_config_from_dict(self.backbone))
        require(self.backbone is not None, name, "backbone", "a BackboneConfig is required")
        require(self.head_mult >= 1, name, "head_mult", f"must be >= 1, got {self.head_mult}")
        require(0.0 <= self.dropout < 1.0, name, "dropout", f"must be in [0, 1), got {self.dropout}")

    @classmethod
    def tiny(cls) -> "GPSDRankerConfig":
        from hybrid.core.backbones import BackboneConfig

        return cls(features=FeatureConfig(embedding_dim=16, max_len=8), backbone=BackboneConfig.tiny())


class GPSDRanker(Ranker):
    """GPSD sequence ranker (module docstring).

    Args:
        config: :class:`GPSDRankerConfig`.
        vocab_sizes: feature → vocabulary size.
        task_names: one head per task.
        embedding_device: where the tables are created.
        item_vectors: must be ``None`` (the same constructor as every ranker; no multimodal features here).

    Shapes:
        ``forward(batch) → [B, T]``; the backbone runs on ``[B, max_len + 1, d]``.

    Example:
        >>> model = GPSDRanker(GPSDRankerConfig.tiny(), vocab_sizes, ("click",))
        >>> model.spec.kjt_keys                      # it reads the history and the candidate only
        ('item_id', 'category', 'hist_item_id', 'hist_category', 'hist_action')
        >>> model(batch).shape
        torch.Size([16, 1])
    """

    def __init__(self, config: GPSDRankerConfig, vocab_sizes: Mapping[str, int], task_names: Sequence[str],
                 embedding_device: torch.device | str | None = None,
                 item_vectors: torch.Tensor | None = None) -> None:
        super().__init__(config, vocab_sizes, task_names, features=_sequence_only(config.features, vocab_sizes))
        require(item_vectors is None, "GPSDRankerConfig", "multimodal",
                "the GPSD ranker has no multimodal features; item_vectors must be None")
        require(self.spec.has_history and self.spec.has_target, "GPSDRankerConfig", "features.history_fields",
                "the GPSD ranker needs a history whose feature is also a candidate field (e.g. item_id); got "
                f"history {self.spec.history_fields}, candidate fields {self.spec.single_fields}")
        extra = [f for f in self.spec.single_fields if f not in self.spec.target_fields]
        require(not extra and not self.spec.multi_fields, "GPSDRankerConfig", "features.single_fields",
                f"the GPSD ranker reads only the history and the candidate fields that have one; "
                f"{extra + list(self.spec.multi_fields)} would be embedded and never used")
        self.features = CTRFeatures(self.spec, device=embedding_device)
        self.backbone = build_backbone(config.backbone)
        d = config.backbone.dim
        self.input_proj = input_projection(self.spec.embedding_dim, d, self.backbone)
        self.segment = nn.Embedding(2, d)
        nn.init.zeros_(self.segment.weight)
        self.heads = TaskHeads(d, len(self.task_names), (config.head_mult * d,), config.dropout)

    def embed(self, batch: CTRBatch) -> CTRInputs:
        return self.features(batch)

    def forward_inputs(self, inputs: CTRInputs) -> torch.Tensor:
        x = inputs
        hist, target, lengths = x.history, x.target, x.lengths        # [B, T, E], [B, E], [B]
        B, T, E = hist.shape
        pos = lengths.view(B, 1)                                      # candidate slot = first padded slot
        tokens = torch.cat([hist, hist.new_zeros(B, 1, E)], dim=1)
        tokens = tokens.scatter(1, pos.unsqueeze(-1).expand(B, 1, E), target.unsqueeze(1))
        if self.input_proj is not None:
            tokens = self.input_proj(tokens)
        segment_ids = torch.zeros(B, T + 1, dtype=torch.long, device=tokens.device).scatter(1, pos, 1)
        tokens = tokens + self.segment(segment_ids)
        timestamps = None
        if x.history_timestamps is not None:
            ts = torch.cat([x.history_timestamps, x.history_timestamps.new_zeros(B, 1)], dim=1)
            timestamps = ts.scatter(1, pos, x.timestamps.view(B, 1).to(ts.dtype))
        states = self.backbone(tokens, lengths + 1, timestamps)
        return self.heads(gather_last(states, lengths + 1))


def _sequence_only(features: FeatureConfig, vocab_sizes: Mapping[str, int]) -> FeatureConfig:
    """Default the GPSD ranker to the sequence features: candidate fields = the history's, no bags."""
    history = features.history_fields
    if history is None:
        from hybrid.ctr_models.features import DEFAULT_HISTORY_FIELDS

        bases = {base_feature(k) for k in vocab_sizes}
        history = tuple(f for f in DEFAULT_HISTORY_FIELDS if f in bases)
    single = features.single_fields
    if single is None:
        single = tuple(f for f in history if f not in HISTORY_ONLY_FIELDS)
    multi = features.multi_fields if features.multi_fields is not None else ()
    return dataclasses.replace(features, single_fields=single, multi_fields=multi, history_fields=history)
