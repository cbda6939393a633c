"""Multimodal features: SimTier, MNSE, MK-MMD against direct computations; item-vector files and alignment;
every ranker trains with every feature on real ML-100K (protocol B) with title vectors."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from torchrec import KeyedJaggedTensor

from hybrid.core import CTRBatch
from hybrid.core.errors import HybridInputError
from hybrid.ctr_models import build_ranker
from hybrid.ctr_models.features import (
    CTRFeatures,
    FeatureConfig,
    FeatureSpec,
)
from hybrid.ctr_models.multimodal import (
    MNSE,
    MultimodalConfig,
    MultimodalFeatures,
    candidate_history_cosine,
    mk_mmd,
    num_digits,
    numeral_digits,
    quantize_similarity,
    quantize_time_gap,
    similarity_tiers,
    simtier_counts,
)
from hybrid.data.batching import CTRBatchConverter, make_loader
from hybrid.data.item_vectors import (
    ItemVectorsConfig,
    align_item_vectors,
    load_item_vectors,
    read_vector_file,
    text_item_vectors,
)
from hybrid.data.text_encoder import TextEncoder

# --------------------------------------------------------------------------------------------- helpers


def _batch(cands: list[int], histories: list[list[int]], hist_ts: list[list[int]] | None = None,
           ts: list[int] | None = None) -> CTRBatch:
    """A CTRBatch with ``item_id`` and a jagged ``hist_item_id`` (some histories empty)."""
    lengths = [1] * len(cands) + [len(h) for h in histories]
    values = cands + [i for h in histories for i in h]
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["item_id", "hist_item_id"], values=torch.tensor(values),
                                              lengths=torch.tensor(lengths))
    B = len(cands)
    hts = torch.tensor([t for h in (hist_ts or [[0] * len(h) for h in histories]) for t in h], dtype=torch.int64)
    return CTRBatch(kjt, torch.zeros(B, 0), torch.zeros(B, 1), torch.tensor(ts or [0] * B), hts,
                    torch.arange(B))


def _numpy_counts(vectors: np.ndarray, cands, histories, max_len: int, num_tiers: int) -> np.ndarray:
    """Direct SimTier histogram: the most recent ``max_len`` events, items with a vector only."""
    out = np.zeros((len(cands), num_tiers))
    for b, (c, hist) in enumerate(zip(cands, histories)):
        v = vectors[c]
        if not v.any():
            continue
        for h in hist[-max_len:]:
            u = vectors[h]
            if not u.any():
                continue
            cos = float(v @ u / np.linalg.norm(v) / np.linalg.norm(u))
            out[b, min(max(int(np.floor((cos + 1) / 2 * num_tiers)), 0), num_tiers - 1)] += 1
    return out


def _numpy_mk_mmd(x: np.ndarray, y: np.ndarray, alphas) -> float:
    """MK-MMD² written out pair by pair (no Gram-matrix tricks)."""
    z = np.concatenate([x, y]).astype(np.float64)
    N = len(z)
    d2 = np.array([[np.sum((z[i] - z[j]) ** 2) for j in range(N)] for i in range(N)])
    base = d2.mean()
    k = sum(np.exp(-d2 / (2 * a * base)) for a in alphas)
    n, m = len(x), len(y)
    xx = sum(k[i, j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k[n + i, n + j] for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k[i, n + j] for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


# --------------------------------------------------------------------------------------------- SimTier


def test_simtier_counts_match_numpy_with_padding_truncation_and_missing_vectors():
    rng = np.random.default_rng(0)
    V, d, N, T = 30, 6, 10, 5
    vectors = rng.normal(size=(V, d)).astype(np.float32)
    vectors[[0, 1, 7, 11]] = 0.0                      # PAD, OOV and two items without a vector
    cands = [3, 7, 9, 4, 12, 5]
    histories = [[4, 5, 6], [3, 4], [], [11, 11, 2, 8, 9, 10, 13, 14], [1, 3, 11], [5]]
    # (row 1: candidate without a vector; row 2: empty history; row 3: longer than T, truncated to the
    #  most recent T; rows 3/4: history items without a vector, OOV among them)
    spec = FeatureSpec.from_vocab_sizes({"item_id": V}, FeatureConfig(embedding_dim=N, max_len=T))
    cfg = MultimodalConfig(simtier=True, num_tiers=N, tier_norm="log1p")
    mm = MultimodalFeatures(cfg, torch.from_numpy(vectors), spec)
    with torch.no_grad():
        mm.simtier.tier_embedding.copy_(torch.eye(N))   # the output is then log1p(counts) itself
    batch = _batch(cands, histories)
    out = mm(CTRFeatures(spec)(batch))
    expected = _numpy_counts(vectors, cands, histories, T, N)
    np.testing.assert_allclose(torch.expm1(out).detach().numpy(), expected, atol=1e-4)
    # padding / missing vectors are never counted: row sums = real events with a vector (in the window)
    assert expected.sum(1).tolist() == [3, 0, 0, 5, 1, 1]   # row 3: 8 events, window of 5
    assert out.shape == (len(cands), N) and mm.output_dim == N


def test_cosine_table_and_vector_gather_agree_and_the_table_follows_the_buffer():
    rng = np.random.default_rng(1)
    vectors = torch.from_numpy(rng.normal(size=(40, 7)).astype(np.float32))
    vectors[[0, 1, 5]] = 0.0
    spec = FeatureSpec.from_vocab_sizes({"item_id": 40}, FeatureConfig(embedding_dim=4, max_len=6))
    mm = MultimodalFeatures(MultimodalConfig(simtier=True), vectors, spec)
    cand = torch.tensor([2, 5, 7])
    hist = torch.tensor([[3, 4, 5, 0, 0, 0], [2, 3, 0, 0, 0, 0], [1, 8, 9, 10, 11, 12]])
    mask = hist != 0
    cos, valid = mm.cosines(cand, hist, mask)                       # table path (40 rows)
    ref_cos, ref_valid = candidate_history_cosine(vectors[cand], vectors[hist], mask)
    assert torch.equal(valid, ref_valid)
    torch.testing.assert_close(cos, ref_cos)
    with torch.no_grad():
        mm.item_vectors.mul_(-1.0)                                  # in place, as a checkpoint load does
    torch.testing.assert_close(mm.cosines(cand, hist, mask)[0], ref_cos)   # cosines of -v, -u are the same
    with torch.no_grad():
        mm.item_vectors[7] = -mm.item_vectors[7]
    torch.testing.assert_close(mm.cosines(cand, hist, mask)[0][2], -ref_cos[2])


def test_simtier_functions_directly():
    # cos = -1 → tier 0, 1 (and float error above it) → the top tier, nothing dropped
    assert similarity_tiers(torch.tensor([-1.0, -1.0001, -0.05, 0.0, 0.95, 1.0, 1.0 + 1e-6]), 20).tolist() == \
        [0, 0, 9, 10, 19, 19, 19]
    cand = torch.tensor([[1.0, 0.0]])
    hist = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0], [0.0, 5.0]]])
    mask = torch.tensor([[True, True, True, False]])   # last position is padding (with a "vector")
    cos, valid = candidate_history_cosine(cand, hist, mask)
    assert valid.tolist() == [[True, False, True, False]]
    assert simtier_counts(cos, valid, 4).tolist() == [[1.0, 0.0, 0.0, 1.0]]


def test_simtier_fraction_norm_is_independent_of_history_length():
    vectors = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 0.1], [-1.0, 0.2]])
    spec = FeatureSpec.from_vocab_sizes({"item_id": 5}, FeatureConfig(embedding_dim=4, max_len=10))
    mm = MultimodalFeatures(MultimodalConfig(simtier=True, num_tiers=4, tier_norm="fraction"), vectors, spec)
    with torch.no_grad():
        mm.simtier.tier_embedding.copy_(torch.eye(4))
    batch = _batch([2, 2], [[3, 4], [3, 4, 3, 4, 3, 4]])
    out = mm(CTRFeatures(spec)(batch))
    torch.testing.assert_close(out[0], out[1])
    torch.testing.assert_close(out[0], torch.tensor([0.5, 0.0, 0.0, 0.5]))


# --------------------------------------------------------------------------------------------- MNSE


def test_mnse_digits_of_known_values():
    assert numeral_digits(torch.tensor(51), 2, 6).tolist()[::-1] == [1, 1, 0, 0, 1, 1]        # 110011
    assert numeral_digits(torch.tensor(51), 3, 4).tolist()[::-1] == [1, 2, 2, 0]              # 1220
    assert numeral_digits(torch.tensor(51), 10, 3).tolist()[::-1] == [0, 5, 1]
    assert (num_digits(51, 2), num_digits(51, 3), num_digits(1, 2), num_digits(1023, 10)) == (6, 4, 1, 4)
    mnse = MNSE(max_value=63, bases=(2, 3), dim=4)
    assert mnse.positions == (6, 4)
    # position-tagged tokens: pos * base + digit
    assert mnse.tokens(torch.tensor(51), 2).tolist() == [1, 3, 4, 6, 9, 11]
    assert mnse.tokens(torch.tensor(51), 3).tolist() == [0, 5, 8, 10]
    # clipping: above max_value → max_value, negative → 0
    torch.testing.assert_close(mnse(torch.tensor([500, -3])), mnse(torch.tensor([63, 0])))


def test_mnse_is_sum_within_base_and_concat_across_bases_and_gradients_reach_the_tables():
    mnse = MNSE(max_value=100, bases=(2, 3, 10), dim=5)
    x = torch.tensor([51, 50])
    out = mnse(x)
    assert out.shape == (2, 15)
    expected = torch.cat([mnse.tables[f"base{b}"].weight[mnse.tokens(x, b)].sum(1) for b in (2, 3, 10)], 1)
    torch.testing.assert_close(out, expected)
    out[0].sum().backward()                          # only 51's tokens get a gradient
    for b in (2, 3, 10):
        grad = mnse.tables[f"base{b}"].weight.grad
        used = set(mnse.tokens(torch.tensor(51), b).tolist())
        nonzero = set(torch.nonzero(grad.abs().sum(1)).squeeze(1).tolist())
        assert nonzero == used, (b, nonzero, used)
    # nearby values share tokens: 51 and 50 differ in one binary digit, 51 and 600 share less
    shared = [len(set(mnse.tokens(torch.tensor(51), 2).tolist()) & set(mnse.tokens(torch.tensor(v), 2).tolist()))
              for v in (50, 100)]
    assert shared[0] > shared[1]


def test_quantisers():
    assert quantize_similarity(torch.tensor([-1.0, 0.0, 1.0, 1.5]), 1024).tolist() == [0, 512, 1023, 1023]
    assert quantize_time_gap(torch.tensor([-5, 0, 1, 3600, 10**15])).tolist() == [0, 0, 4, 47, 160]


def test_mnse_inputs_and_missing_embedding():
    vectors = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    spec = FeatureSpec.from_vocab_sizes({"item_id": 5}, FeatureConfig(embedding_dim=4, max_len=4))
    cfg = MultimodalConfig(mnse=True, mnse_inputs=("max_similarity", "history_length", "time_gap"),
                           mnse_bases=(2, 3), mnse_dim=3, similarity_levels=5)
    mm = MultimodalFeatures(cfg, vectors, spec)
    batch = _batch([2, 2, 2], [[3, 4], [], [1]], hist_ts=[[10, 20], [], [50]], ts=[30, 40, 50])
    out = mm(CTRFeatures(spec)(batch))
    assert out.shape == (3, 3 * 6) and mm.output_dim == 18
    ms, hl, tg = out[:, :6], out[:, 6:12], out[:, 12:]
    # row 0: max cos = cos(45°) → round((0.707+1)/2·4) = 3; 2 events; gap 10 s → round(4·log2 11) = 14
    torch.testing.assert_close(ms[0], mm.mnse["max_similarity"](torch.tensor(3)))
    torch.testing.assert_close(hl[0], mm.mnse["history_length"](torch.tensor(2)))
    torch.testing.assert_close(tg[0], mm.mnse["time_gap"](torch.tensor(14)))
    # row 1: empty history → similarity and gap undefined (missing vectors); length 0 is a value
    torch.testing.assert_close(ms[1], mm.mnse_missing[0])
    torch.testing.assert_close(tg[1], mm.mnse_missing[2])
    torch.testing.assert_close(hl[1], mm.mnse["history_length"](torch.tensor(0)))
    # row 2: the only history item is OOV (no vector): no similarity, but a gap (0 s)
    torch.testing.assert_close(ms[2], mm.mnse_missing[0])
    torch.testing.assert_close(tg[2], mm.mnse["time_gap"](torch.tensor(0)))


# --------------------------------------------------------------------------------------------- MK-MMD


def test_mk_mmd_matches_numpy_and_separates_distributions():
    g = torch.Generator().manual_seed(0)
    alphas = (0.125, 0.25, 0.5, 1.0, 2.0)
    x, y = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randn(30, 5, generator=g, dtype=torch.float64)
    assert float(mk_mmd(x, y, alphas)) == pytest.approx(_numpy_mk_mmd(x.numpy(), y.numpy(), alphas), abs=1e-10)
    shifted = y + 1.5
    assert float(mk_mmd(x, shifted, alphas)) == pytest.approx(_numpy_mk_mmd(x.numpy(), shifted.numpy(), alphas),
                                                              abs=1e-10)
    a, b = torch.randn(500, 16, generator=g), torch.randn(500, 16, generator=g)
    same = float(mk_mmd(a, b))
    assert abs(same) < 0.01, same
    assert float(mk_mmd(a, b + 0.5)) > 20 * max(abs(same), 1e-3)
    assert float(mk_mmd(a, b * 3.0)) > 0.1                         # another scale, same mean
    assert float(mk_mmd(a[:1], b)) == 0.0                          # fewer than 2 points


def test_mk_mmd_gradients_are_finite_with_duplicate_points_and_memory_is_quadratic():
    x = torch.randn(64, 8, requires_grad=True)
    y = torch.cat([x.detach()[:10], torch.randn(54, 8)]).requires_grad_(True)   # duplicates: zero distances
    mk_mmd(torch.cat([x, x[:3]]), y).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all() and x.grad.abs().sum() > 0
    # 2·3000 points of 256 dims: the [n, n, d] difference tensor would be 37 GB; the Gram form needs ~150 MB
    a, b = torch.randn(3000, 256), torch.randn(3000, 256) + 0.2
    assert float(mk_mmd(a, b)) > 0


# --------------------------------------------------------------------------------------------- item vectors


def _fm(tokens):
    from hybrid.core.feature_map import FeatureMap

    return FeatureMap.fit({"item_id": pd.Series(tokens)})


def test_vector_files_parquet_and_npy_align_by_raw_id(tmp_path):
    fm = _fm(["10", "20", "20", "30", "30", "30"])           # ids: 30 → 2, 20 → 3, 10 → 4
    table = pd.DataFrame({"movie": [20, 10, 99], "vec": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]})
    table.to_parquet(tmp_path / "v.parquet")
    ids, vecs = read_vector_file(tmp_path / "v.parquet", id_column="movie")
    assert ids.tolist() == ["20", "10", "99"] and vecs.shape == (3, 2)
    iv = align_item_vectors(ids, vecs, fm)
    assert iv.vectors.tolist() == [[0, 0], [0, 0], [0, 0], [1, 2], [3, 4]]   # 30 has none, 99 is unknown
    assert iv.has_vector.tolist() == [False, False, False, True, True] and iv.coverage == pytest.approx(2 / 3)
    # one numeric column per dimension
    pd.DataFrame({"item_id": ["30", "10"], "a": [1.0, 2.0], "b": [0.5, 0.0]}).to_parquet(tmp_path / "w.parquet")
    iv = load_item_vectors(ItemVectorsConfig(source="file", path=str(tmp_path / "w.parquet")), fm)
    assert iv.vectors[2].tolist() == [1.0, 0.5] and iv.vectors[4].tolist() == [2.0, 0.0]
    # .npy + ids file (text, one per line)
    np.save(tmp_path / "m.npy", np.eye(3, dtype=np.float32))
    (tmp_path / "ids.txt").write_text("30\n20\n10\n")
    iv = load_item_vectors(ItemVectorsConfig(source="file", path=str(tmp_path / "m.npy"),
                                             ids_path=str(tmp_path / "ids.txt")), fm)
    assert iv.vectors[2:].tolist() == np.eye(3).tolist() and iv.coverage == 1.0


def test_missing_policy_mean_fills_oov_and_missing_rows_but_not_pad():
    fm = _fm(["a", "b", "b", "c", "c", "c"])                 # c → 2, b → 3, a → 4
    iv = align_item_vectors(["c", "b"], np.array([[1.0, 0.0], [0.0, 3.0]]), fm, missing="mean")
    assert iv.vectors.tolist() == [[0, 0], [0.5, 1.5], [1, 0], [0, 3], [0.5, 1.5]]
    assert iv.has_vector.tolist() == [False, True, True, True, True]
    assert iv.coverage == pytest.approx(2 / 3)               # coverage counts the source's vectors only


@pytest.mark.parametrize("frame,kwargs,message", [
    (pd.DataFrame({"item_id": ["1", "1"], "v": [[1.0], [2.0]]}), {}, "appears twice"),
    (pd.DataFrame({"item_id": ["1", "2"], "v": [[1.0], [2.0, 3.0]]}), {}, "same length"),
    (pd.DataFrame({"item_id": ["1", "2"], "v": [[1.0], [float("nan")]]}), {}, "row 1: vector has NaN"),
    (pd.DataFrame({"id": ["1"], "v": [[1.0]]}), {}, "no item-id column 'item_id'"),
    (pd.DataFrame({"item_id": ["1"], "v": [[1.0]]}), {"vector_columns": ["emb"]}, "no vector column 'emb'"),
    (pd.DataFrame({"item_id": ["1"], "v": ["x"]}), {}, "column 'v'"),
])
def test_vector_file_errors_name_the_problem(tmp_path, frame, kwargs, message):
    frame.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(HybridInputError, match=message):
        read_vector_file(tmp_path / "bad.parquet", **kwargs)


def test_item_vectors_config_errors():
    with pytest.raises(ValueError, match="item_vectors.source"):
        ItemVectorsConfig(source="image")
    with pytest.raises(ValueError, match="item_vectors.path"):
        ItemVectorsConfig(source="file")
    with pytest.raises(ValueError, match="item_vectors.missing"):
        ItemVectorsConfig(source="text", missing="drop")


# --------------------------------------------------------------------------------------------- rankers

MULTIMODAL = {
    "simtier": {"simtier": True, "num_tiers": 20},
    "mnse": {"mnse": True, "mnse_inputs": ["max_similarity", "mean_similarity", "history_length", "time_gap"]},
    "mkmmd": {"mkmmd_weight": 0.2, "item_field": True},
}
RANKERS = {
    "dcn_v2": {"cross_type": "low_rank", "num_cross_layers": 2, "deep_hidden": [32, 16]},
    "mmoe": {"num_experts": 2, "expert_hidden": [32], "tower_hidden": [8]},
    "multi_embedding_moe": {"num_experts": 2, "expert_hidden": [16], "tower_hidden": [8]},
    "tin": {"mlp_hidden": [32, 16]},
}


@pytest.fixture(scope="session")
def title_vectors(ml100k, prepared_ratings, tmp_path_factory):
    """Title + genres vectors of ML-100K items, aligned to protocol B's feature map (real encoder)."""
    encoder = TextEncoder(cache_dir=tmp_path_factory.mktemp("text_cache"))
    return text_item_vectors(ml100k.items, prepared_ratings.feature_map, encoder=encoder)


