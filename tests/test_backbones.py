"""Backbones: config parsing, GPSD parameter counts, hand-checked LLaMA/HSTU layers, causality, padding
invariance (the jagged conversions: test_jagged.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hybrid.core.backbones import (
    BackboneConfig,
    HSTUBackbone,
    LlamaBackbone,
    RelativeBias,
    SwiGLU,
    apply_rope,
    build_backbone,
    rope_cos_sin,
    swiglu_hidden_dim,
    time_gap_buckets,
)

KINDS = ("llama", "hstu")


def _randomise(module: torch.nn.Module, seed: int = 0, std: float = 0.5) -> None:
    """Non-trivial weights everywhere (norm gains, biases, relative-bias tables) so every term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            # norm gains around 1 (as trained ones are), everything else around 0
            centre = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * std + centre)


def _timestamps(b: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    gaps = torch.randint(0, 100_000, (b, t), generator=g)
    return 1_600_000_000 + torch.cumsum(gaps, dim=1)


# ----------------------------------------------------------------------------- config


def test_from_size_parses_gpsd_names():
    cfg = BackboneConfig.from_size("L4H64A4", kind="hstu", max_len=50)
    assert (cfg.kind, cfg.num_layers, cfg.dim, cfg.num_heads, cfg.max_len) == ("hstu", 4, 64, 4, 50)
    assert cfg.size_name == "L4H64A4"
    assert BackboneConfig.from_size("l24h1024a16").size_name == "L24H1024A16"


@pytest.mark.parametrize("bad", ["L4H64", "4H64A4", "L4H64A4x", "", "LxH64A4"])
def test_from_size_rejects_bad_names(bad):
    with pytest.raises(ValueError, match="L\\{layers\\}H\\{dim\\}A\\{heads\\}"):
        BackboneConfig.from_size(bad)


def test_config_validation_and_roundtrip():
    with pytest.raises(ValueError, match="divisible"):
        BackboneConfig(dim=30, num_heads=4)
    with pytest.raises(ValueError, match="kind"):
        BackboneConfig(kind="gpt")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        BackboneConfig.from_size("L1H32A4", num_layer=3)  # misspelt override is not swallowed
    cfg = BackboneConfig.tiny("hstu")
    assert BackboneConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="BackboneConfig: unknown key 'heads'"):
        BackboneConfig.from_dict({**cfg.to_dict(), "heads": 3})


# ----------------------------------------------------------------------------- parameter counts


def test_llama_dense_parameter_counts_match_gpsd():
    # GPSD: q,k,v,o d x d without bias; SwiGLU w1,w2,w3 with hidden round_up(8d/3, 32); 2 RMSNorm/block + final
    assert swiglu_hidden_dim(32, 32) == 96 and swiglu_hidden_dim(64, 32) == 192
    assert LlamaBackbone(BackboneConfig.from_size("L1H32A4")).dense_parameter_count() == 13_408
    assert LlamaBackbone(BackboneConfig.from_size("L4H64A4")).dense_parameter_count() == 213_568
    d, h = 128, swiglu_hidden_dim(128, 32)
    cfg = BackboneConfig.from_size("L4H128A4")
    assert LlamaBackbone(cfg).dense_parameter_count() == 4 * (4 * d * d + 3 * d * h + 2 * d) + d  # ≈ 804K


def test_hstu_parameter_count_formula():
    cfg = BackboneConfig.from_size("L2H32A4", kind="hstu", max_len=50, hstu_num_time_buckets=64)
    d, hv, hqk = 32, 32, 32
    per_block = (
        2 * d  # input LayerNorm
        + d * (2 * hv + 2 * hqk) + (2 * hv + 2 * hqk)  # f1 (+bias)
        + 50 + 64  # relative position + time tables
        + 2 * hv  # LayerNorm(AV)
        + hv * d + d  # f2 (+bias)
    )
    assert HSTUBackbone(cfg).dense_parameter_count() == 2 * per_block + 2 * d


