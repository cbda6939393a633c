"""Layers of the CTR rankers: features/padding, history encoders, DCN-v2 cross layers, TIN, MoE gates and
correlation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ctr_synthetic import SYNTHETIC_VOCAB_SIZES, make_synthetic_batch
from torchrec import KeyedJaggedTensor

from hybrid.core import CTRBatch
from hybrid.core.jagged import jagged_to_padded
from hybrid.ctr_models.dcn_v2 import build_cross_net
from hybrid.ctr_models.features import (
    CTRFeatures,
    FeatureConfig,
    FeatureSpec,
    table_name,
)
from hybrid.ctr_models.history import (
    PooledHistory,
    TargetAttentionHistory,
    TransformerHistory,
    gather_last,
)
from hybrid.ctr_models.layers import masked_softmax
from hybrid.ctr_models.moe import TaskGates, cross_expert_correlation
from hybrid.ctr_models.tin import (
    TargetAwareTemporalEncoding,
    relative_positions,
    target_aware_attention,
    time_gap_buckets,
)

# --------------------------------------------------------------------------- features


def _spec(**kw):
    return FeatureSpec.from_vocab_sizes(SYNTHETIC_VOCAB_SIZES, FeatureConfig(embedding_dim=4, max_len=5, **kw))


def test_feature_spec_defaults_and_shared_tables():
    spec = _spec()
    assert spec.single_fields == ("user_id", "gender", "age", "occupation", "item_id", "category", "year")
    assert spec.multi_fields == ("genres",)
    assert spec.history_fields == ("item_id", "category", "action")
    assert spec.target_fields == ("item_id", "category")
    assert table_name("hist_item_id") == "t_item_id"
    features = CTRFeatures(spec)
    names = [n for n, _ in features.named_parameters()]
    # one table per base feature: item_id and hist_item_id share t_item_id; action only as history
    assert "ec.embeddings.t_item_id.weight" in names and "ec.embeddings.t_action.weight" in names
    assert "ebc.embedding_bags.t_genres.weight" in names
    assert sum("t_item_id" in n for n in names) == 1
    tables = {c.name: c.feature_names for c in features.ec.embedding_configs()}
    assert tables["t_item_id"] == ["item_id", "hist_item_id"]


def test_ctr_features_shapes_and_candidate_history_share_embedding():
    spec = _spec()
    features = CTRFeatures(spec)
    batch = make_synthetic_batch(16, torch.Generator().manual_seed(3), max_hist=9)
    x = features(batch)
    assert x.fields.shape == (16, spec.num_fields, 4)
    assert x.history.shape == (16, 5, 4) and x.mask.shape == (16, 5) and x.target.shape == (16, 4)
    assert x.history_timestamps.shape == (16, 5)
    # The candidate's item embedding equals the history's for the same id (same table).
    item_table = features.ec.embeddings["t_item_id"].weight
    hist = batch.sparse["hist_item_id"]
    hist_ids = jagged_to_padded(hist.values(), hist.lengths(), 5, keep="recent")
    b = int(torch.nonzero(x.mask[:, 0])[0])
    torch.testing.assert_close(x.history_by_field["item_id"][b, 0], item_table[hist_ids[b, 0]])
    # history timestamps are before the candidate, chronological
    ts = x.history_timestamps[b, : int(x.lengths[b])]
    assert bool((ts[1:] >= ts[:-1]).all()) and bool((ts < batch.timestamps[b]).all())


def test_ctr_features_errors_name_the_problem():
    features = CTRFeatures(_spec())
    batch = make_synthetic_batch(4, torch.Generator().manual_seed(0))
    kjt = batch.sparse
    keys = [k for k in kjt.keys() if k != "year"]
    dropped = KeyedJaggedTensor.from_jt_dict({k: kjt[k] for k in keys})
    with pytest.raises(ValueError, match="missing KJT keys \\['year'\\]"):
        features(CTRBatch(dropped, batch.dense, batch.labels, batch.timestamps, batch.hist_timestamps,
                          batch.user_index))
    with pytest.raises(ValueError, match="num_dense"):
        features(CTRBatch(kjt, torch.zeros(4, 3), batch.labels, batch.timestamps, batch.hist_timestamps,
                          batch.user_index))
    with pytest.raises(ValueError, match="single_fields"):
        FeatureSpec.from_vocab_sizes({"item_id": 10}, FeatureConfig(single_fields=("item_id", "nope")))
    with pytest.raises(ValueError, match="vocab_sizes\\['item_id'\\]"):
        FeatureSpec.from_vocab_sizes({"item_id": 2}, FeatureConfig())


# --------------------------------------------------------------------------- history encoders


def _history_case(seed=0, B=3, T=6, D=4):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randn(B, T, D, generator=g)
    lengths = torch.tensor([4, 0, 6])[:B]
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    hist = hist * mask.unsqueeze(-1)
    target = torch.randn(B, D, generator=g)
    return hist, mask, target


@pytest.mark.parametrize("weights", ["none", "softmax", "sigmoid"])
def test_target_attention_ignores_padding(weights):
    torch.manual_seed(0)
    att = TargetAttentionHistory(4, hidden=(8,), weights=weights)
    hist, mask, target = _history_case()
    out = att(hist, mask, target)
    garbage = hist + 100.0 * torch.randn_like(hist) * (~mask).unsqueeze(-1)   # only padded slots change
    torch.testing.assert_close(att(garbage, mask, target), out)
    assert torch.all(out[1] == 0)                                             # empty history: zeros, no NaN
    assert torch.all(att.last_weights[~mask] == 0)


def test_target_attention_matches_din_formula():
    torch.manual_seed(0)
    att = TargetAttentionHistory(4, hidden=(8,), weights="none")
    hist, mask, target = _history_case()
    b, i = 0, 2
    h, t = hist[b, i], target[b]
    score = att.score(torch.cat([h, t, h - t, h * t]))
    torch.testing.assert_close(att.attention_weights(hist, mask, target)[b, i], score.squeeze())


def test_pooled_history_is_masked_mean():
    hist, mask, _ = _history_case()
    out = PooledHistory(4)(hist, mask)
    torch.testing.assert_close(out[0], hist[0, :4].mean(0))
    assert torch.all(out[1] == 0)


def test_masked_softmax_all_masked_row_is_zero_not_nan():
    out = masked_softmax(torch.randn(2, 3), torch.tensor([[True, False, True], [False, False, False]]))
    assert not torch.isnan(out).any() and out[1].sum() == 0 and out[0, 1] == 0
    torch.testing.assert_close(out[0].sum(), torch.tensor(1.0))


def test_transformer_history_reads_last_real_event_and_ignores_padding():
    from hybrid.core.backbones import BackboneConfig, build_backbone

    torch.manual_seed(0)
    enc = TransformerHistory(build_backbone(BackboneConfig.tiny()), dim=8)   # 8 → 16 projection
    assert enc.input_proj is not None and enc.output_dim == 16
    hist, mask, _ = _history_case(D=8)
    out = enc(hist, mask)
    assert out.shape == (3, 16) and torch.all(out[1] == 0)
    garbage = hist + 50.0 * torch.randn_like(hist) * (~mask).unsqueeze(-1)
    torch.testing.assert_close(enc(garbage, mask), out)
    states = enc.backbone(enc.input_proj(hist), mask.sum(1))
    torch.testing.assert_close(out[0], states[0, 3])
    torch.testing.assert_close(gather_last(states, torch.tensor([4, 0, 6])), out)


# --------------------------------------------------------------------------- DCN-v2 cross layers


def test_full_rank_cross_layer_closed_form():
    torch.manual_seed(0)
    net = build_cross_net("full", 3, num_layers=1, low_rank=None, num_experts=1)
    W = torch.tensor([[0.5, -1.0, 0.0], [2.0, 0.0, 1.0], [0.0, 0.25, -0.5]])
    b = torch.tensor([0.1, -0.2, 0.3])
    with torch.no_grad():
        net.kernels[0].copy_(W)
        net.bias[0].copy_(b.view(3, 1))
    x = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]])
    expected = x * (x @ W.T + b) + x                  # x0 ⊙ (W x + b) + x with x_l = x0
    torch.testing.assert_close(net(x), expected)
    # by hand for the first sample: W x = [-1.5, 1.0, 1.0]; + b = [-1.4, 0.8, 1.3]
    torch.testing.assert_close(net(x)[0], torch.tensor([1 * -1.4 + 1, 2 * 0.8 + 2, -1 * 1.3 - 1]))


def test_two_cross_layers_and_low_rank_closed_form():
    torch.manual_seed(0)
    full = build_cross_net("full", 4, num_layers=2, low_rank=None, num_experts=1)
    x0 = torch.randn(5, 4)
    x1 = x0 * (x0 @ full.kernels[0].T + full.bias[0].view(-1)) + x0
    x2 = x0 * (x1 @ full.kernels[1].T + full.bias[1].view(-1)) + x1
    torch.testing.assert_close(full(x0), x2)

    low = build_cross_net("low_rank", 4, num_layers=1, low_rank=2, num_experts=1)
    with torch.no_grad():
        low.bias[0].uniform_()
    U, V, b = low.W_kernels[0], low.V_kernels[0], low.bias[0]
    torch.testing.assert_close(low(x0), x0 * ((x0 @ V.T) @ U.T + b) + x0)


def test_mixture_cross_net_shape_and_default_rank():
    net = build_cross_net("mixture", 16, num_layers=2, low_rank=None, num_experts=3)
    assert net.U_kernels[0].shape == (3, 16, 4)           # rank d // 4
    assert net(torch.randn(1, 16)).shape == (1, 16)        # batch of 1 keeps its batch dim
    with pytest.raises(ValueError, match="cross_type"):
        build_cross_net("diagonal", 16, 2, None, 1)


# --------------------------------------------------------------------------- TIN


def test_tin_attention_hand_computed():
    # Two samples, D = 2. Sample 0: 3 events, the last one padding (holds garbage); sample 1: empty.
    e = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]],
                      [[5.0, 5.0], [5.0, 5.0], [5.0, 5.0]]])
    v = torch.tensor([[2.0, 1.0], [1.0, 1.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    u, pooled, alpha = target_aware_attention(e, v, mask)
    # scores: e·v / sqrt(2) = [2, 2] / sqrt(2) -> equal weights 0.5, 0.5
    s0, s1 = 2 / math.sqrt(2), 2 / math.sqrt(2)
    a0 = math.exp(s0) / (math.exp(s0) + math.exp(s1))
    assert alpha[0].tolist() == pytest.approx([a0, 1 - a0, 0.0])
    # pooled = 0.5 [1, 0] + 0.5 [0, 2] = [0.5, 1.0];  u = Σ α (e ⊙ v) = 0.5 [2, 0] + 0.5 [0, 2] = [1, 1]
    assert pooled[0].tolist() == pytest.approx([0.5, 1.0])
    assert u[0].tolist() == pytest.approx([1.0, 1.0])
    assert u[1].tolist() == [0.0, 0.0] and alpha[1].tolist() == [0.0, 0.0, 0.0]

    # Unequal scores: events [1, 0] and [0, 1], target [3, 0] -> scores [3/√2, 0].
    e = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    v = torch.tensor([[3.0, 0.0]])
    u, pooled, alpha = target_aware_attention(e, v, torch.tensor([[True, True]]))
    a = 1 / (1 + math.exp(-3 / math.sqrt(2)))
    assert alpha[0].tolist() == pytest.approx([a, 1 - a])
    assert pooled[0].tolist() == pytest.approx([a, 1 - a])
    assert u[0].tolist() == pytest.approx([3 * a, 0.0])               # (Σ α e) ⊙ v


def test_tin_temporal_encoding_indices():
    assert relative_positions(torch.tensor([3, 0, 4]), 4).tolist() == [[3, 2, 1, 0], [0, 0, 0, 0], [4, 3, 2, 1]]
    gaps = torch.tensor([0, 1, 2, 3, 7, 8, 10**9, -5])
    assert time_gap_buckets(gaps, 8).tolist() == [1, 2, 2, 3, 4, 4, 8, 1]
    assert time_gap_buckets(torch.tensor([3600]), 32, unit_seconds=3600.0).tolist() == [2]

    tte = TargetAwareTemporalEncoding(2, max_len=3, mode="both", num_time_buckets=4)
    with torch.no_grad():
        tte.position.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))
        tte.time.weight.copy_(torch.tensor([[0.0, 0.5], [0.0, 1.0], [0.0, 2.0], [0.0, 3.0], [0.0, 4.0]]))
    hist = torch.zeros(1, 3, 2)
    target = torch.zeros(1, 2)
    hist_ts = torch.tensor([[100, 199, 0]])       # gaps 100 s (bucket 4 → clipped 4), 1 s (bucket 2)
    e, v = tte(hist, target, torch.tensor([2]), hist_ts, torch.tensor([200]))
    assert e[0, 0].tolist() == [2.0, 4.0]         # position 2 (two steps back), time bucket 4
    assert e[0, 1].tolist() == [1.0, 2.0]         # most recent: position 1, bucket 2
    assert v[0].tolist() == [0.0, 0.5]            # candidate: position row 0 + time row 0
    with pytest.raises(ValueError, match="temporal_encoding"):
        tte(hist, target, torch.tensor([2]), None, None)


# --------------------------------------------------------------------------- MoE gates and correlation


def test_cross_expert_correlation():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(512, 1, generator=g)
    b = torch.randn(512, 1, generator=g)
    loss, corr = cross_expert_correlation(torch.stack([a, a * 3 + 1]))
    assert float(corr) == pytest.approx(1.0, abs=1e-4) and float(loss) == pytest.approx(1.0, abs=1e-3)
    _, corr = cross_expert_correlation(torch.stack([a, -a]))
    assert float(corr) == pytest.approx(1.0, abs=1e-4)                # |ρ|
    # H = 1: equals the mean |Pearson| over pairs, as numpy computes it
    x = torch.stack([a, b, a + b]).squeeze(-1)
    rho = np.corrcoef(x.numpy())
    expected = np.mean([abs(rho[0, 1]), abs(rho[0, 2]), abs(rho[1, 2])])
    _, corr = cross_expert_correlation(x)
    assert float(corr) == pytest.approx(expected, abs=1e-4)
    # independent experts: small; one expert: zero
    _, corr = cross_expert_correlation(torch.randn(3, 4096, 8, generator=g))
    assert float(corr) < 0.03
    assert float(cross_expert_correlation(torch.randn(1, 16, 4))[1]) == 0.0


def test_task_gates_hand_computed_mixtures_and_parameter_names():
    gates = TaskGates(2, num_experts=2, num_tasks=2)
    # linear gates (hidden=()): the checkpoint names the rankers have always had, gates.<t>.1.{weight,bias}
    assert [n for n, _ in gates.named_parameters()] == ["0.1.weight", "0.1.bias", "1.1.weight", "1.1.bias"]
    with torch.no_grad():
        for p in gates.parameters():
            p.zero_()
        gates[1][1].bias.copy_(torch.tensor([math.log(3.0), 0.0]))     # task 1: softmax → (0.75, 0.25)
    experts = torch.stack([torch.full((4, 3), 1.0), torch.full((4, 3), 3.0)])  # [K=2, B=4, H=3]
    mixed, g = gates(torch.randn(4, 2), experts)
    assert g.shape == (4, 2, 2) and mixed.shape == (4, 2, 3)
    torch.testing.assert_close(g[:, 0], torch.full((4, 2), 0.5))
    torch.testing.assert_close(g[:, 1], torch.tensor([[0.75, 0.25]]).expand(4, 2))
    torch.testing.assert_close(mixed[:, 0], torch.full((4, 3), 2.0))     # 0.5·1 + 0.5·3
    torch.testing.assert_close(mixed[:, 1], torch.full((4, 3), 1.5))     # 0.75·1 + 0.25·3
