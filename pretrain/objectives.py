"""Generative pretraining objectives and retrieval metrics.

* Next-item **sampled softmax** on cosine scores (L2-normalised query and item vectors, divided by a
  temperature), with accidental hits (a negative equal to the positive) masked out. Two negative sources:
  ``uniform`` — ``num_negatives`` ids drawn uniformly over the real items ``[2, V)`` once per sequence and
  shared by all its positions (GPSD); ``in_batch`` — the target items of the batch, with logQ correction
  (Yi et al., RecSys'19: subtract ``log q(item)``, the in-batch sampling probability estimated from item
  frequencies, from every logit, positive included).
* Auxiliary next-category **full softmax** (same cosine/temperature scoring, tied to the category table).
* **HR@k / NDCG@k** of held-out next items ranked over the full item set.

All losses are means over target positions. Reserved ids (PAD=0, OOV=1) are never targets, never sampled
as negatives and never ranked.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F

from hybrid.core.config import from_mapping
from hybrid.core.feature_map import NUM_RESERVED_IDS, OOV_ID, PAD_ID

NegativeSampling = Literal["uniform", "in_batch"]


@dataclass(frozen=True)
class ObjectiveConfig:
    """Settings of the pretraining losses.

    Args:
        negatives: ``"uniform"`` (GPSD: uniform ids shared per sequence) or ``"in_batch"`` (the batch's
            target items, with logQ correction when ``logq_correction``).
        num_negatives: uniform: ids drawn per sequence; in-batch: at most this many of the batch's targets
            are used as the shared candidate set (a uniform subsample when there are more), which bounds the
            ``[targets x candidates]`` score matrix.
        temperature: cosine scores are divided by it (GPSD: 0.05).
        logq_correction: in-batch only; needs item frequency counts.
        item_loss_weight: weight of the next-item loss in ``loss``.
        category_loss_weight: weight of the next-category loss (``0`` disables it).
        category_feature: the feature whose next value the auxiliary loss predicts.

    Example:
        >>> ObjectiveConfig(negatives="in_batch", num_negatives=512).temperature
        0.05
    """

    negatives: NegativeSampling = "uniform"
    num_negatives: int = 4096
    temperature: float = 0.05
    logq_correction: bool = True
    item_loss_weight: float = 1.0
    category_loss_weight: float = 1.0
    category_feature: str = "category"

    def __post_init__(self) -> None:
        if self.negatives not in ("uniform", "in_batch"):
            raise ValueError(f"ObjectiveConfig.negatives must be 'uniform' or 'in_batch', got {self.negatives!r}")
        if not isinstance(self.num_negatives, int) or self.num_negatives < 1:
            raise ValueError(f"ObjectiveConfig.num_negatives must be a positive int, got {self.num_negatives!r}")
        if not self.temperature > 0:
            raise ValueError(f"ObjectiveConfig.temperature must be > 0, got {self.temperature}")
        if self.item_loss_weight < 0 or self.category_loss_weight < 0:
            raise ValueError("ObjectiveConfig loss weights must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ObjectiveConfig":
        """Inverse of :meth:`to_dict`; an unknown key or a wrong type raises a ``ValueError`` naming the key."""
        return from_mapping(cls, data, source="ObjectiveConfig")


def sample_uniform_negatives(
    num_sequences: int,
    num_negatives: int,
    vocab_size: int,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Uniform negative ids over the real items ``[NUM_RESERVED_IDS, vocab_size)``, one set per sequence.

    Returns:
        ``[num_sequences, num_negatives]`` int64 (with replacement, like GPSD's ``torch.randint``).

    Example:
        >>> ids = sample_uniform_negatives(2, 5, 10)
        >>> ids.shape, bool((ids >= 2).all() and (ids < 10).all())
        (torch.Size([2, 5]), True)
    """
    if vocab_size <= NUM_RESERVED_IDS:
        raise ValueError(f"item vocabulary of size {vocab_size} has no real items to sample")
    return torch.randint(
        NUM_RESERVED_IDS, vocab_size, (num_sequences, num_negatives), device=device, generator=generator
    )


