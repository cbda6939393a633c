"""Multimodal features for the CTR rankers: SimTier, MNSE and MK-MMD over a fixed item-vector matrix.

The rankers receive an item-vector matrix ``[V, d]`` aligned to the item vocabulary (row = item id; rows 0/1
are PAD/OOV; ``hybrid.data.item_vectors`` builds it from a file or from item text) and keep it as a
non-trainable buffer. **Missing-vector policy:** an item without a vector has an all-zero row; every module
here treats a zero row as "no vector" — it is never counted in a SimTier histogram, never gives a
similarity (MNSE then uses a learned *missing* embedding) and is left out of the MK-MMD sample. (The loader
can instead fill missing rows with the mean vector, ``missing="mean"``; those items then count as having one.)

* **SimTier** (Sheng et al., CIKM 2024; reference notes §4): cosine similarity between the candidate's vector
  and each history item's vector, counted into ``N`` uniform tiers over ``[-1, 1]`` (padding and items without
  a vector never counted; a cosine a hair above 1 from float error lands in the top tier), normalised with
  ``log1p`` as the official code (or as fractions of the counted events), then embedded: every tier has a
  learned vector and the output is their sum weighted by the normalised counts (an embedding bag over tiers).
* **MNSE** (Multiple Numeral Systems Encoding; Pan et al., KDD 2024; notes §5): a non-negative integer is
  written in several bases; each (base, digit position, digit) has its own embedding, summed within a base
  and concatenated across bases — nearby numbers share digits, so they share embeddings. Encodes the
  candidate-to-history similarity (after quantisation: "similarity encoding"), counts (history length) and
  time gaps (log-quantised).
* **MK-MMD** (PAD, Wang et al., SIGIR 2025; notes §6): a multi-kernel Gaussian MMD between the projected
  multimodal vectors of the batch's candidate items and their ID embeddings, added to the BCE with a weight
  (through the ranker's ``auxiliary_losses()``). Bandwidths are multiples of the batch's mean pairwise squared
  distance; memory is ``O(n²)`` (one Gram matrix, never the ``[n, n, d]`` difference tensor).

:class:`MultimodalFeatures` is what a ranker owns: it reads the batch's item ids (from the ranker's
:class:`~hybrid.ctr_models.features.CTRInputs`), computes the switched-on
features ``[B, output_dim]`` (appended to the ranker's input) and the MK-MMD term of the last forward.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hybrid.core.feature_map import NUM_RESERVED_IDS, table_name
from hybrid.ctr_models._config import (
    freeze_lists,
    require,
    require_choice,
    require_positive_ints,
)
from hybrid.ctr_models.features import CTRInputs, FeatureSpec
from hybrid.ctr_models.layers import MLP

TIER_NORMS = ("log1p", "fraction")
MNSE_INPUTS = ("max_similarity", "mean_similarity", "history_length", "time_gap")
# time_gap: seconds since the most recent history event, quantised as round(4·log2(1 + gap)) — four levels per
# doubling; 2^40 s (far beyond any real gap) is the clip, so the top digits are still used by real data.
TIME_GAP_LEVELS_PER_DOUBLING = 4
TIME_GAP_MAX_LOG2 = 40
ITEM_FIELD = "item_id"


# ------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class MultimodalConfig:
    """Which multimodal features a ranker uses (the ``multimodal`` sub-config of DCN-v2, MoE and TIN).

    Everything is off by default; a ranker with any feature on needs ``item_vectors`` at construction.

    Args:
        simtier: add the SimTier representation (``features.embedding_dim`` wide).
        num_tiers: ``N`` uniform tiers over ``[-1, 1]`` (20 → width 0.1, the official resolution).
        tier_norm: ``"log1p"`` (``log(1 + count)``, the official code) or ``"fraction"`` (count / counted
            events: independent of history length).
        mnse: add MNSE encodings of ``mnse_inputs``.
        mnse_inputs: what MNSE encodes, any of ``"max_similarity"`` / ``"mean_similarity"`` (max / mean cosine
            between the candidate and its history items, quantised to ``similarity_levels``),
            ``"history_length"`` (real events in the window) and ``"time_gap"`` (seconds from the most recent
            history event to the candidate, log-quantised).
        mnse_bases: numeral systems (each >= 2), e.g. ``(2, 3, 10)``.
        mnse_dim: embedding width per base; each input adds ``len(mnse_bases) · mnse_dim`` features.
        similarity_levels: ``Q``: a cosine ``s`` becomes ``round((s + 1) / 2 · (Q − 1))``.
        item_field: add the candidate's projected vector ``proj(v)`` (``embedding_dim`` wide) as one more
            input — PAD's fusion of the ID embedding with the aligned multimodal one.
        mkmmd_weight: ``γ`` of the MK-MMD alignment loss between ``proj(v)`` and the item ID embedding
            (0 = off; PAD uses 0.2). Both sides are trained by it.
        mkmmd_bandwidths: ``α_u``; kernel ``u`` has ``σ_u² = α_u · mean pairwise squared distance``.
        mkmmd_max_items: at most this many distinct candidate items per batch enter the MMD (memory ``n²``).
        projection_hidden: hidden sizes of the projection ``d → embedding_dim``.
    """

    simtier: bool = False
    num_tiers: int = 20
    tier_norm: str = "log1p"
    mnse: bool = False
    mnse_inputs: tuple[str, ...] = ("max_similarity", "mean_similarity")
    mnse_bases: tuple[int, ...] = (2, 3, 10)
    mnse_dim: int = 8
    similarity_levels: int = 1024
    item_field: bool = False
    mkmmd_weight: float = 0.0
    mkmmd_bandwidths: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0)
    mkmmd_max_items: int = 512
    projection_hidden: tuple[int, ...] = (64,)

    def __post_init__(self) -> None:
        freeze_lists(self)
        name = "MultimodalConfig"
        require(self.num_tiers >= 2, name, "num_tiers", f"must be >= 2, got {self.num_tiers}")
        require_choice(self.tier_norm, TIER_NORMS, name, "tier_norm")
        require(isinstance(self.mnse_inputs, tuple) and len(self.mnse_inputs) > 0, name, "mnse_inputs",
                f"must be a non-empty list, got {self.mnse_inputs!r}")
        for value in self.mnse_inputs:
            require_choice(value, MNSE_INPUTS, name, "mnse_inputs")
        require(len(set(self.mnse_inputs)) == len(self.mnse_inputs), name, "mnse_inputs",
                f"duplicates in {self.mnse_inputs}")
        require(isinstance(self.mnse_bases, tuple) and len(self.mnse_bases) > 0, name, "mnse_bases",
                f"must be a non-empty list, got {self.mnse_bases!r}")
        for b in self.mnse_bases:
            require(isinstance(b, int) and not isinstance(b, bool) and b >= 2, name, "mnse_bases",
                    f"every base must be an int >= 2, got {self.mnse_bases!r}")
        require(len(set(self.mnse_bases)) == len(self.mnse_bases), name, "mnse_bases",
                f"duplicates in {self.mnse_bases}")
        require(self.mnse_dim >= 1, name, "mnse_dim", f"must be >= 1, got {self.mnse_dim}")
        require(self.similarity_levels >= 2, name, "similarity_levels",
                f"must be >= 2, got {self.similarity_levels}")
        require(self.mkmmd_weight >= 0, name, "mkmmd_weight", f"must be >= 0, got {self.mkmmd_weight}")
        require(isinstance(self.mkmmd_bandwidths, tuple) and len(self.mkmmd_bandwidths) > 0
                and all(isinstance(a, (int, float)) and a > 0 for a in self.mkmmd_bandwidths),
                name, "mkmmd_bandwidths", f"must be a non-empty list of numbers > 0, got {self.mkmmd_bandwidths!r}")
        require(self.mkmmd_max_items >= 2, name, "mkmmd_max_items", f"must be >= 2, got {self.mkmmd_max_items}")
        require_positive_ints(self.projection_hidden, name, "projection_hidden")

    @property
    def enabled(self) -> bool:
        """True when any feature is switched on (the ranker then needs ``item_vectors``)."""
        return self.simtier or self.mnse or self.item_field or self.mkmmd_weight > 0

    @property
    def uses_projection(self) -> bool:
        return self.item_field or self.mkmmd_weight > 0

    @classmethod
    def tiny(cls) -> "MultimodalConfig":
        """Every feature on, small sizes (tests and smoke runs)."""
        return cls(simtier=True, num_tiers=10, mnse=True, mnse_inputs=("max_similarity", "history_length"),
                   mnse_bases=(2, 3), mnse_dim=4, similarity_levels=64, item_field=True, mkmmd_weight=0.1,
                   projection_hidden=(16,))


# ------------------------------------------------------------------------------------------------- SimTier


def has_vector(vectors: torch.Tensor) -> torch.Tensor:
    """``[..., d] → [...]`` bool: the row is not all zero (the missing-vector policy, module docstring)."""
    return (vectors != 0).any(-1)


def candidate_history_cosine(candidate: torch.Tensor, history: torch.Tensor,
                             mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine between each candidate vector and its history vectors, and where it is defined.

    Args:
        candidate: ``[B, d]`` candidate vectors (zero row = no vector).
        history: ``[B, T, d]`` history vectors (zero rows on padding and for items without a vector).
        mask: ``[B, T]`` bool, True on real history events.

    Returns:
        ``(cos [B, T], valid [B, T])``: ``valid`` = real event, and both items have a vector; ``cos`` is 0
        where not valid.

    Example:
        >>> c = torch.tensor([[1.0, 0.0]]); h = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
        >>> candidate_history_cosine(c, h, torch.tensor([[True, True]]))
        (tensor([[0.7071, 0.0000]]), tensor([[ True, False]]))
    """
    valid = mask & has_vector(history) & has_vector(candidate).unsqueeze(1)
    c = nn.functional.normalize(candidate, dim=-1)
    h = nn.functional.normalize(history, dim=-1)
    cos = torch.einsum("bd,btd->bt", c, h)
    return cos.masked_fill(~valid, 0.0), valid