@pytest.fixture(scope="session")
def ratings_batches(prepared_ratings):
    from hybrid.jobs.finetune import ctr_vocab_sizes

    conv = CTRBatchConverter(prepared_ratings, "ctr_train", max_history=20, task_names=("click",))
    loader = make_loader(conv, batch_size=256, shuffle=True, seed=0)
    it = iter(loader)
    return [next(it) for _ in range(4)], ctr_vocab_sizes(prepared_ratings.feature_map)


@pytest.mark.parametrize("feature", list(MULTIMODAL))
@pytest.mark.parametrize("ranker", list(RANKERS))
def test_each_ranker_trains_with_each_feature_on_ml100k(ranker, feature, title_vectors, ratings_batches):
    batches, vocab_sizes = ratings_batches
    torch.manual_seed(0)
    config = {**RANKERS[ranker], "features": {"embedding_dim": 16, "max_len": 20},
              "multimodal": MULTIMODAL[feature]}
    model = build_ranker(ranker, config, vocab_sizes, ("click",), item_vectors=title_vectors.vectors)
    # one module per ranker (FlatInput's for DCN-v2 / MMoE), its vectors a buffer: saved, not trained
    assert sum(k.endswith("multimodal.item_vectors") for k in model.state_dict()) == 1
    assert model.multimodal_features is not None
    assert all("item_vectors" not in n for n, _ in model.named_parameters())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for step in range(8):
        batch = batches[step % len(batches)]
        logits = model(batch)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        aux = model.auxiliary_losses()
        loss = bce + sum(aux.values(), torch.zeros(()))
        opt.zero_grad()
        loss.backward()
        if step == 0:
            mm = model.multimodal_features
            grads = {"simtier": mm.simtier.tier_embedding.grad if mm.simtier is not None else None,
                     "mnse": mm.mnse["max_similarity"].tables["base2"].weight.grad if len(mm.mnse) else None,
                     "mkmmd": mm.projection.layers[0].weight.grad if mm.projection is not None else None}
            assert grads[feature] is not None and grads[feature].abs().sum() > 0, feature
        opt.step()
        losses.append(float(bce.detach()))
        assert np.isfinite(losses[-1])
    metrics = model.logging_metrics()
    assert metrics["mm/candidate_coverage"] > 0.9 if feature != "mkmmd" else True
    if feature == "mkmmd":
        assert set(aux) >= {"mkmmd"} and float(aux["mkmmd"].detach()) > 0 and "mm/mkmmd" in metrics
    else:
        assert "mkmmd" not in aux and metrics["mm/history_coverage"] > 0.9
    assert np.mean(losses[-4:]) < np.mean(losses[:4])                     # it learns something
    model.eval()
    with torch.no_grad():
        model(batches[0])
    assert "mkmmd" not in model.auxiliary_losses()                         # no aux loss in eval mode


