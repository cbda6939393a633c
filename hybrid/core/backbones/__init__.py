"""Sequence backbones shared by generative pretraining and the CTR "GPSD sequence ranker".

Both owners build the backbone with :func:`build_backbone` from the same :class:`BackboneConfig`, so the
pretrained backbone's ``state_dict`` loads into the ranker as-is (full transfer).

Interface: ``backbone(x [B, T, D], lengths [B], timestamps [B, T] | None) -> [B, T, D]`` on right-padded
input; causal; padded positions never influence valid ones and come out as zeros.

Example:
    >>> bb = build_backbone(BackboneConfig.from_size("L4H64A4", kind="llama"))
    >>> bb.dense_parameter_count()
    213568
"""
from __future__ import annotations

import torch

from hybrid.core.backbones.common import Backbone, NormalLinear
from hybrid.core.backbones.config import BackboneConfig
from hybrid.core.backbones.hstu import (
    HSTUBackbone,
    HSTUBlock,
    RelativeBias,
    time_gap_buckets,
)
from hybrid.core.backbones.llama import (
    LlamaAttention,
    LlamaBackbone,
    LlamaBlock,
    SwiGLU,
    apply_rope,
    rope_cos_sin,
    swiglu_hidden_dim,
)


def build_backbone(config: BackboneConfig, device: torch.device | str | None = None) -> Backbone:
    """The backbone named by ``config.kind`` (``"llama"`` or ``"hstu"``), parameters on ``device``."""
    if config.kind == "llama":
        return LlamaBackbone(config, device=device)
    if config.kind == "hstu":
        return HSTUBackbone(config, device=device)
    raise ValueError(f"unknown backbone kind {config.kind!r}")  # unreachable: BackboneConfig validates


__all__ = [
    "Backbone",
    "BackboneConfig",
    "HSTUBackbone",
    "HSTUBlock",
    "LlamaAttention",
    "LlamaBackbone",
    "LlamaBlock",
    "NormalLinear",
    "RelativeBias",
    "SwiGLU",
    "apply_rope",
    "build_backbone",
    "rope_cos_sin",
    "swiglu_hidden_dim",
    "time_gap_buckets",
]
