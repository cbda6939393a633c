"""LLaMA-style causal decoder, as GPSD uses it (Wang et al., KDD'25).

Block: ``h = x + Attn(RMSNorm(x))``, ``out = h + SwiGLU(RMSNorm(h))``; a final RMSNorm after the last
block. Attention: ``wq, wk, wv, wo`` (``dim x dim``, no bias), RoPE on q and k, causal
``F.scaled_dot_product_attention``. SwiGLU: ``w2(silu(w1 x) * w3 x)`` with hidden
``round_up(int(8 * dim / 3), ffn_multiple_of)``. All projections N(0, 0.02).

Parameter count per block: ``4 d² + 3 d h + 2 d`` (h = SwiGLU hidden), plus ``d`` for the final norm;
``L1H32A4`` = 13,408 and ``L4H64A4`` = 213,568, matching GPSD's "dense parameters".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybrid.core.backbones.common import Backbone, NormalLinear
from hybrid.core.backbones.config import BackboneConfig
from hybrid.core.jagged import lengths_to_mask


def swiglu_hidden_dim(dim: int, multiple_of: int) -> int:
    """LLaMA's SwiGLU width: ``int(2 * 4d / 3)`` rounded up to a multiple of ``multiple_of``.

    Example:
        >>> swiglu_hidden_dim(32, 32), swiglu_hidden_dim(64, 32)
        (96, 192)
    """
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def rope_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos/sin tables of RoPE for positions ``0..seq_len-1``.

    Pair ``i`` (channels ``2i, 2i+1``) rotates by angle ``pos * theta^(-2i / head_dim)``. Computed on the
    fly (``head_dim / 2`` frequencies) rather than cached in a buffer, so meta-device construction needs no
    buffer materialisation.

    Returns:
        ``cos, sin``: ``[seq_len, head_dim // 2]`` float32.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(2i, 2i+1)`` of ``x`` by the position angle (LLaMA/GPSD interleaved layout).

    Args:
        x: ``[B, H, T, head_dim]``.
        cos, sin: ``[T, head_dim // 2]`` from :func:`rope_cos_sin`.

    Example:
        >>> cos, sin = rope_cos_sin(2, 2, theta=10000.0)
        >>> apply_rope(torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]]), cos, sin)[0, 0, 1]  # (cos 1, sin 1)
        tensor([0.5403, 0.8415])
    """
    x_pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = x_pairs[..., 0], x_pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class LlamaAttention(nn.Module):
    """Multi-head causal self-attention with RoPE and no biases.

    Args:
        config: uses ``dim``, ``num_heads``, ``dropout`` (on attention weights), ``init_std``.

    Shapes: ``x [B, T, D]``, ``cos/sin [T, head_dim/2]`` → ``[B, T, D]``.

    Example:
        >>> attn = LlamaAttention(BackboneConfig.tiny())
        >>> cos, sin = rope_cos_sin(5, attn.head_dim, 10000.0)
        >>> attn(torch.randn(2, 5, 16), cos, sin).shape
        torch.Size([2, 5, 16])
    """

    def __init__(self, config: BackboneConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        d, std = config.dim, config.init_std
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.wq = NormalLinear(d, d, bias=False, init_std=std, device=device)
        self.wk = NormalLinear(d, d, bias=False, init_std=std, device=device)
        self.wv = NormalLinear(d, d, bias=False, init_std=std, device=device)
        self.wo = NormalLinear(d, d, bias=False, init_std=std, device=device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        q = apply_rope(heads(self.wq(x)), cos, sin)
        k = apply_rope(heads(self.wk(x)), cos, sin)
        v = heads(self.wv(x))
        # Inputs are right-padded, so for a valid query i every key j <= i is valid too: the causal mask
        # alone already excludes all padding from valid outputs. is_causal (no explicit mask) keeps the
        # fast fused kernels; padded query rows produce finite values that the backbone zeroes.
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    """SwiGLU feed-forward ``w2(silu(w1 x) * w3 x)``, no biases.

    Args:
        dim: input/output width.
        hidden_dim: inner width (see :func:`swiglu_hidden_dim`).
        init_std: weight init std.

    Example:
        >>> SwiGLU(16, 64)(torch.randn(2, 3, 16)).shape
        torch.Size([2, 3, 16])
    """

    def __init__(
        self, dim: int, hidden_dim: int, init_std: float = 0.02, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.w1 = NormalLinear(dim, hidden_dim, bias=False, init_std=init_std, device=device)
        self.w2 = NormalLinear(hidden_dim, dim, bias=False, init_std=init_std, device=device)
        self.w3 = NormalLinear(dim, hidden_dim, bias=False, init_std=init_std, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LlamaBlock(nn.Module):
    """Pre-norm decoder block: ``h = x + Attn(RMSNorm(x))``, ``out = h + SwiGLU(RMSNorm(h))``.

    Args:
        config: backbone config.

    Shapes: ``x [B, T, D]``, ``cos/sin [T, head_dim/2]`` → ``[B, T, D]``.
    """

    def __init__(self, config: BackboneConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.dim, eps=config.norm_eps, device=device)
        self.attention = LlamaAttention(config, device=device)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps, device=device)
        self.feed_forward = SwiGLU(
            config.dim, swiglu_hidden_dim(config.dim, config.ffn_multiple_of), config.init_std, device=device
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.dropout(self.attention(self.attention_norm(x), cos, sin))
        return h + self.dropout(self.feed_forward(self.ffn_norm(h)))


class LlamaBackbone(Backbone):
    """GPSD's LLaMA-style causal decoder: ``num_layers`` :class:`LlamaBlock` + final RMSNorm.

    Args:
        config: a :class:`BackboneConfig` with ``kind="llama"``.
        device: where to create the parameters (``"meta"`` allowed).

    Forward:
        x: ``[B, T, D]`` right-padded token vectors.
        lengths: ``[B]`` valid positions per row.
        timestamps: ignored (accepted so both backbones share one call signature).

    Returns:
        ``[B, T, D]``; zero at padded positions.

    Example:
        >>> bb = LlamaBackbone(BackboneConfig.from_size("L1H32A4"))
        >>> bb.dense_parameter_count()
        13408
        >>> bb(torch.randn(2, 5, 32), torch.tensor([5, 3])).shape
        torch.Size([2, 5, 32])
    """

    def __init__(self, config: BackboneConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        if config.kind != "llama":
            raise ValueError(f"LlamaBackbone needs kind='llama', got {config.kind!r}")
        self.config = config
        self.input_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(LlamaBlock(config, device=device) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps, device=device)

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor, timestamps: torch.Tensor | None = None
    ) -> torch.Tensor:
        del timestamps  # LLaMA only uses positions
        b, t, _ = x.shape
        valid = lengths_to_mask(lengths.to(x.device), t).unsqueeze(-1)
        # zero padded inputs so arbitrary values (even NaN) there cannot leak through 0 * x products
        h = self.input_dropout(torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device)))
        cos, sin = rope_cos_sin(t, self.config.head_dim, self.config.rope_theta, device=x.device)
        for layer in self.layers:
            h = layer(h, cos, sin)
        h = self.norm(h)
        return torch.where(valid, h, torch.zeros((), dtype=h.dtype, device=h.device))