def test_multimodal_config_and_construction_errors(title_vectors):
    vocab = {"item_id": title_vectors.vectors.shape[0], "category": 20}
    with pytest.raises(ValueError, match="item_vectors: a ranker with multimodal features needs"):
        build_ranker("tin", {"multimodal": {"simtier": True}}, vocab, ("click",))
    with pytest.raises(ValueError, match="no multimodal feature is switched on"):
        build_ranker("dcn_v2", None, vocab, ("click",), item_vectors=title_vectors.vectors)
    with pytest.raises(ValueError, match="expected shape"):
        build_ranker("dcn_v2", {"multimodal": {"simtier": True}}, vocab, ("click",),
                     item_vectors=title_vectors.vectors[:-1])
    with pytest.raises(ValueError, match="GPSDRankerConfig.multimodal: the GPSD ranker has no multimodal features"):
        build_ranker("gpsd", None, vocab, ("click",), item_vectors=title_vectors.vectors)
    with pytest.raises(ValueError, match="MultimodalConfig.mnse_inputs"):
        build_ranker("tin", {"multimodal": {"mnse": True, "mnse_inputs": ["similarity"]}}, vocab, ("click",))
    with pytest.raises(ValueError, match="MultimodalConfig.mnse_bases"):
        MultimodalConfig(mnse=True, mnse_bases=(1, 2))
    with pytest.raises(ValueError, match="TINConfig: unknown key 'multimodal.simtiers'"):
        build_ranker("tin", {"multimodal": {"simtiers": True}}, vocab, ("click",))
    with pytest.raises(ValueError, match="history field 'item_id'"):
        build_ranker("dcn_v2", {"features": {"history_fields": []}, "multimodal": {"simtier": True}}, vocab,
                     ("click",), item_vectors=title_vectors.vectors)
    assert dataclasses.replace(MultimodalConfig.tiny()).enabled and not MultimodalConfig().enabled


