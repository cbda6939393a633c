"""HSTU backbone (Zhai et al., ICML'24, "Actions Speak Louder than Words").

One block, with ``x`` the residual stream ``[B, T, D]``:

    U, V, Q, K = split(SiLU(f1(LayerNorm(x))))                 # pointwise projection
    A[h]       = SiLU(Q_h K_hᵀ + rab_pos + rab_time) / n ⊙ M   # pointwise (not softmax) attention
    Y          = f2(Dropout(LayerNorm(A V) ⊙ U))
    out        = x + Y

``M`` is the causal mask combined with the key-padding mask. ``rab_pos[i, j]`` is a learned scalar per
relative distance ``i - j`` (clipped at ``max_len - 1``); ``rab_time[i, j]`` a learned scalar per
log-bucketed time gap ``|ts[i] - ts[j]|``. Both are shared across heads, one set per block, as in HSTU.

Normaliser ``n``: the number of keys query ``i`` may attend to (``i + 1`` for right-padded causal
input). HSTU's reference divides by the padded length, which depends on how a batch was padded; counting
the visible keys instead keeps an output independent of both the padding and of any later events, and keeps
``A V`` well scaled for short sequences (HSTU's ``/ max_len`` shrinks it by ``len / max_len`` before the
LayerNorm, whose epsilon then matters).

Time gap: the query's *own* event time minus the key's (HSTU's research code uses the next event's time
for the query). With the CTR ranker's candidate as the last token, the candidate's timestamp is the request
time, so both readings agree there, and pretraining does not peek at the time of the event it predicts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybrid.core.backbones.common import Backbone, NormalLinear
from hybrid.core.backbones.config import BackboneConfig
from hybrid.core.jagged import lengths_to_mask


def time_gap_buckets(timestamps: torch.Tensor, num_buckets: int, divisor: float) -> torch.Tensor:
    """Pairwise log-bucketed time gaps.

    Args:
        timestamps: ``[B, T]`` int64 seconds.
        num_buckets: buckets ``0 .. num_buckets - 1``; larger gaps land in the last one.
        divisor: bucket = ``floor(ln(max(|ts_i - ts_j|, 1)) / divisor)``.

    Returns:
        ``[B, T, T]`` int64 bucket of ``ts[:, i] - ts[:, j]``.

    Example:
        >>> time_gap_buckets(torch.tensor([[0, 1, 100]]), 128, 0.301)[0, 2]
        tensor([15, 15,  0])
    """
    gaps = (timestamps.unsqueeze(2) - timestamps.unsqueeze(1)).abs()
    # float64 keeps sub-second precision for epoch-second gaps; gaps < 1 s share bucket 0
    buckets = torch.floor(torch.log(gaps.clamp(min=1).to(torch.float64)) / divisor).to(torch.int64)
    return buckets.clamp(0, num_buckets - 1)


class RelativeBias(nn.Module):
    """Learned relative position + relative time bias of one HSTU block.

    Args:
        max_len: relative distances ``0 .. max_len - 1`` get their own weight; larger ones are clipped.
        num_time_buckets: learned weights for the log-bucketed time gaps.
        time_bucket_divisor: see :func:`time_gap_buckets`.
        init_std: N(0, init_std) init.

    Shapes: ``timestamps [B, T]`` → ``[B, T, T]`` bias (meaningful where ``i >= j``; causally masked
    elsewhere).

    Example:
        >>> rab = RelativeBias(max_len=8, num_time_buckets=4)
        >>> rab(torch.tensor([[0, 5, 60]])).shape
        torch.Size([1, 3, 3])
    """

    def __init__(
        self,
        max_len: int,
        num_time_buckets: int,
        time_bucket_divisor: float = 0.301,
        init_std: float = 0.02,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.num_time_buckets = num_time_buckets
        self.time_bucket_divisor = time_bucket_divisor
        self.init_std = init_std
        self.pos_weight = nn.Parameter(torch.empty(max_len, device=device))
        self.time_weight = nn.Parameter(torch.empty(num_time_buckets, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.pos_weight, std=self.init_std)
        nn.init.normal_(self.time_weight, std=self.init_std)

    def forward(self, timestamps: torch.Tensor) -> torch.Tensor:
        t = timestamps.size(1)
        pos = torch.arange(t, device=timestamps.device)
        # only i >= j survives the causal mask; clamp(min=0) just keeps the gather in range
        distance = (pos.unsqueeze(1) - pos.unsqueeze(0)).clamp(0, self.max_len - 1)
        buckets = time_gap_buckets(timestamps, self.num_time_buckets, self.time_bucket_divisor)
        return self.pos_weight[distance].unsqueeze(0) + self.time_weight[buckets]


class HSTUBlock(nn.Module):
    """One HSTU layer (pointwise SiLU attention, relative bias, gating by U), pre-LayerNorm, residual.

    Args:
        config: uses ``dim``, ``num_heads``, ``qk_dim``, ``v_dim``, ``max_len``, time-bucket fields,
            ``dropout``, ``norm_eps``, ``init_std``.

    Forward:
        x: ``[B, T, D]``; valid: ``[B, T]`` bool; timestamps: ``[B, T]`` int64.

    Returns:
        ``[B, T, D]``.

    Example:
        >>> blk = HSTUBlock(BackboneConfig.tiny("hstu"))
        >>> blk(torch.randn(1, 4, 16), torch.ones(1, 4, dtype=torch.bool), torch.arange(4)[None]).shape
        torch.Size([1, 4, 16])
    """

    def __init__(self, config: BackboneConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        d, h = config.dim, config.num_heads
        self.num_heads, self.qk_dim, self.v_dim = h, config.qk_dim, config.v_dim
        self.input_norm = nn.LayerNorm(d, eps=config.norm_eps, device=device)
        self.f1 = NormalLinear(d, h * (2 * self.v_dim + 2 * self.qk_dim), init_std=config.init_std, device=device)
        self.rel_bias = RelativeBias(
            config.max_len, config.hstu_num_time_buckets, config.hstu_time_bucket_divisor, config.init_std, device
        )
        self.attn_norm = nn.LayerNorm(h * self.v_dim, eps=config.norm_eps, device=device)
        self.f2 = NormalLinear(h * self.v_dim, d, init_std=config.init_std, device=device)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        hv, hqk = self.num_heads * self.v_dim, self.num_heads * self.qk_dim
        u, v, q, k = torch.split(F.silu(self.f1(self.input_norm(x))), [hv, hv, hqk, hqk], dim=-1)
        q = q.view(b, t, self.num_heads, self.qk_dim).transpose(1, 2)
        k = k.view(b, t, self.num_heads, self.qk_dim).transpose(1, 2)
        v = v.view(b, t, self.num_heads, self.v_dim).transpose(1, 2)

        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        allowed = causal.unsqueeze(0) & valid.unsqueeze(1)  # [B, T(query), T(key)]
        n = allowed.sum(-1, keepdim=True).clamp(min=1).to(x.dtype)  # visible keys per query
        scores = q @ k.transpose(-1, -2) + self.rel_bias(timestamps).unsqueeze(1).to(x.dtype)
        attn = torch.where(allowed.unsqueeze(1), F.silu(scores), torch.zeros((), dtype=x.dtype, device=x.device))
        attn = attn / n.unsqueeze(1)
        y = (attn @ v).transpose(1, 2).reshape(b, t, hv)
        return x + self.f2(self.dropout(self.attn_norm(y) * u))


class HSTUBackbone(Backbone):
    """Stack of :class:`HSTUBlock` + final LayerNorm.

    Args:
        config: a :class:`BackboneConfig` with ``kind="hstu"``.
        device: where to create the parameters (``"meta"`` allowed).

    Forward:
        x: ``[B, T, D]`` right-padded token vectors.
        lengths: ``[B]`` valid positions per row.
        timestamps: ``[B, T]`` int64 event times in seconds (required; padded positions are ignored).

    Returns:
        ``[B, T, D]``; zero at padded positions.

    Example:
        >>> bb = HSTUBackbone(BackboneConfig.tiny("hstu"))
        >>> ts = torch.tensor([[0, 60, 3600], [0, 10, 0]])
        >>> bb(torch.randn(2, 3, 16), torch.tensor([3, 2]), ts).shape
        torch.Size([2, 3, 16])
    """

    def __init__(self, config: BackboneConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        if config.kind != "hstu":
            raise ValueError(f"HSTUBackbone needs kind='hstu', got {config.kind!r}")
        self.config = config
        self.input_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(HSTUBlock(config, device=device) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps, device=device)

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor, timestamps: torch.Tensor | None = None
    ) -> torch.Tensor:
        if timestamps is None:
            raise ValueError("HSTUBackbone needs timestamps [B, T] (relative time bias)")
        b, t, _ = x.shape
        if timestamps.shape != (b, t):
            raise ValueError(f"timestamps must be [B, T] = {(b, t)}, got {tuple(timestamps.shape)}")
        valid = lengths_to_mask(lengths.to(x.device), t)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        h = self.input_dropout(torch.where(valid.unsqueeze(-1), x, zero))
        for layer in self.layers:
            h = layer(h, valid, timestamps)
        h = self.norm(h)
        return torch.where(valid.unsqueeze(-1), h, zero)
