"""Configuration of the sequence backbones (LLaMA-style decoder, HSTU).

The same :class:`BackboneConfig` builds the backbone of the generative pretraining model and of the CTR
"GPSD sequence ranker", so a pretrained backbone's ``state_dict`` loads into the ranker unchanged.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal, Mapping

from hybrid.core.config import from_mapping

BackboneKind = Literal["llama", "hstu"]
_KINDS = ("llama", "hstu")
_SIZE_RE = re.compile(r"^L(\d+)H(\d+)A(\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class BackboneConfig:
    """Shape and hyper-parameters of a sequence backbone.

    Args:
        kind: ``"llama"`` (GPSD's decoder: pre-norm RMSNorm, RoPE, SwiGLU, causal softmax attention) or
            ``"hstu"`` (pointwise SiLU attention with relative position/time bias and a gating branch U).
        num_layers: number of blocks (the ``L`` of ``L4H64A4``).
        dim: model width (the ``H``).
        num_heads: attention heads (the ``A``); ``dim`` must be divisible by it.
        max_len: longest sequence the model is meant for. LLaMA computes RoPE on the fly and accepts any
            length; HSTU clips relative distances at ``max_len - 1``.
        dropout: dropout on the input tokens, attention weights (LLaMA) and residual branches.
        norm_eps: epsilon of RMSNorm / LayerNorm.
        init_std: std of the N(0, init_std) init of every projection (GPSD: 0.02).
        ffn_multiple_of: LLaMA SwiGLU hidden size is ``round_up(int(8 * dim / 3), ffn_multiple_of)``.
        rope_theta: RoPE base.
        hstu_qk_dim: per-head query/key width of HSTU (default ``dim // num_heads``).
        hstu_v_dim: per-head value/gate width of HSTU (default ``dim // num_heads``).
        hstu_num_time_buckets: number of learned relative-time buckets.
        hstu_time_bucket_divisor: bucket of a time gap ``dt`` (seconds) is
            ``floor(ln(max(|dt|, 1)) / divisor)`` clipped to the last bucket (HSTU uses 0.301, i.e.
            buckets grow by a factor ~1.35).

    Example:
        >>> cfg = BackboneConfig.from_size("L4H64A4", kind="llama")
        >>> (cfg.num_layers, cfg.dim, cfg.num_heads, cfg.size_name)
        (4, 64, 4, 'L4H64A4')
    """

    kind: BackboneKind = "llama"
    num_layers: int = 4
    dim: int = 64
    num_heads: int = 4
    max_len: int = 200
    dropout: float = 0.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    ffn_multiple_of: int = 32
    rope_theta: float = 10000.0
    hstu_qk_dim: int | None = None
    hstu_v_dim: int | None = None
    hstu_num_time_buckets: int = 128
    hstu_time_bucket_divisor: float = 0.301

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"BackboneConfig.kind must be one of {_KINDS}, got {self.kind!r}")
        for name in ("num_layers", "dim", "num_heads", "max_len", "ffn_multiple_of", "hstu_num_time_buckets"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BackboneConfig.{name} must be a positive int, got {value!r}")
        if self.dim % self.num_heads != 0:
            raise ValueError(
                f"BackboneConfig.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.kind == "llama" and (self.dim // self.num_heads) % 2 != 0:
            raise ValueError(f"RoPE needs an even head dim, got dim/num_heads = {self.dim // self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BackboneConfig.dropout must be in [0, 1), got {self.dropout}")
        for name in ("hstu_qk_dim", "hstu_v_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"BackboneConfig.{name} must be None or a positive int, got {value!r}")
        if self.hstu_time_bucket_divisor <= 0:
            raise ValueError("BackboneConfig.hstu_time_bucket_divisor must be > 0")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def qk_dim(self) -> int:
        """HSTU per-head query/key width."""
        return self.hstu_qk_dim or self.head_dim

    @property
    def v_dim(self) -> int:
        """HSTU per-head value/gate width."""
        return self.hstu_v_dim or self.head_dim

    @property
    def size_name(self) -> str:
        """The GPSD size name ``L{layers}H{dim}A{heads}``."""
        return f"L{self.num_layers}H{self.dim}A{self.num_heads}"

    @classmethod
    def from_size(cls, name: str, kind: BackboneKind = "llama", **overrides: Any) -> "BackboneConfig":
        """Parse a GPSD size name such as ``"L4H64A4"`` (case-insensitive).

        ``overrides`` are other :class:`BackboneConfig` fields (a misspelt one raises ``TypeError``).
        """
        match = _SIZE_RE.match(name.strip()) if isinstance(name, str) else None
        if match is None:
            raise ValueError(
                f"bad backbone size name {name!r}: expected 'L{{layers}}H{{dim}}A{{heads}}', e.g. 'L4H64A4'"
            )
        layers, dim, heads = (int(g) for g in match.groups())
        return cls(kind=kind, num_layers=layers, dim=dim, num_heads=heads, **overrides)

    @classmethod
    def tiny(cls, kind: BackboneKind = "llama") -> "BackboneConfig":
        """A 2-layer, 16-wide backbone for tests and smoke runs."""
        return cls(kind=kind, num_layers=2, dim=16, num_heads=2, max_len=32, hstu_num_time_buckets=16)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BackboneConfig":
        """Inverse of :meth:`to_dict`; an unknown key or a wrong type raises a ``ValueError`` naming the key."""
        return from_mapping(cls, data, source="BackboneConfig")
