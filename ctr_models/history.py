"""History encoders: turn the padded behaviour history into one vector per sample.

All encoders share one call signature, so DCN-v2 and MoE can swap them by config::

    encoder(history [B, T, D], mask [B, T] bool, target [B, D] | None,
            timestamps [B, T] | None = None) -> [B, encoder.output_dim]

* :class:`PooledHistory` — mean over the real events.
* :class:`TargetAttentionHistory` — DIN-style attention MLP over ``[h, t, h − t, h ⊙ t]``.
* :class:`TransformerHistory` — the history run through a sequence backbone (the transferable
  ``hybrid.core.backbones`` LLaMA decoder: ``backbone(x [B, T, D], lengths [B]) -> [B, T, D]``) and read
  out at the most recent event (or mean-pooled).

Padding is always masked explicitly; a user with an empty history gets a zero vector, never NaN.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hybrid.ctr_models._config import (
    freeze_lists,
    require,
    require_choice,
    require_positive_ints,
)
from hybrid.ctr_models.layers import MLP, masked_mean, masked_softmax

HISTORY_ENCODERS = ("none", "pooled", "target", "transformer")
ATTENTION_WEIGHTS = ("none", "softmax", "sigmoid")
READOUTS = ("last", "mean")


@dataclass(frozen=True)
class HistoryConfig:
    """How DCN-v2 / MoE rankers encode the history.

    Args:
        encoder: ``"none"`` (ignore the history), ``"pooled"``, ``"target"`` (DIN attention) or
            ``"transformer"``.
        attention_hidden: hidden sizes of the DIN attention MLP.
        attention_weights: what turns attention scores into weights: ``"none"`` (raw scores, as in the DIN
            paper, which drops the softmax to keep the *intensity* of interest: a user with many relevant
            events gets a larger vector), ``"softmax"`` (normalised; weights sum to 1 over real events) or
            ``"sigmoid"``. Padding is masked explicitly in every mode.
        readout: transformer only — ``"last"`` (state of the most recent event) or ``"mean"``.
        backbone: transformer only — a ``hybrid.core.backbones.BackboneConfig`` (or a mapping of its
            fields). When its ``dim`` differs from ``FeatureConfig.embedding_dim`` a bias-free input
            projection is added (as in pretraining); an ``hstu`` backbone needs history timestamps.
    """

    encoder: str = "target"
    attention_hidden: tuple[int, ...] = (64, 32)
    attention_weights: str = "none"
    readout: str = "last"
    backbone: Any = None

    def __post_init__(self) -> None:
        freeze_lists(self)
        require_choice(self.encoder, HISTORY_ENCODERS, "HistoryConfig", "encoder")
        require_choice(self.attention_weights, ATTENTION_WEIGHTS, "HistoryConfig", "attention_weights")
        require_choice(self.readout, READOUTS, "HistoryConfig", "readout")
        require_positive_ints(self.attention_hidden, "HistoryConfig", "attention_hidden")
        if isinstance(self.backbone, Mapping):
            object.__setattr__(self, "backbone", backbone_config_from_dict(self.backbone))
        if self.encoder == "transformer":
            require(self.backbone is not None, "HistoryConfig", "backbone",
                    "encoder='transformer' needs a backbone config")

    @classmethod
    def tiny(cls) -> "HistoryConfig":
        return cls(attention_hidden=(16,))


class PooledHistory(nn.Module):
    """Mean of the history tokens over the real events.

    Args:
        dim: token width ``D``.

    Shapes:
        ``history [B, T, D], mask [B, T] → [B, D]`` (zeros for an empty history).

    Example:
        >>> PooledHistory(4)(torch.ones(2, 3, 4), torch.tensor([[1, 1, 0], [0, 0, 0]]).bool()).sum(1)
        tensor([4., 0.])
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.output_dim = dim

    def forward(self, history: torch.Tensor, mask: torch.Tensor, target: torch.Tensor | None = None,
                timestamps: torch.Tensor | None = None) -> torch.Tensor:
        return masked_mean(history, mask)