def similarity_tiers(cos: torch.Tensor, num_tiers: int) -> torch.Tensor:
    """Tier of each cosine: ``floor((cos + 1) / 2 · N)`` clipped to ``[0, N − 1]`` (so ``cos = 1`` and float
    error just above 1 land in the top tier, just below −1 in the bottom one — nothing is dropped).

    Example:
        >>> similarity_tiers(torch.tensor([-1.0, -0.05, 0.0, 0.95, 1.0000001]), 20)
        tensor([ 0,  9, 10, 19, 19])
    """
    return torch.floor((cos + 1.0) * (num_tiers / 2.0)).to(torch.int64).clamp(0, num_tiers - 1)


def simtier_counts(cos: torch.Tensor, valid: torch.Tensor, num_tiers: int) -> torch.Tensor:
    """SimTier histogram ``h_k = #{j valid : tier(cos_j) = k}``.

    Args:
        cos: ``[B, T]`` cosines; valid: ``[B, T]`` bool (padding and items without a vector are False and
            never counted).

    Returns:
        ``[B, N]`` float counts.
    """
    tiers = similarity_tiers(cos, num_tiers)
    counts = cos.new_zeros(cos.shape[0], num_tiers)
    return counts.scatter_add_(1, tiers, valid.to(cos.dtype))


