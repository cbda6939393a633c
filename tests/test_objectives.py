"""Objectives: sampled softmax (uniform shared / in-batch + logQ) against direct computations, accidental
hits, the full-softmax category loss, and HR/NDCG on constructed rankings."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hybrid.pretrain.objectives import (
    ObjectiveConfig,
    full_softmax_loss,
    hr_ndcg_at_k,
    in_batch_candidates,
    log_q_from_counts,
    sample_uniform_negatives,
    sampled_softmax_loss,
)

V, E, TEMP = 12, 6, 0.1


@pytest.fixture
def table():
    return torch.randn(V, E, generator=torch.Generator().manual_seed(0))


def test_all_items_as_negatives_equals_full_softmax_cross_entropy(table):
    g = torch.Generator().manual_seed(1)
    query = torch.randn(2, 4, E, generator=g)
    targets = torch.randint(2, V, (2, 4), generator=g)
    mask = torch.tensor([[True, True, False, True], [True, False, True, True]])
    negatives = torch.arange(2, V).expand(2, -1)  # every real item, shared by each sequence
    loss = sampled_softmax_loss(query, mask, targets, table[targets], negatives, table[negatives], TEMP)

    logits = F.normalize(query, dim=-1) @ F.normalize(table[2:], dim=-1).T / TEMP  # [2, 4, V - 2]
    expected = F.cross_entropy(logits[mask], targets[mask] - 2)
    torch.testing.assert_close(loss, expected)


def test_accidental_hits_are_masked(table):
    g = torch.Generator().manual_seed(2)
    query = torch.randn(3, 1, E, generator=g)  # three groups of one position each
    targets = torch.tensor([[4], [7], [9]])
    mask = torch.ones(3, 1, dtype=torch.bool)
    clean = torch.tensor([[2, 3, 5, 6]]).expand(3, -1)
    # the same negatives plus two copies of each row's own positive: the copies must not count
    with_hits = torch.cat([clean[:, :2], targets, clean[:, 2:], targets], dim=1)
    a = sampled_softmax_loss(query, mask, targets, table[targets], clean, table[clean], TEMP)
    b = sampled_softmax_loss(query, mask, targets, table[targets], with_hits, table[with_hits], TEMP)
    torch.testing.assert_close(a, b)
    # only hits as negatives → the positive is alone in the softmax → zero loss, not NaN
    only = targets.repeat(1, 2)
    z = sampled_softmax_loss(query, mask, targets, table[targets], only, table[only], TEMP)
    assert z.item() == pytest.approx(0.0, abs=1e-6)
    # within a shared group, another position's positive is a real negative (not masked)
    q1 = query.reshape(1, 3, E)
    t1 = targets.reshape(1, 3)
    m1 = torch.ones(1, 3, dtype=torch.bool)
    shared = torch.tensor([[2, 7]])
    row0 = sampled_softmax_loss(q1[:, :1], m1[:, :1], t1[:, :1], table[t1[:, :1]], shared, table[shared], TEMP)
    no7 = torch.tensor([[2]])
    row0_no7 = sampled_softmax_loss(q1[:, :1], m1[:, :1], t1[:, :1], table[t1[:, :1]], no7, table[no7], TEMP)
    assert row0 > row0_no7


def test_uniform_sampler_range_shape_determinism():
    ids = sample_uniform_negatives(3, 500, 10, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (3, 500) and ids.dtype == torch.int64
    assert ids.min() >= 2 and ids.max() <= 9  # never PAD / OOV
    assert set(ids.unique().tolist()) == set(range(2, 10))
    again = sample_uniform_negatives(3, 500, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)
    with pytest.raises(ValueError, match="no real items"):
        sample_uniform_negatives(1, 1, 2)


def test_in_batch_logq_matches_direct_computation(table):
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([2, 3, 2, 5, 8])  # item 2 appears twice
    query = torch.randn(5, E, generator=g)
    counts = torch.tensor([0, 0, 40, 10, 1, 5, 0, 0, 2, 0, 0, 0])
    log_q = log_q_from_counts(counts)
    cand_ids, cand_vecs = in_batch_candidates(ids, table[ids], max_candidates=100)
    loss = sampled_softmax_loss(
        query.unsqueeze(0), torch.ones(1, 5, dtype=torch.bool), ids.unsqueeze(0), table[ids].unsqueeze(0),
        cand_ids, cand_vecs, TEMP, log_q=log_q,
    )

    # direct: s(i, j) = cos(q_i, v_j) / T - log q(j); candidates are the other targets with a different id
    q = counts.to(torch.float64).clamp(min=1)
    q = q / q.sum()
    per_row = []
    for i in range(5):
        def s(j):
            cos = F.cosine_similarity(query[i].double(), table[ids[j]].double(), dim=0)
            return cos / TEMP - math.log(q[ids[j]])
        logits = [s(i)] + [s(j) for j in range(5) if ids[j] != ids[i]]
        per_row.append(torch.logsumexp(torch.stack(logits), 0) - logits[0])
    expected = torch.stack(per_row).mean()
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)

    # logQ matters for skewed counts, and a constant q (uniform counts) cancels out
    plain = sampled_softmax_loss(
        query.unsqueeze(0), torch.ones(1, 5, dtype=torch.bool), ids.unsqueeze(0), table[ids].unsqueeze(0),
        cand_ids, cand_vecs, TEMP,
    )
    assert not torch.allclose(plain, loss)
    flat = sampled_softmax_loss(
        query.unsqueeze(0), torch.ones(1, 5, dtype=torch.bool), ids.unsqueeze(0), table[ids].unsqueeze(0),
        cand_ids, cand_vecs, TEMP, log_q=log_q_from_counts(torch.full((V,), 7)),
    )
    torch.testing.assert_close(flat, plain)


def test_in_batch_candidates_subsample():
    ids = torch.arange(2, 102)
    vecs = torch.randn(100, E)
    cand_ids, cand_vecs = in_batch_candidates(ids, vecs, 16, generator=torch.Generator().manual_seed(0))
    assert cand_ids.shape == (1, 16) and cand_vecs.shape == (1, 16, E)
    assert len(set(cand_ids[0].tolist())) == 16  # without replacement
    torch.testing.assert_close(cand_vecs[0], vecs[cand_ids[0] - 2])


def test_log_q_from_counts():
    lq = log_q_from_counts(torch.tensor([0, 0, 3, 1]))
    # zero counts clamp to 1 → probabilities over the clamped counts [1, 1, 3, 1]
    torch.testing.assert_close(lq.exp(), torch.tensor([1, 1, 3, 1]) / 6.0)


def test_empty_mask_gives_zero_loss_with_graph(table):
    query = torch.randn(1, 2, E, requires_grad=True)
    neg = torch.tensor([[2, 3]])
    loss = sampled_softmax_loss(
        query, torch.zeros(1, 2, dtype=torch.bool), torch.tensor([[4, 5]]), table[[4, 5]].unsqueeze(0),
        neg, table[neg], TEMP,
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(query.grad, torch.zeros_like(query))


def test_temperature_scales_logits(table):
    query = torch.randn(1, 1, E)
    pos, neg = torch.tensor([[3]]), torch.tensor([[5]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    cos = lambda a, b: F.cosine_similarity(a, b, dim=0)  # noqa: E731
    for temp in (1.0, 0.05):
        loss = sampled_softmax_loss(query, mask, pos, table[pos], neg, table[neg], temp)
        d = (cos(query[0, 0], table[5]) - cos(query[0, 0], table[3])) / temp
        torch.testing.assert_close(loss, F.softplus(d))  # two-way softmax: log(1 + e^(s_neg - s_pos))


def test_full_softmax_matches_cross_entropy_and_skips_reserved(table):
    g = torch.Generator().manual_seed(4)
    query = torch.randn(5, E, generator=g)
    targets = torch.tensor([2, 3, 11, 7, 2])
    loss = full_softmax_loss(query, targets, table, TEMP)
    logits = F.normalize(query, dim=-1) @ F.normalize(table, dim=-1).T / TEMP
    torch.testing.assert_close(loss, F.cross_entropy(logits[:, 2:], targets - 2))
    # reserved rows are not classes: changing them changes nothing
    moved = table.clone()
    moved[:2] = query[:2] * 100
    torch.testing.assert_close(full_softmax_loss(query, targets, moved, TEMP), loss)
    assert full_softmax_loss(query[:0], targets[:0], table, TEMP).item() == 0.0


# ----------------------------------------------------------------------------- HR / NDCG


def _ranking_table(order):
    """Item table where a query e0 scores items in the given order (first = best)."""
    n = 8
    vecs = torch.zeros(n, 2)
    vecs[:, 1] = 1.0  # baseline: orthogonal to the query
    for rank, item in enumerate(order):
        angle = (rank + 1) * 0.1  # smaller angle = higher cosine
        vecs[item] = torch.tensor([math.cos(angle), math.sin(angle)])
    return vecs


def test_hr_ndcg_constructed_ranks():
    query = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    table = _ranking_table([5, 3, 6, 2])
    hr, ndcg = hr_ndcg_at_k(query, table, torch.tensor([5, 6]), k=10)
    assert hr.tolist() == [1.0, 1.0]
    assert ndcg.tolist() == pytest.approx([1.0, 0.5])  # rank 1 → 1, rank 3 → 1/log2(4)
    hr2, ndcg2 = hr_ndcg_at_k(query, table, torch.tensor([5, 6]), k=2)
    assert hr2.tolist() == [1.0, 0.0] and ndcg2.tolist() == pytest.approx([1.0, 0.0])
    # chunked scoring gives the same ranks
    hr3, ndcg3 = hr_ndcg_at_k(query, table, torch.tensor([5, 6]), k=10, chunk_size=3)
    assert torch.equal(hr3, hr) and torch.equal(ndcg3, ndcg)


def test_hr_ndcg_excludes_reserved_ids_and_counts_ties_against_target():
    query = torch.tensor([[1.0, 0.0]])
    table = _ranking_table([4, 2])
    table[0] = torch.tensor([1.0, 0.0])  # PAD and OOV would beat everything
    table[1] = torch.tensor([1.0, 0.0])
    hr, ndcg = hr_ndcg_at_k(query, table, torch.tensor([4]), k=1)
    assert hr.item() == 1.0 and ndcg.item() == 1.0
    hr, _ = hr_ndcg_at_k(query, table, torch.tensor([4]), k=1, exclude=())
    assert hr.item() == 0.0
    # a degenerate model (all items identical) must not score hits
    same = torch.ones(8, 2)
    hr, ndcg = hr_ndcg_at_k(query, same, torch.tensor([4]), k=5)
    assert hr.item() == 0.0 and ndcg.item() == 0.0


def test_objective_config_validation():
    with pytest.raises(ValueError, match="negatives"):
        ObjectiveConfig(negatives="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        ObjectiveConfig(temperature=0.0)
    cfg = ObjectiveConfig(negatives="in_batch", num_negatives=64)
    assert ObjectiveConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="ObjectiveConfig: unknown key 'temprature'"):
        ObjectiveConfig.from_dict({"temprature": 0.1})