def log_q_from_counts(item_counts: torch.Tensor) -> torch.Tensor:
    """Log in-batch sampling probability per item id from frequency counts.

    In-batch negatives are the batch's targets, so an item is drawn with probability proportional to how
    often it is a target: ``q = count / sum(count)``. Counts below 1 (reserved ids, unseen items) are
    clamped to 1 so the log stays finite.

    Args:
        item_counts: ``[V]`` counts indexed by item id.

    Returns:
        ``[V]`` float32 ``log q``.
    """
    counts = item_counts.to(torch.float32).clamp(min=1.0)
    return counts.log() - math.log(float(counts.sum()))


def sampled_softmax_loss(
    query: torch.Tensor,
    target_mask: torch.Tensor,
    positive_ids: torch.Tensor,
    positive_vectors: torch.Tensor,
    negative_ids: torch.Tensor,
    negative_vectors: torch.Tensor,
    temperature: float,
    *,
    log_q: torch.Tensor | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Sampled-softmax cross-entropy with negatives shared within a group (a sequence, or the batch).

    For every target position: logits ``[s(q, pos), s(q, neg_1), ..., s(q, neg_K)]`` with
    ``s = cos / temperature - log_q[id]``; negatives whose id equals the positive id are masked to ``-inf``
    (accidental hits); loss ``= -log softmax(logits)[0]``, averaged over ``target_mask``.

    Args:
        query: ``[G, T, E]`` hidden states (groups x positions).
        target_mask: ``[G, T]`` bool, the positions that have a target.
        positive_ids: ``[G, T]`` target item ids.
        positive_vectors: ``[G, T, E]`` target item vectors (tied input embeddings).
        negative_ids: ``[G, K]`` negative ids shared by all positions of a group.
        negative_vectors: ``[G, K, E]``.
        temperature: divides the cosine scores.
        log_q: optional ``[V]`` log sampling probability per item id (logQ correction).
        normalize: L2-normalise query and item vectors (cosine scores).

    Returns:
        scalar mean loss (a zero that still has a graph when no position has a target).

    Example:
        >>> q = torch.randn(1, 3, 4)
        >>> ids = torch.tensor([[2, 3, 4]])
        >>> table = torch.randn(5, 4)
        >>> loss = sampled_softmax_loss(q, torch.ones(1, 3, dtype=torch.bool), ids, table[ids],
        ...                             ids, table[ids], 0.1)  # every other target as a negative
        >>> loss.shape
        torch.Size([])
    """
    if normalize:
        query = F.normalize(query, dim=-1)
        positive_vectors = F.normalize(positive_vectors, dim=-1)
        negative_vectors = F.normalize(negative_vectors, dim=-1)
    pos_logits = (query * positive_vectors).sum(-1) / temperature  # [G, T]
    neg_logits = torch.bmm(query, negative_vectors.transpose(1, 2)) / temperature  # [G, T, K]
    if log_q is not None:
        pos_logits = pos_logits - log_q[positive_ids]
        neg_logits = neg_logits - log_q[negative_ids].unsqueeze(1)
    hits = negative_ids.unsqueeze(1) == positive_ids.unsqueeze(2)
    neg_logits = neg_logits.masked_fill(hits, float("-inf"))
    logits = torch.cat([pos_logits.unsqueeze(-1), neg_logits], dim=-1)[target_mask]  # [N, 1 + K]
    if logits.size(0) == 0:
        return query.sum() * 0.0
    # the positive logit is finite, so the logsumexp is finite even when many negatives are -inf
    return (torch.logsumexp(logits, dim=-1) - logits[:, 0]).mean()


def in_batch_candidates(
    target_ids: torch.Tensor,
    target_vectors: torch.Tensor,
    max_candidates: int,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's targets as one shared candidate set (uniformly subsampled above ``max_candidates``).

    Args:
        target_ids: ``[N]`` ids of all target positions of the batch.
        target_vectors: ``[N, E]``.
        max_candidates: keep at most this many (without replacement).

    Returns:
        ``negative_ids [1, K]`` and ``negative_vectors [1, K, E]`` for :func:`sampled_softmax_loss` with
        ``G = 1``. A candidate equal to a row's own positive is removed there as an accidental hit.
    """
    n = target_ids.size(0)
    if n > max_candidates:
        keep = torch.randperm(n, device=target_ids.device, generator=generator)[:max_candidates]
        target_ids, target_vectors = target_ids[keep], target_vectors[keep]
    return target_ids.unsqueeze(0), target_vectors.unsqueeze(0)


def full_softmax_loss(
    query: torch.Tensor,
    target_ids: torch.Tensor,
    class_vectors: torch.Tensor,
    temperature: float,
    *,
    num_reserved: int = NUM_RESERVED_IDS,
    normalize: bool = True,
) -> torch.Tensor:
    """Cross-entropy over every class, cosine scores / temperature; reserved ids are not classes.

    Args:
        query: ``[N, E]`` hidden states at target positions.
        target_ids: ``[N]`` class ids, each ``>= num_reserved``.
        class_vectors: ``[C, E]`` the (tied) class embedding table.
        temperature: divides the cosine scores.
        num_reserved: leading ids excluded from the softmax (PAD, OOV).
        normalize: L2-normalise (cosine scores).

    Returns:
        scalar mean loss (zero with a graph when ``N == 0``).

    Example:
        >>> full_softmax_loss(torch.randn(3, 4), torch.tensor([2, 3, 2]), torch.randn(4, 4), 0.1).shape
        torch.Size([])
    """
    if target_ids.numel() == 0:
        return query.sum() * 0.0
    if normalize:
        query = F.normalize(query, dim=-1)
        class_vectors = F.normalize(class_vectors, dim=-1)
    logits = query @ class_vectors[num_reserved:].t() / temperature
    return F.cross_entropy(logits, target_ids - num_reserved)


@torch.no_grad()
def hr_ndcg_at_k(
    hidden_last: torch.Tensor,
    item_table: torch.Tensor,
    targets: torch.Tensor,
    k: int = 10,
    exclude: Sequence[int] = (PAD_ID, OOV_ID),
    *,
    normalize: bool = True,
    chunk_size: int = 65536,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hit rate and NDCG at ``k`` of one held-out target per row, ranked over the full item set.

    The rank of the target is the number of other (non-excluded) items scoring at least as high — ties
    count against the target, so a degenerate model (all scores equal) gets no hits. With a single relevant
    item, ``NDCG = 1 / log2(rank + 2)`` when ``rank < k`` (rank 0 → 1.0, rank 2 → 0.5) and 0 otherwise.
    Items are scored in chunks of ``chunk_size`` so a large vocabulary never materialises ``[B, V]``.

    Args:
        hidden_last: ``[B, E]`` query states (the position before each target).
        item_table: ``[V, E]`` item vectors indexed by id.
        targets: ``[B]`` target ids (not in ``exclude``).
        k: cut-off.
        exclude: ids never ranked (reserved ids by default).
        normalize: cosine scores (normalising the query does not change the ranking; the items do).
        chunk_size: items scored at a time.

    Returns:
        ``hr [B]`` and ``ndcg [B]`` float32 per row; average them over the evaluation set.

    Example:
        >>> table = torch.eye(4)
        >>> hr, ndcg = hr_ndcg_at_k(torch.tensor([[0.0, 0.0, 1.0, 0.5]]), table, torch.tensor([2]), k=1)
        >>> hr.item(), ndcg.item()
        (1.0, 1.0)
    """
    query = F.normalize(hidden_last.float(), dim=-1) if normalize else hidden_last.float()
    table = F.normalize(item_table.float(), dim=-1) if normalize else item_table.float()
    target_scores = (query * table[targets]).sum(-1, keepdim=True)  # [B, 1]
    excluded = torch.as_tensor(list(exclude), dtype=torch.int64, device=table.device)
    rank = torch.zeros(targets.shape, dtype=torch.int64, device=query.device)
    for start in range(0, table.size(0), chunk_size):
        scores = query @ table[start : start + chunk_size].t()  # [B, C]
        ids = torch.arange(start, start + scores.size(1), device=table.device)
        ahead = scores >= target_scores
        # the target itself and excluded ids never count as ranked above the target
        ahead &= ids.unsqueeze(0) != targets.unsqueeze(1)
        ahead &= ~torch.isin(ids, excluded).unsqueeze(0)
        rank += ahead.sum(-1)
    hit = rank < k
    ndcg = torch.where(hit, 1.0 / torch.log2(rank.to(torch.float32) + 2.0), torch.zeros((), device=rank.device))
    return hit.to(torch.float32), ndcg