class SimTier(nn.Module):
    """SimTier: tier histogram of candidate-vs-history similarities → a learned ``dim``-wide vector.

    Args:
        num_tiers: ``N`` tiers over ``[-1, 1]``.
        dim: output width.
        norm: ``"log1p"`` (``log(1 + h)``, official) or ``"fraction"`` (``h / Σh``; an empty histogram stays 0).
        init_std: std of the tier embeddings' normal init.

    Shapes:
        ``cos [B, T], valid [B, T] → [B, dim]`` = ``Σ_k norm(h)_k · E_k`` (an embedding bag over tiers with the
        normalised counts as weights).

    Example:
        >>> st = SimTier(num_tiers=20, dim=8)
        >>> st(torch.rand(4, 10) * 2 - 1, torch.ones(4, 10, dtype=torch.bool)).shape
        torch.Size([4, 8])
    """

    def __init__(self, num_tiers: int, dim: int, norm: str = "log1p", init_std: float = 0.05) -> None:
        super().__init__()
        require_choice(norm, TIER_NORMS, "MultimodalConfig", "tier_norm")
        self.num_tiers, self.norm = num_tiers, norm
        self.tier_embedding = nn.Parameter(torch.empty(num_tiers, dim))
        nn.init.normal_(self.tier_embedding, std=init_std)

    def normalised_counts(self, cos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` normalised histogram (what is embedded)."""
        h = simtier_counts(cos, valid, self.num_tiers)
        if self.norm == "log1p":
            return torch.log1p(h)
        return h / h.sum(1, keepdim=True).clamp(min=1.0)

    def forward(self, cos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.normalised_counts(cos, valid) @ self.tier_embedding


# ------------------------------------------------------------------------------------------------- MNSE


def num_digits(max_value: int, base: int) -> int:
    """Digits needed to write every integer in ``[0, max_value]`` in ``base`` (at least 1).

    Example:
        >>> num_digits(51, 2), num_digits(51, 3), num_digits(1023, 10)
        (6, 4, 4)
    """
    p = 1
    while base ** p <= max_value:
        p += 1
    return p


def numeral_digits(x: torch.Tensor, base: int, num_positions: int) -> torch.Tensor:
    """Digits of non-negative integers ``x [...]`` in ``base``, least significant first: ``[..., P]``.

    Example:
        >>> numeral_digits(torch.tensor(51), 2, 6).tolist()   # 51 = 110011 in base 2
        [1, 1, 0, 0, 1, 1]
        >>> numeral_digits(torch.tensor(51), 3, 4).tolist()   # 51 = 1220 in base 3
        [0, 2, 2, 1]
    """
    powers = base ** torch.arange(num_positions, device=x.device, dtype=torch.int64)
    return (x.to(torch.int64).unsqueeze(-1) // powers) % base


def quantize_similarity(s: torch.Tensor, levels: int) -> torch.Tensor:
    """Cosine ``s ∈ [-1, 1]`` → integer ``round((s + 1) / 2 · (levels − 1))`` in ``[0, levels − 1]``.

    Example:
        >>> quantize_similarity(torch.tensor([-1.0, 0.0, 1.0]), 1024)
        tensor([   0,  512, 1023])
    """
    q = torch.round((s.clamp(-1.0, 1.0) + 1.0) / 2.0 * (levels - 1))
    return q.to(torch.int64)


def quantize_time_gap(gap_seconds: torch.Tensor) -> torch.Tensor:
    """Gap in seconds (clamped at 0) → ``round(4 · log2(1 + gap))``, clipped to ``4 · 40`` (heavy tails: the
    log keeps the high-order digits informative).

    Example:
        >>> quantize_time_gap(torch.tensor([0, 1, 3600, 86400]))
        tensor([ 0,  4, 47, 66])
    """
    q = torch.round(TIME_GAP_LEVELS_PER_DOUBLING * torch.log2(1.0 + gap_seconds.clamp(min=0).to(torch.float64)))
    return q.to(torch.int64).clamp(max=TIME_GAP_LEVELS_PER_DOUBLING * TIME_GAP_MAX_LOG2)


class MNSE(nn.Module):
    """Multiple Numeral Systems Encoding of non-negative integers.

    For each base ``b`` with ``P_b`` digit positions, a table of ``P_b · b`` rows: token ``pos · b + digit``
    (position-tagged, so a "1" in different positions is a different token). ``emb_b(x) = Σ_pos E_b[pos · b +
    digit_pos(x)]``; the output concatenates ``emb_b`` over the bases.

    Args:
        max_value: largest value to encode; larger inputs are clipped to it, negative ones to 0.
        bases: numeral systems, e.g. ``(2, 3, 10)``.
        dim: embedding width per base.
        init_std: std of the tables' normal init.

    Shapes:
        ``x [...] int64 → [..., len(bases) · dim]``.

    Example:
        >>> mnse = MNSE(max_value=1023, bases=(2, 3, 10), dim=4)
        >>> mnse(torch.tensor([50, 51, 600])).shape
        torch.Size([3, 12])
    """

    def __init__(self, max_value: int, bases: Sequence[int] = (2, 3, 10), dim: int = 8,
                 init_std: float = 0.05) -> None:
        super().__init__()
        require(max_value >= 1, "MNSE", "max_value", f"must be >= 1, got {max_value}")
        self.max_value, self.bases, self.dim = int(max_value), tuple(bases), dim
        self.positions = tuple(num_digits(self.max_value, b) for b in self.bases)
        self.tables = nn.ModuleDict({f"base{b}": nn.Embedding(p * b, dim) for b, p in zip(self.bases, self.positions)})
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=init_std)
        self.output_dim = dim * len(self.bases)

    def tokens(self, x: torch.Tensor, base: int) -> torch.Tensor:
        """Position-tagged token ids ``[..., P_b]`` of ``x`` in ``base`` (rows of table ``base<b>``)."""
        p = self.positions[self.bases.index(base)]
        digits = numeral_digits(x.clamp(0, self.max_value), base, p)
        return torch.arange(p, device=x.device) * base + digits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.tables[f"base{b}"](self.tokens(x, b)).sum(-2) for b in self.bases], dim=-1)


# ------------------------------------------------------------------------------------------------- MK-MMD


def mk_mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] = (0.125, 0.25, 0.5, 1.0, 2.0)) -> torch.Tensor:
    """Multi-kernel Gaussian MMD² between samples ``x [n, D]`` and ``y [m, D]`` (unbiased estimator).

    ``k = Σ_u exp(−‖a − b‖² / (2 σ_u²))`` with ``σ_u² = α_u · mean_{a,b} ‖z_a − z_b‖²`` over the pooled
    ``n + m`` points (detached, as tllib/PAD: the bandwidths follow the data scale but get no gradient), and

    ``MMD² = Σ_{i≠j} k(x_i, x_j) / (n(n−1)) + Σ_{i≠j} k(y_i, y_j) / (m(m−1)) − 2 Σ_{i,j} k(x_i, y_j) / (n m)``

    (no constant offset, unlike tllib's, so two samples of one law give ≈ 0 — slightly negative is possible).
    Memory ``O((n + m)²)``: squared distances come from one Gram matrix, ``‖a‖² + ‖b‖² − 2 a·b``.

    Returns:
        a scalar; 0 when either sample has fewer than 2 points.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> a, b = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g)
        >>> abs(float(mk_mmd(a, b))) < 0.05, float(mk_mmd(a, b + 1.0)) > 0.3
        (True, True)
    """
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        return x.new_zeros(())
    z = torch.cat([x, y], 0)
    sq = (z * z).sum(1)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (z @ z.T)).clamp(min=0.0)
    scale = d2.detach().mean().clamp(min=torch.finfo(z.dtype).tiny)
    kernel = sum(torch.exp(-d2 / (2.0 * alpha * scale)) for alpha in bandwidths)
    kxx, kyy, kxy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return xx + yy - 2.0 * kxy.mean()


# ------------------------------------------------------------------------------------------------- the module


def item_field_embedding(inputs: CTRInputs) -> torch.Tensor:
    """The candidate's item ID embedding ``[B, D]`` (the ``item_id`` field of ``CTRInputs.fields``)."""
    return inputs.fields[:, inputs.field_names.index(ITEM_FIELD)]


class MultimodalFeatures(nn.Module):
    # Vocabularies up to this many rows get a precomputed V×V cosine table (64 MB at the limit), so a batch
    # gathers [B, T] similarities instead of [B, T, d] vectors (50× less memory traffic at d = 384).
    similarity_table_max_rows = 4096

    """The multimodal features of one ranker over a fixed item-vector matrix.

    Args:
        config: :class:`MultimodalConfig` (at least one feature on).
        item_vectors: ``[V, d]`` float, row = item id of the ranker's ``item_id`` vocabulary (``V`` = that
            table's size); zero rows = no vector. Stored as a non-trainable buffer ``item_vectors``.
        spec: the ranker's feature layout; needs an ``item_id`` candidate field, and a ``hist_item_id``
            history for SimTier / MNSE.

    Shapes:
        ``forward(inputs) → [B, output_dim]`` = ``[SimTier (D) | MNSE per input (len(bases)·mnse_dim) |
        proj(v_candidate) (D)]`` for the parts switched on. ``inputs`` is the ranker's :class:`CTRInputs`
        (or one per embedding set for the multi-embedding MoE): the candidate's and the history's item ids are
        read from the first (``field_ids`` / ``history_ids``), and its item ID embeddings are what MK-MMD
        aligns ``proj(v)`` with (averaged over embedding sets).

    Attributes:
        traceable: ``False`` (training, evaluation). ``True`` (what ``hybrid.ctr_models.export.ServingRanker``
            sets on its copy): a forward ``torch.export`` can trace — cosines computed directly rather than
            gathered from the cached ``V × V`` table (keyed on the buffer's address), and nothing of the batch
            kept (coverage metrics; MK-MMD, a training loss, is not computed). Same features within float
            rounding.

    Example:
        >>> mm = MultimodalFeatures(MultimodalConfig(simtier=True, mkmmd_weight=0.1), vectors, spec)
        >>> x = ctr_features(batch)
        >>> extra = mm(x)                               # [B, mm.output_dim], appended to the ranker input
        >>> mm.auxiliary_losses()                       # {"mkmmd": 0.1 · MMD²} in training mode
    """

    def __init__(self, config: MultimodalConfig, item_vectors: torch.Tensor, spec: FeatureSpec) -> None:
        super().__init__()
        require(config.enabled, "MultimodalConfig", "simtier",
                "no multimodal feature is switched on (simtier, mnse, item_field, mkmmd_weight)")
        check_item_vectors(item_vectors, spec)
        needs_history = config.simtier or config.mnse
        require(not needs_history or ITEM_FIELD in spec.history_fields, "MultimodalConfig", "simtier",
                f"SimTier / MNSE compare the candidate with its history: the ranker needs the history field "
                f"'{ITEM_FIELD}' (features.history_fields is {spec.history_fields})")
        self.config, self.max_len = config, spec.max_len
        D = spec.embedding_dim
        self.register_buffer("item_vectors", item_vectors.detach().to(torch.float32).clone())
        self.simtier = SimTier(config.num_tiers, D, config.tier_norm, spec.init_std) if config.simtier else None
        self.mnse = nn.ModuleDict()
        if config.mnse:
            for name in config.mnse_inputs:
                self.mnse[name] = MNSE(self._max_value(name, spec.max_len), config.mnse_bases, config.mnse_dim,
                                       spec.init_std)
            # One learned vector per input for "undefined" (no history, or no vectors to compare).
            self.mnse_missing = nn.Parameter(torch.zeros(len(config.mnse_inputs),
                                                         config.mnse_dim * len(config.mnse_bases)))
        self.projection = (MLP(item_vectors.shape[1], config.projection_hidden + (D,), last_activation=False)
                           if config.uses_projection else None)
        self.output_dim = ((D if config.simtier else 0) + sum(m.output_dim for m in self.mnse.values())
                           + (D if config.item_field else 0))
        self.traceable = False
        self._table: tuple[tuple, torch.Tensor, torch.Tensor] | None = None
        self._last_mmd: torch.Tensor | None = None
        self._last_coverage: tuple[torch.Tensor, torch.Tensor] | None = None

    def _max_value(self, name: str, max_len: int) -> int:
        if name in ("max_similarity", "mean_similarity"):
            return self.config.similarity_levels - 1
        if name == "history_length":
            return max_len
        return TIME_GAP_LEVELS_PER_DOUBLING * TIME_GAP_MAX_LOG2

    def forward(self, inputs: CTRInputs | Sequence[CTRInputs]) -> torch.Tensor:
        cfg = self.config
        sets = [inputs] if isinstance(inputs, CTRInputs) else list(inputs)
        x = sets[0]
        if ITEM_FIELD not in x.field_ids:
            raise ValueError(f"MultimodalFeatures: CTRInputs.field_ids has no '{ITEM_FIELD}' (has "
                             f"{sorted(x.field_ids)}); the candidate's item vector is looked up by it")
        cand_ids = x.field_ids[ITEM_FIELD]
        cand_vec = self.item_vectors[cand_ids]
        parts: list[torch.Tensor] = []
        if cfg.simtier or cfg.mnse:
            if ITEM_FIELD not in x.history_ids or x.mask is None:
                raise ValueError(f"MultimodalFeatures: SimTier / MNSE need the padded history ids "
                                 f"CTRInputs.history_ids['{ITEM_FIELD}'] and CTRInputs.mask")
            hist_ids, mask = x.history_ids[ITEM_FIELD], x.mask
            cos, valid = self.cosines(cand_ids, hist_ids, mask)
            if not self.traceable:
                # Kept as tensors: converting here would force a device sync on every step.
                self._last_coverage = (has_vector(cand_vec).float().mean().detach(),
                                       (valid.sum() / mask.sum().clamp(min=1)).detach())
            if self.simtier is not None:
                parts.append(self.simtier(cos, valid))
            for i, (name, mnse) in enumerate(self.mnse.items()):
                value, ok = self._mnse_value(name, cos, valid, mask, sets[0])
                parts.append(torch.where(ok.unsqueeze(1), mnse(value), self.mnse_missing[i]))
        if self.projection is not None:
            projected = self.projection(cand_vec)
            if cfg.item_field:
                parts.append(projected)
            if cfg.mkmmd_weight > 0 and not self.traceable:
                self._last_mmd = self._alignment(cand_ids, cand_vec, projected, sets)
        return torch.cat(parts, dim=1) if parts else cand_vec.new_zeros(cand_vec.shape[0], 0)

    def cosines(self, cand_ids: torch.Tensor, hist_ids: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`candidate_history_cosine` by item id: ``cand_ids [B], hist_ids [B, T], mask [B, T] →
        (cos [B, T], valid [B, T])``, from the cosine table when the vocabulary is small enough."""
        vectors = self.item_vectors
        if self.traceable or vectors.shape[0] > self.similarity_table_max_rows:
            return candidate_history_cosine(vectors[cand_ids], vectors[hist_ids], mask)
        # Rebuilt whenever the buffer changes (a loaded checkpoint copies into it in place: _version moves).
        key = (vectors.data_ptr(), vectors._version, vectors.device)
        if self._table is None or self._table[0] != key:
            with torch.no_grad():
                unit = nn.functional.normalize(vectors, dim=-1)
                self._table = (key, unit @ unit.T, has_vector(vectors))
        _, table, has = self._table
        valid = mask & has[hist_ids] & has[cand_ids].unsqueeze(1)
        return table[cand_ids.unsqueeze(1), hist_ids].masked_fill(~valid, 0.0), valid

    def _mnse_value(self, name: str, cos: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor,
                    inputs: CTRInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The integer MNSE encodes for ``name`` ``[B]`` and whether it is defined ``[B]``."""
        defined = valid.any(1)
        if name == "max_similarity":
            s = cos.masked_fill(~valid, -1.0).max(1).values
            return quantize_similarity(s, self.config.similarity_levels), defined
        if name == "mean_similarity":
            s = cos.sum(1) / valid.sum(1).clamp(min=1)
            return quantize_similarity(s, self.config.similarity_levels), defined
        lengths = mask.sum(1)
        if name == "history_length":
            return lengths, torch.ones_like(defined)
        if inputs.history_timestamps is None:
            raise ValueError("MultimodalConfig.mnse_inputs: 'time_gap' needs CTRBatch.hist_timestamps; the batch "
                             "has none")
        last = inputs.history_timestamps.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        return quantize_time_gap(inputs.timestamps - last), lengths > 0

    def _alignment(self, cand_ids: torch.Tensor, cand_vec: torch.Tensor, projected: torch.Tensor,
                   sets: list[CTRInputs]) -> torch.Tensor:
        """MK-MMD between ``proj(v)`` and the ID embeddings of the batch's distinct candidate items."""
        keep = (cand_ids >= NUM_RESERVED_IDS) & has_vector(cand_vec)
        rows = torch.nonzero(keep).squeeze(1)
        # One row per distinct item (its first occurrence): a popular item must not dominate either sample.
        uniq, inverse = torch.unique(cand_ids[rows], return_inverse=True)
        first = torch.full((uniq.numel(),), rows.numel(), dtype=torch.int64, device=rows.device)
        first = first.scatter_reduce(0, inverse, torch.arange(rows.numel(), device=rows.device), "amin")
        rows = rows[first]
        if rows.numel() > self.config.mkmmd_max_items:
            rows = rows[torch.randperm(rows.numel(), device=rows.device)[: self.config.mkmmd_max_items]]
        t = projected[rows]
        losses = [mk_mmd(t, item_field_embedding(x)[rows], self.config.mkmmd_bandwidths) for x in sets]
        return torch.stack(losses).mean()

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """``{"mkmmd": γ · MMD²}`` of the last forward in training mode with ``γ > 0``; else ``{}``."""
        if not self.training or self.config.mkmmd_weight <= 0 or self._last_mmd is None:
            return {}
        return {"mkmmd": self.config.mkmmd_weight * self._last_mmd}

    def logging_metrics(self) -> dict[str, float]:
        """``mm/mkmmd`` (unweighted MMD² of the last batch) and the share of candidates / real history events
        with a vector (``mm/candidate_coverage``, ``mm/history_coverage``)."""
        out: dict[str, float] = {}
        if self._last_mmd is not None:
            out["mm/mkmmd"] = float(self._last_mmd.detach())
        if self._last_coverage is not None:
            out["mm/candidate_coverage"] = float(self._last_coverage[0])
            out["mm/history_coverage"] = float(self._last_coverage[1])
        return out


def check_item_vectors(item_vectors: torch.Tensor | None, spec: FeatureSpec) -> None:
    """Raise ``ValueError`` unless ``item_vectors`` is a finite ``[V, d]`` float tensor with ``V`` = the rows of
    the ranker's ``item_id`` table."""
    if not isinstance(item_vectors, torch.Tensor):
        raise ValueError("item_vectors: a ranker with multimodal features needs the item-vector matrix "
                         f"(build_ranker(..., item_vectors=tensor [V, d])), got {type(item_vectors).__name__}")
    table = table_name(ITEM_FIELD)
    if table not in spec.table_sizes or ITEM_FIELD not in spec.single_fields:
        raise ValueError(f"item_vectors: the ranker has no '{ITEM_FIELD}' candidate field to look vectors up by "
                         f"(candidate fields: {spec.single_fields})")
    V = spec.table_sizes[table]
    if item_vectors.dim() != 2 or item_vectors.shape[0] != V or item_vectors.shape[1] < 1:
        raise ValueError(f"item_vectors: expected shape [{V}, d] (one row per id of the '{ITEM_FIELD}' vocabulary, "
                         f"PAD/OOV included), got {list(item_vectors.shape)}")
    if not item_vectors.is_floating_point():
        raise ValueError(f"item_vectors: expected a float tensor, got {item_vectors.dtype}")
    if item_vectors.device.type != "meta" and not bool(torch.isfinite(item_vectors).all()):
        raise ValueError("item_vectors: contains NaN or inf")


def build_multimodal(config: MultimodalConfig, item_vectors: torch.Tensor | None,
                     spec: FeatureSpec, ranker: str) -> MultimodalFeatures | None:
    """What every ranker calls: the module when ``config`` switches a feature on, else ``None``.

    Raises ``ValueError`` when features are on but no vectors were given, or vectors were given with every
    feature off (they would be silently unused).
    """
    if not config.enabled:
        if item_vectors is not None:
            raise ValueError(f"{ranker}.multimodal: item_vectors were given but no multimodal feature is switched "
                             "on (simtier, mnse, item_field or mkmmd_weight > 0)")
        return None
    return MultimodalFeatures(config, item_vectors, spec)  # type: ignore[arg-type]


__all__ = [
    "MultimodalConfig", "MultimodalFeatures", "SimTier", "MNSE", "mk_mmd", "simtier_counts", "similarity_tiers",
    "candidate_history_cosine", "numeral_digits", "num_digits", "quantize_similarity", "quantize_time_gap",
    "has_vector", "build_multimodal", "check_item_vectors", "item_field_embedding",
]
