"""TIN — Temporal Interest Network (Zhou et al., WWW 2024 Companion, arXiv 2308.08487).

Three parts (reference notes §3):

1. **Target-aware temporal encoding (TTE).** Each history event and the candidate get an encoding of their
   temporal relation *to the candidate*, added to their embedding: ``ẽ_i = e_i + p_{f(X_i)}`` and
   ``ṽ_t = v_t + p_{f(X_t)}``. Two encodings, usable together (summed):

   * *position* (TTE-P): ``f`` = number of steps before the candidate — the most recent event is 1, the
     one before it 2, …, the candidate itself 0 (table of ``max_len + 1`` rows; positions are counted in
     the kept window, so they never overflow the table);
   * *time* (TTE-T): ``f`` = bucket of the gap ``Δt = t_candidate − t_event`` (seconds, clamped at 0)
     on a log scale, ``1 + floor(log_b(1 + Δt / unit))`` clipped to ``num_time_buckets``; the candidate
     has bucket 0. Gaps are measured to the *candidate's* request time, never to "now" (that would leak
     label time into offline training).

2. **Target-aware attention (TA).** ``α_i = softmax_i(ẽ_i · ṽ_t / √d)`` over the real events (scaled dot
   product, no MLP, unlike DIN); an empty history gives all-zero weights.

3. **Target-aware representation (TR).** ``u_TIN = Σ_i α_i (ẽ_i ⊙ ṽ_t)``. We implement the paper's form
   with no projection between the product and the sum, where it equals ``(Σ_i α_i ẽ_i) ⊙ ṽ_t`` exactly —
   the official code's cheap post-pooling product (it puts BatchNorm + Dense between the two, which makes
   it a different function; we do not).

Prediction: an MLP over ``[field embeddings; Σ α ẽ; u_TIN; dense]`` with one linear output per task.

The same embedding tables serve attention and representation (as the official code); DARE
(arXiv 2410.02604) reports gains from decoupling them — not done here.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hybrid.core import CTRBatch
from hybrid.ctr_models._config import (
    freeze_lists,
    require,
    require_choice,
    require_positive_ints,
)
from hybrid.ctr_models.base import Ranker
from hybrid.ctr_models.features import CTRFeatures, CTRInputs, FeatureConfig
from hybrid.ctr_models.layers import MLP, TaskHeads, masked_softmax
from hybrid.ctr_models.multimodal import MultimodalConfig, build_multimodal

TEMPORAL_ENCODINGS = ("position", "time", "both", "none")


def target_aware_attention(history: torch.Tensor, target: torch.Tensor,
                           mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TIN's target-aware attention (TA) and representation (TR) on temporally encoded tokens.

    Args:
        history: ``ẽ [B, T, D]`` encoded history tokens (padding arbitrary: it is masked).
        target: ``ṽ_t [B, D]`` encoded candidate.
        mask: ``[B, T]`` bool, True on real events.

    Returns:
        ``(u_tin [B, D], pooled [B, D], alpha [B, T])`` with ``alpha = softmax(ẽ·ṽ/√D)`` over real events,
        ``pooled = Σ α ẽ`` and ``u_tin = Σ α (ẽ ⊙ ṽ)``; all zeros for an empty history.

    Example:
        >>> h = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]); t = torch.tensor([[2.0, 0.0]])
        >>> u, pooled, alpha = target_aware_attention(h, t, torch.tensor([[True, True]]))
        >>> alpha   # softmax([2, 0] / sqrt(2))
        tensor([[0.8044, 0.1956]])
    """
    scores = torch.einsum("btd,bd->bt", history, target) / math.sqrt(history.shape[-1])
    alpha = masked_softmax(scores, mask)
    # Padding may hold anything (e.g. a PAD row): zero it so 0-weight × inf/NaN cannot leak in.
    history = history.masked_fill(~mask.unsqueeze(-1), 0.0)
    u_tin = torch.einsum("bt,btd->bd", alpha, history * target.unsqueeze(1))
    pooled = torch.einsum("bt,btd->bd", alpha, history)
    return u_tin, pooled, alpha