@pytest.mark.parametrize("kind", KINDS)
def test_meta_device_construction(kind):
    cfg = BackboneConfig.tiny(kind)
    meta = build_backbone(cfg, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    assert meta.dense_parameter_count() == build_backbone(cfg).dense_parameter_count()
    # materialise like DistributedModelParallel does: to_empty + reset_parameters keeps the N(0, 0.02) init
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    weights = torch.cat([m.weight.flatten() for m in meta.modules() if isinstance(m, torch.nn.Linear)])
    assert abs(weights.std().item() - cfg.init_std) < 0.005


# ----------------------------------------------------------------------------- LLaMA pieces by hand


def test_rope_rotates_a_known_vector():
    # head_dim 4: pair 0 turns by p rad, pair 1 by p * 10000^(-1/2) = p / 100
    cos, sin = rope_cos_sin(4, 4, theta=10000.0)
    x = torch.tensor([1.0, 0.0, 1.0, 0.0]).expand(1, 1, 4, 4)
    out = apply_rope(x, cos, sin)[0, 0]
    for p in range(4):
        expected = torch.tensor([math.cos(p), math.sin(p), math.cos(p / 100), math.sin(p / 100)])
        torch.testing.assert_close(out[p], expected)
    # q·k after RoPE depends only on the offset between positions (relative encoding)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, generator=g), torch.randn(4, generator=g)
    cos, sin = rope_cos_sin(8, 4, theta=10000.0)
    rq = apply_rope(q.expand(1, 1, 8, 4), cos, sin)[0, 0]
    rk = apply_rope(k.expand(1, 1, 8, 4), cos, sin)[0, 0]
    torch.testing.assert_close(rq[5] @ rk[2], rq[6] @ rk[3])


def test_swiglu_known_values():
    ffn = SwiGLU(2, 2)
    with torch.no_grad():
        for w in (ffn.w1, ffn.w2, ffn.w3):
            w.weight.copy_(torch.eye(2))
    out = ffn(torch.tensor([1.0, -2.0]))
    # silu(x) * x with silu(x) = x * sigmoid(x)
    sig = torch.sigmoid
    expected = torch.tensor([1.0 * sig(torch.tensor(1.0)) * 1.0, -2.0 * sig(torch.tensor(-2.0)) * -2.0])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, torch.tensor([0.7311, 0.4768]), atol=1e-4, rtol=0)


def _manual_rmsnorm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def test_llama_one_layer_matches_step_by_step_computation():
    # dim 4, 2 heads of width 2: RoPE has one frequency (theta^0 = 1), so position p rotates by p radians
    cfg = BackboneConfig(kind="llama", num_layers=1, dim=4, num_heads=2, ffn_multiple_of=8)
    model = LlamaBackbone(cfg).eval()
    _randomise(model, seed=1)
    blk = model.layers[0]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 4, generator=g)
    out = model(x, torch.tensor([3]))[0]

    eps = cfg.norm_eps
    wq, wk, wv, wo = (m.weight for m in (blk.attention.wq, blk.attention.wk, blk.attention.wv, blk.attention.wo))
    xn = _manual_rmsnorm(x[0], blk.attention_norm.weight, eps)
    q, k, v = xn @ wq.T, xn @ wk.T, xn @ wv.T

    def rotate(vec, p):
        c, s = math.cos(p), math.sin(p)
        return torch.stack([vec[0] * c - vec[1] * s, vec[0] * s + vec[1] * c])

    heads = []
    for h in range(2):
        sl = slice(2 * h, 2 * h + 2)
        rows = []
        for i in range(3):
            qi = rotate(q[i, sl], i)
            scores = torch.stack([qi @ rotate(k[j, sl], j) / math.sqrt(2) for j in range(i + 1)])
            p = torch.softmax(scores, dim=0)
            rows.append(sum(p[j] * v[j, sl] for j in range(i + 1)))
        heads.append(torch.stack(rows))
    attn = torch.cat(heads, dim=-1) @ wo.T
    hidden = x[0] + attn
    hn = _manual_rmsnorm(hidden, blk.ffn_norm.weight, eps)
    ff = blk.feed_forward
    ffn = (F.silu(hn @ ff.w1.weight.T) * (hn @ ff.w3.weight.T)) @ ff.w2.weight.T
    expected = _manual_rmsnorm(hidden + ffn, model.norm.weight, eps)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- HSTU by hand


def test_time_gap_buckets_and_relative_bias_lookup():
    ts = torch.tensor([[0, 1, 3, 100, 10**9]])
    b = time_gap_buckets(ts, num_buckets=20, divisor=0.301)[0]
    assert b[0, 0] == 0 and b[1, 0] == 0  # gaps of 0 s and 1 s: ln(1) = 0
    assert b[2, 0] == math.floor(math.log(3) / 0.301)  # 3
    assert b[3, 0] == math.floor(math.log(100) / 0.301)  # 15
    assert b[4, 0] == 19  # clipped to the last bucket
    assert torch.equal(b, b.T)  # |dt|

    rab = RelativeBias(max_len=3, num_time_buckets=20)
    with torch.no_grad():
        rab.pos_weight.copy_(torch.tensor([10.0, 20.0, 30.0]))
        rab.time_weight.copy_(torch.arange(20.0) / 100)
    bias = rab(torch.zeros(1, 5, dtype=torch.int64))[0]  # all gaps 0 → time bucket 0 (weight 0)
    assert bias[4, 0] == 30.0  # distance 4 clipped to max_len - 1 = 2
    assert bias[2, 1] == 20.0 and bias[3, 3] == 10.0