class TargetAttentionHistory(nn.Module):
    """DIN-style target attention: each event is weighted by an MLP of itself and the candidate.

    ``a_i = w^T MLP([h_i, t, h_i − t, h_i ⊙ t]) + b``, weights ``w_i = φ(a)_i`` (see
    ``HistoryConfig.attention_weights``) and output ``Σ_i m_i · w_i · h_i`` where ``m`` is the padding mask.

    Why the mask is applied to the weights and not only through ``-inf`` scores: without a softmax there is
    no normalisation for ``-inf`` to act on, and the MLP output on a padded slot is *not* zero (its input
    contains ``t`` and ``−t``), so padded slots would carry weight whenever their token is not exactly
    zero (e.g. a pretrained PAD row). With softmax an all-padding row is returned as zeros, not NaN.

    Args:
        dim: token width ``D`` (history and candidate).
        hidden: hidden sizes of the attention MLP.
        weights: ``"none"``, ``"softmax"`` or ``"sigmoid"``.

    Shapes:
        ``history [B, T, D], mask [B, T], target [B, D] → [B, D]``; the last weights are kept in
        ``last_weights [B, T]`` for inspection.

    Example:
        >>> att = TargetAttentionHistory(8, hidden=(16,))
        >>> att(torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool), torch.randn(2, 8)).shape
        torch.Size([2, 8])
    """

    def __init__(self, dim: int, hidden: tuple[int, ...] = (64, 32), weights: str = "none") -> None:
        super().__init__()
        require_choice(weights, ATTENTION_WEIGHTS, "TargetAttentionHistory", "weights")
        self.output_dim = dim
        self.weights = weights
        mlp = MLP(4 * dim, hidden, activation="relu")
        self.score = nn.Sequential(mlp, nn.Linear(mlp.out_features, 1))
        self.last_weights: torch.Tensor | None = None

    def attention_weights(self, history: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` weights, exactly zero on padding."""
        t = target.unsqueeze(1).expand_as(history)
        scores = self.score(torch.cat([history, t, history - t, history * t], dim=-1)).squeeze(-1)
        if self.weights == "softmax":
            return masked_softmax(scores, mask)
        if self.weights == "sigmoid":
            scores = torch.sigmoid(scores)
        return scores * mask.to(scores.dtype)

    def forward(self, history: torch.Tensor, mask: torch.Tensor, target: torch.Tensor | None,
                timestamps: torch.Tensor | None = None) -> torch.Tensor:
        if target is None:
            raise ValueError("TargetAttentionHistory: needs the candidate token; the feature layout has no "
                             "field shared by the candidate and the history (FeatureSpec.target_fields)")
        w = self.attention_weights(history, mask, target)
        self.last_weights = w.detach()
        return torch.einsum("bt,btd->bd", w, history)


class TransformerHistory(nn.Module):
    """History encoded by a (transferable) sequence backbone, read out at the most recent event.

    Args:
        backbone: a ``hybrid.core.backbones`` backbone (or any module called as
            ``backbone(x [B, T, d], lengths [B], timestamps [B, T] | None) -> [B, T, d]`` on right-padded
            ``x``) — the module whose weights the FT transfer strategies load.
        dim: token width ``D`` of the embedding tables.
        readout: ``"last"`` (state at position ``lengths − 1``: with a causal decoder it has seen the whole
            history) or ``"mean"`` (masked mean of all states).

    When ``D`` differs from the backbone width ``d``, a bias-free ``input_proj`` (``D → d``) maps tokens in,
    as in the pretraining model (same name, so a pretrained projection transfers too). ``output_dim = d``.

    Shapes:
        ``history [B, T, D], mask [B, T], timestamps [B, T] | None → [B, d]``; zeros for an empty history.

    Example:
        >>> from hybrid.core.backbones import BackboneConfig, build_backbone
        >>> enc = TransformerHistory(build_backbone(BackboneConfig.tiny()), dim=16)
        >>> enc(torch.randn(2, 10, 16), torch.ones(2, 10, dtype=torch.bool), None).shape
        torch.Size([2, 16])
    """

    def __init__(self, backbone: nn.Module, dim: int, readout: str = "last") -> None:
        super().__init__()
        require_choice(readout, READOUTS, "TransformerHistory", "readout")
        width = backbone.config.dim if hasattr(backbone, "config") else dim
        self.input_proj = input_projection(dim, width, backbone)
        self.backbone = backbone
        self.output_dim = width
        self.readout = readout

    def forward(self, history: torch.Tensor, mask: torch.Tensor, target: torch.Tensor | None = None,
                timestamps: torch.Tensor | None = None) -> torch.Tensor:
        lengths = mask.sum(1)
        x = self.input_proj(history) if self.input_proj is not None else history
        states = self.backbone(x, lengths, timestamps)
        if self.readout == "mean":
            return masked_mean(states, mask)
        return gather_last(states, lengths)


def input_projection(dim: int, width: int, backbone: nn.Module) -> nn.Module | None:
    """The pretraining model's bias-free ``input_proj`` (tokens → backbone width), or None when equal."""
    if dim == width:
        return None
    from hybrid.core.backbones import NormalLinear

    std = getattr(getattr(backbone, "config", None), "init_std", 0.02)
    return NormalLinear(dim, width, bias=False, init_std=std)


def gather_last(states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``states [B, T, D]`` at position ``lengths − 1`` per row → ``[B, D]``; zeros where ``lengths == 0``."""
    idx = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, states.shape[-1])
    last = states.gather(1, idx).squeeze(1)
    return last * (lengths > 0).to(states.dtype).unsqueeze(1)


def build_history_encoder(config: HistoryConfig, dim: int) -> nn.Module | None:
    """The encoder named by ``config.encoder`` for tokens of width ``dim`` (``None`` for ``"none"``)."""
    if config.encoder == "none":
        return None
    if config.encoder == "pooled":
        return PooledHistory(dim)
    if config.encoder == "target":
        return TargetAttentionHistory(dim, config.attention_hidden, config.attention_weights)
    return TransformerHistory(build_backbone(config.backbone), dim, config.readout)


# --- the backbone hook -------------------------------------------------------------------------------
# ``hybrid.core.backbones`` is imported lazily: rankers without a transformer must not depend on it.


def backbone_config_from_dict(data: Mapping[str, Any]) -> Any:
    """The ``BackboneConfig`` of a ranker config's ``backbone`` mapping (keys and types checked, named
    ``backbone.<key>`` in messages)."""
    from hybrid.core.backbones import BackboneConfig
    from hybrid.core.config import from_mapping

    return from_mapping(BackboneConfig, data, prefix="backbone.", source="BackboneConfig")


def build_backbone(config: Any) -> nn.Module:
    """Instantiate the ``hybrid.core.backbones`` backbone for ``config`` (a ``BackboneConfig``)."""
    from hybrid.core.backbones import build_backbone as _build

    return _build(config)