def time_gap_buckets(gap_seconds: torch.Tensor, num_buckets: int, unit_seconds: float = 1.0,
                     log_base: float = 2.0) -> torch.Tensor:
    """Log-scale buckets ``1 + floor(log_b(1 + Δt / unit))`` clipped to ``[1, num_buckets]``.

    Bucket 0 is left for the candidate itself. With the defaults (seconds, base 2), bucket ``k`` holds gaps
    in ``[2^(k−1) − 1, 2^k − 1)`` seconds; 32 buckets cover about 68 years.

    Example:
        >>> time_gap_buckets(torch.tensor([0, 1, 3, 10**9]), num_buckets=8)
        tensor([1, 2, 3, 8])
    """
    gap = gap_seconds.clamp(min=0).to(torch.float64) / unit_seconds
    b = torch.floor(torch.log1p(gap) / math.log(log_base)).to(torch.int64) + 1
    return b.clamp(1, num_buckets)


def relative_positions(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Steps before the candidate for a right-padded history: ``[l, l−1, …, 1, 0, …]`` per row (0 on padding).

    Example:
        >>> relative_positions(torch.tensor([3, 0]), 4)
        tensor([[3, 2, 1, 0],
                [0, 0, 0, 0]])
    """
    idx = torch.arange(max_len, device=lengths.device).unsqueeze(0)
    return (lengths.unsqueeze(1) - idx).clamp(min=0)


class TargetAwareTemporalEncoding(nn.Module):
    """Adds TIN's temporal encodings (relative position and/or time-gap bucket) to history and candidate.

    Args:
        dim: token width ``D``.
        max_len: history window (position table has ``max_len + 1`` rows; row 0 = the candidate).
        mode: ``"position"``, ``"time"``, ``"both"`` (sum of the two) or ``"none"``.
        num_time_buckets: time-gap buckets (table has ``num_time_buckets + 1`` rows; row 0 = the candidate).
        time_unit_seconds, time_log_base: bucketing scale (:func:`time_gap_buckets`).

    Shapes:
        ``history [B, T, D], target [B, D], lengths [B], history_ts [B, T], target_ts [B]
        → (ẽ [B, T, D], ṽ [B, D])``.

    Example:
        >>> tte = TargetAwareTemporalEncoding(8, max_len=10, mode="position")
        >>> e, v = tte(torch.randn(2, 10, 8), torch.randn(2, 8), torch.tensor([3, 10]), None, None)
    """

    def __init__(self, dim: int, max_len: int, mode: str = "both", num_time_buckets: int = 32,
                 time_unit_seconds: float = 1.0, time_log_base: float = 2.0) -> None:
        super().__init__()
        require_choice(mode, TEMPORAL_ENCODINGS, "TINConfig", "temporal_encoding")
        self.mode, self.max_len = mode, max_len
        self.num_time_buckets, self.time_unit_seconds, self.time_log_base = (
            num_time_buckets, time_unit_seconds, time_log_base)
        self.position = nn.Embedding(max_len + 1, dim) if mode in ("position", "both") else None
        self.time = nn.Embedding(num_time_buckets + 1, dim) if mode in ("time", "both") else None
        for emb in (self.position, self.time):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.05)

    def forward(self, history: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor,
                history_ts: torch.Tensor | None, target_ts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        e, v = history, target
        if self.position is not None:
            e = e + self.position(relative_positions(lengths, history.shape[1]))
            v = v + self.position.weight[0]
        if self.time is not None:
            if history_ts is None or target_ts is None:
                raise ValueError("TINConfig.temporal_encoding: time encoding needs CTRBatch.hist_timestamps "
                                 "and CTRBatch.timestamps; the batch has no history timestamps")
            gaps = target_ts.unsqueeze(1) - history_ts
            e = e + self.time(time_gap_buckets(gaps, self.num_time_buckets, self.time_unit_seconds,
                                               self.time_log_base))
            v = v + self.time.weight[0]
        return e, v


@dataclass(frozen=True)
class TINConfig:
    """Configuration of :class:`TIN`.

    Args:
        features: embedding/feature settings; needs a history and a candidate field shared with it
            (``item_id`` + ``hist_item_id``).
        temporal_encoding: ``"position"`` (TTE-P), ``"time"`` (TTE-T), ``"both"`` (summed) or ``"none"``.
        num_time_buckets: log-scale time-gap buckets.
        time_unit_seconds: gap unit before the log (1 = seconds).
        time_log_base: base of the log bucketing.
        mlp_hidden: hidden sizes of the prediction MLP (the official code uses 80-40).
        tower_hidden: hidden sizes of each task's tower.
        dropout: dropout in the MLP.
        multimodal: SimTier / MNSE / MK-MMD over item vectors (appended to the MLP input; off by default).
    """

    features: FeatureConfig = field(default_factory=FeatureConfig)
    temporal_encoding: str = "both"
    num_time_buckets: int = 32
    time_unit_seconds: float = 1.0
    time_log_base: float = 2.0
    mlp_hidden: tuple[int, ...] = (200, 80)
    tower_hidden: tuple[int, ...] = ()
    dropout: float = 0.0
    multimodal: MultimodalConfig = field(default_factory=MultimodalConfig)

    def __post_init__(self) -> None:
        freeze_lists(self)
        name = "TINConfig"
        require_choice(self.temporal_encoding, TEMPORAL_ENCODINGS, name, "temporal_encoding")
        require(self.num_time_buckets >= 1, name, "num_time_buckets", f"must be >= 1, got {self.num_time_buckets}")
        require(self.time_unit_seconds > 0, name, "time_unit_seconds", f"must be > 0, got {self.time_unit_seconds}")
        require(self.time_log_base > 1, name, "time_log_base", f"must be > 1, got {self.time_log_base}")
        require_positive_ints(self.mlp_hidden, name, "mlp_hidden")
        require_positive_ints(self.tower_hidden, name, "tower_hidden")
        require(0.0 <= self.dropout < 1.0, name, "dropout", f"must be in [0, 1), got {self.dropout}")

    @classmethod
    def tiny(cls) -> "TINConfig":
        return cls(features=FeatureConfig.tiny(), num_time_buckets=16, mlp_hidden=(32, 16))


class TIN(Ranker):
    """Temporal Interest Network ranker.

    Args:
        config: :class:`TINConfig`.
        vocab_sizes: feature → vocabulary size.
        task_names: label columns.
        embedding_device: where the tables are created.
        item_vectors: ``[V, d]`` item-vector matrix (row = ``item_id``), required when
            ``config.multimodal`` switches a feature on; kept as a non-trainable buffer.

    Shapes:
        ``forward(batch) → [B, T]``; the attention of the last forward is in ``last_attention [B, max_len]``.

    Example:
        >>> model = TIN(TINConfig.tiny(), vocab_sizes, ("click",))
        >>> model(batch).shape, model.last_attention.shape
        (torch.Size([16, 1]), torch.Size([16, 8]))
    """

    def __init__(self, config: TINConfig, vocab_sizes: Mapping[str, int], task_names: Sequence[str],
                 embedding_device: torch.device | str | None = None,
                 item_vectors: torch.Tensor | None = None) -> None:
        super().__init__(config, vocab_sizes, task_names)
        require(self.spec.has_history and self.spec.has_target, "TINConfig", "features.history_fields",
                "TIN needs a history sequence whose feature is also a candidate field (e.g. item_id); got "
                f"history {self.spec.history_fields}, candidate fields {self.spec.single_fields}")
        self.features = CTRFeatures(self.spec, device=embedding_device)
        D = self.spec.embedding_dim
        self.temporal = TargetAwareTemporalEncoding(D, self.spec.max_len, config.temporal_encoding,
                                                    config.num_time_buckets, config.time_unit_seconds,
                                                    config.time_log_base)
        self.multimodal = build_multimodal(config.multimodal, item_vectors, self.spec, "TINConfig")
        mm_dim = self.multimodal.output_dim if self.multimodal is not None else 0
        in_dim = self.spec.num_fields * D + 2 * D + mm_dim + self.spec.num_dense
        self.mlp = MLP(in_dim, config.mlp_hidden, dropout=config.dropout)
        self.heads = TaskHeads(self.mlp.out_features, len(self.task_names), config.tower_hidden, config.dropout)
        self.last_attention: torch.Tensor | None = None

    def embed(self, batch: CTRBatch) -> CTRInputs:
        return self.features(batch)

    def forward_inputs(self, inputs: CTRInputs) -> torch.Tensor:
        x = inputs
        e, v = self.temporal(x.history, x.target, x.lengths, x.history_timestamps, x.timestamps)
        u_tin, pooled, alpha = target_aware_attention(e, v, x.mask)
        self.last_attention = alpha.detach()
        parts = [x.fields.flatten(1), pooled, u_tin]
        if self.multimodal is not None:
            parts.append(self.multimodal(x))
        h = torch.cat(parts + [x.dense], dim=1)
        return self.heads(self.mlp(h))