def _manual_layernorm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def test_hstu_one_layer_matches_step_by_step_computation():
    # one padded sequence of 3 valid events in T = 4: attention is SiLU(q·k + rab_pos + rab_time) / (i + 1)
    cfg = BackboneConfig(kind="hstu", num_layers=1, dim=4, num_heads=2, max_len=8, hstu_num_time_buckets=16)
    model = HSTUBackbone(cfg).eval()
    _randomise(model, seed=3)
    blk = model.layers[0]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 4, generator=g)
    ts = torch.tensor([[1000, 1005, 1400, 0]])
    out = model(x, torch.tensor([3]), ts)[0]

    eps = cfg.norm_eps
    xn = _manual_layernorm(x[0, :3], blk.input_norm.weight, blk.input_norm.bias, eps)
    proj = F.silu(xn @ blk.f1.weight.T + blk.f1.bias)
    u, v, q, k = proj[:, 0:4], proj[:, 4:8], proj[:, 8:12], proj[:, 12:16]
    pos_w, time_w = blk.rel_bias.pos_weight, blk.rel_bias.time_weight

    def bias(i, j):
        gap = abs(int(ts[0, i]) - int(ts[0, j]))
        bucket = min(math.floor(math.log(max(gap, 1)) / 0.301), 15)
        return pos_w[i - j] + time_w[bucket]

    heads = []
    for h in range(2):
        sl = slice(2 * h, 2 * h + 2)
        rows = []
        for i in range(3):
            a = [F.silu(q[i, sl] @ k[j, sl] + bias(i, j)) / (i + 1) for j in range(i + 1)]
            rows.append(sum(a[j] * v[j, sl] for j in range(i + 1)))
        heads.append(torch.stack(rows))
    av = torch.cat(heads, dim=-1)
    y = _manual_layernorm(av, blk.attn_norm.weight, blk.attn_norm.bias, eps) * u
    hidden = x[0, :3] + y @ blk.f2.weight.T + blk.f2.bias
    expected = _manual_layernorm(hidden, model.norm.weight, model.norm.bias, eps)
    torch.testing.assert_close(out[:3], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[3], torch.zeros(4))  # padded position


def test_hstu_requires_timestamps():
    model = HSTUBackbone(BackboneConfig.tiny("hstu"))
    with pytest.raises(ValueError, match="timestamps"):
        model(torch.randn(1, 3, 16), torch.tensor([3]))


# ----------------------------------------------------------------------------- causality and padding


@pytest.mark.parametrize("kind", KINDS)
def test_changing_a_later_event_never_changes_earlier_outputs(kind):
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig.tiny(kind)).eval()
    _randomise(model, seed=5, std=0.3)
    x, ts = torch.randn(2, 7, 16), _timestamps(2, 7)
    lengths = torch.tensor([7, 7])
    base = model(x, lengths, ts)
    for j in (1, 4, 6):
        x2, ts2 = x.clone(), ts.clone()
        x2[:, j] += torch.randn(2, 16) * 3
        ts2[:, j:] += 123_456  # a later event happening later moves every later timestamp
        out = model(x2, lengths, ts2)
        torch.testing.assert_close(out[:, :j], base[:, :j], atol=0, rtol=0)
        assert not torch.allclose(out[:, j], base[:, j])  # the change is visible from j on


@pytest.mark.parametrize("kind", KINDS)
def test_padding_never_changes_valid_outputs(kind):
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig.tiny(kind)).eval()
    _randomise(model, seed=6, std=0.3)
    lengths = torch.tensor([5, 2, 7, 1])
    t = 9  # longer than any sequence
    x, ts = torch.randn(4, t, 16), _timestamps(4, t)
    valid = torch.arange(t)[None, :] < lengths[:, None]
    x_garbage = torch.where(valid[..., None], x, torch.full_like(x, float("nan")))
    ts_garbage = torch.where(valid, ts, torch.full_like(ts, 7))
    batched = model(x_garbage, lengths, ts_garbage)
    assert torch.isfinite(batched).all()
    assert torch.equal(batched[~valid], torch.zeros_like(batched[~valid]))
    for b, n in enumerate(lengths.tolist()):
        alone = model(x[b : b + 1, :n], torch.tensor([n]), ts[b : b + 1, :n])[0]
        torch.testing.assert_close(batched[b, :n], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_do_not_reach_padded_inputs(kind):
    model = build_backbone(BackboneConfig.tiny(kind))
    x = torch.randn(2, 5, 16, requires_grad=True)
    lengths = torch.tensor([3, 5])
    model(x, lengths, _timestamps(2, 5)).sum().backward()
    assert torch.equal(x.grad[0, 3:], torch.zeros(2, 16))
    assert x.grad[0, :3].abs().sum() > 0