def test_finetune_job_passes_file_vectors_to_the_ranker_and_reloads_them(title_vectors, prepared_ratings,
                                                                         prepared_ratings_dir, tmp_path):
    """``hybrid finetune`` with ``item_vectors.source: file``: vectors keyed by raw id reach TIN, MK-MMD is
    logged to MLflow, and the checkpoint restores the vector buffer."""
    from mlflow import MlflowClient

    from hybrid.config import load_config
    from hybrid.jobs.finetune import FinetuneConfig, load_finetuned, run_finetune

    fm = prepared_ratings.feature_map
    raw_ids = fm["item_id"].tokens
    pd.DataFrame({"movie_id": [int(t) for t in raw_ids],
                  "vector": list(title_vectors.vectors[2:].numpy())}).to_parquet(tmp_path / "titles.parquet")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(FinetuneConfig, overrides=[
        f"data={prepared_ratings_dir}", f"out={tmp_path / 'o'}", "ranker.name=tin",
        "ranker.config.mlp_hidden=[16]", "ranker.config.features.embedding_dim=8",
        "ranker.config.multimodal.simtier=true", "ranker.config.multimodal.mkmmd_weight=0.1",
        "item_vectors.source=file", f"item_vectors.path={tmp_path / 'titles.parquet'}",
        "item_vectors.id_column=movie_id", "train.max_steps=6", "train.batch_size=256", "train.log_every=2",
        "train.max_history=10", "train.epochs=1", "train.progress=false", "train.eval_batch_size=8192",
        f"tracking.tracking_uri={store}", "tracking.experiment=mm"])
    result = run_finetune(cfg)
    model, manifest = load_finetuned(result["last_checkpoint"])
    assert manifest["item_vectors_shape"] == list(title_vectors.vectors.shape)
    torch.testing.assert_close(model.multimodal_features.item_vectors, title_vectors.vectors)
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("mm").experiment_id])
    metric_names = set(run.data.metrics)
    assert any(m.endswith("mm/mkmmd") for m in metric_names), metric_names
    assert run.data.params["item_vectors.source"] == "file"
