"""Rankers: every one learns a synthetic task; registry and config errors; interface details."""
from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from ctr_synthetic import SYNTHETIC_VOCAB_SIZES, make_synthetic_batch
from sklearn.metrics import roc_auc_score

from hybrid.core.feature_map import base_feature
from hybrid.ctr_models import RANKER_NAMES, Ranker, build_ranker, ranker_classes
from hybrid.ctr_models._config import config_from_dict
from hybrid.ctr_models.dcn_v2 import DCNv2, DCNv2Config
from hybrid.ctr_models.features import FeatureConfig
from hybrid.ctr_models.gpsd_ranker import GPSDRanker, GPSDRankerConfig
from hybrid.ctr_models.history import HistoryConfig
from hybrid.ctr_models.moe import (
    MMoE,
    MMoEConfig,
    MultiEmbeddingMoE,
    MultiEmbeddingMoEConfig,
)
from hybrid.ctr_models.tin import TIN, TINConfig

FEATURES = FeatureConfig(embedding_dim=16, max_len=12)
ATTENTION = HistoryConfig(encoder="target", attention_hidden=(32,))


def train_and_eval(make_model, tasks, steps=300, lr=1e-2, batch_size=256, seed=0):
    """Build the model under a fixed seed (independent of test order), train it with Adam on a pool of 40
    synthetic batches and return ``(model, AUC per task on 2000 fresh samples)``."""
    torch.manual_seed(seed)
    model = make_model()
    g = torch.Generator().manual_seed(seed + 1)
    pool = [make_synthetic_batch(batch_size, g, tasks) for _ in range(40)]
    test = make_synthetic_batch(2000, torch.Generator().manual_seed(seed + 99), tasks)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        batch = pool[step % len(pool)]
        logits = model(batch)
        assert logits.shape == (batch_size, len(tasks))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        loss = loss + sum(model.auxiliary_losses().values(), torch.zeros(()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(test)
    return model, {t: roc_auc_score(test.labels[:, i].numpy(), logits[:, i].numpy()) for i, t in enumerate(tasks)}


# --------------------------------------------------------------------------- learning


@pytest.mark.parametrize("cross_type,structure,history,task", [
    ("low_rank", "stacked", ATTENTION, "in_history"),            # needs history × candidate
    ("full", "parallel", HistoryConfig(encoder="pooled"), "parity"),
    ("mixture", "stacked", ATTENTION, "parity"),
])
def test_dcn_v2_learns(cross_type, structure, history, task):
    cfg = DCNv2Config(features=FEATURES, history=history, cross_type=cross_type, structure=structure,
                      num_cross_layers=2, deep_hidden=(32, 16))
    _, auc = train_and_eval(lambda: DCNv2(cfg, SYNTHETIC_VOCAB_SIZES, (task,)), (task,))
    assert auc[task] > 0.8, auc


def test_mmoe_learns_two_tasks_and_logs_gates():
    cfg = MMoEConfig(features=FEATURES, history=ATTENTION, num_experts=4, expert_hidden=(64, 32),
                     tower_hidden=(16,))
    model, auc = train_and_eval(lambda: MMoE(cfg, SYNTHETIC_VOCAB_SIZES, ("in_history", "parity")),
                                ("in_history", "parity"), steps=400)
    assert auc["in_history"] > 0.8 and auc["parity"] > 0.8, auc
    metrics = model.logging_metrics()
    assert set(metrics) == {"moe/cross_expert_corr", "moe/gate_entropy/in_history", "moe/gate_entropy/parity"}
    assert model.auxiliary_losses() == {}                    # decorrelation_weight = 0 by default


def test_multi_embedding_moe_learns_with_decorrelation_loss():
    cfg = MultiEmbeddingMoEConfig(features=FEATURES, history=ATTENTION, num_experts=2, expert_hidden=(16,),
                                  tower_hidden=(8,), decorrelation_weight=0.01)
    model, auc = train_and_eval(lambda: MultiEmbeddingMoE(cfg, SYNTHETIC_VOCAB_SIZES, ("in_history",)),
                                ("in_history",))
    # each expert owns its tables
    tables = [n for n, _ in model.named_parameters() if n.endswith("t_item_id.weight")]
    assert tables == [f"experts.{k}.input.features.ec.embeddings.t_item_id.weight" for k in range(2)]
    assert auc["in_history"] > 0.8, auc
    model.train()
    model(make_synthetic_batch(64, torch.Generator().manual_seed(5), ("in_history",)))
    aux = model.auxiliary_losses()
    assert set(aux) == {"decorrelation"} and aux["decorrelation"].requires_grad
    assert 0.0 <= model.logging_metrics()["moe/cross_expert_corr"] <= 1.0


@pytest.mark.parametrize("kind", ["mmoe", "multi_embedding_moe"])
def test_moe_each_task_tower_reads_its_own_gated_mixture(kind):
    """Both MoE rankers share TaskGates + the towers: recomputing the forward by hand from the submodules
    (gate input, softmax per task, Σ_k g_k · expert_k, tower t) gives the logits, and moving one task's gate
    moves that task's logit only."""
    tasks = ("in_history", "parity", "recent")
    torch.manual_seed(0)
    if kind == "mmoe":
        model = MMoE(MMoEConfig.tiny(), SYNTHETIC_VOCAB_SIZES, tasks)
    else:
        cfg = dataclasses.replace(MultiEmbeddingMoEConfig.tiny(), num_experts=3)
        model = MultiEmbeddingMoE(cfg, SYNTHETIC_VOCAB_SIZES, tasks)
    model.eval()
    K, B, T = model.config.num_experts, 16, len(tasks)
    batch = make_synthetic_batch(B, torch.Generator().manual_seed(1), tasks)
    with torch.no_grad():
        logits = model(batch)
        gates, experts = model._last_gates, model._last_experts
        assert gates.shape == (B, T, K) and experts.shape == (K, B, model.config.expert_hidden[-1])
        assert (gates >= 0).all()
        torch.testing.assert_close(gates.sum(-1), torch.ones(B, T))
        if kind == "mmoe":
            gate_in = model.input(batch)                                   # experts and gates read x0
            hs = [e(gate_in) for e in model.experts]
        else:
            x0s, hs = zip(*(e(batch) for e in model.experts))              # each expert its own x0
            gate_in = torch.stack(x0s).mean(0)                             # the gates read their mean
        torch.testing.assert_close(experts, torch.stack(hs))
        for t in range(T):
            g = torch.softmax(model.gates[t](gate_in), -1)
            torch.testing.assert_close(gates[:, t], g)
            mixed = sum(g[:, k:k + 1] * hs[k] for k in range(K))
            torch.testing.assert_close(model.heads.towers[t](mixed)[:, 0], logits[:, t])
        model.gates[0][1].bias.add_(torch.arange(K, dtype=torch.float32))  # task 0's gate only
        moved = model(batch)
    assert not torch.allclose(moved[:, 0], logits[:, 0])
    torch.testing.assert_close(moved[:, 1:], logits[:, 1:], rtol=0, atol=0)


def test_tin_learns_membership_and_recency():
    model, auc = train_and_eval(lambda: TIN(dataclasses.replace(TINConfig.tiny(), features=FEATURES),
                                            SYNTHETIC_VOCAB_SIZES, ("in_history", "recent")),
                                ("in_history", "recent"))
    assert auc["in_history"] > 0.8 and auc["recent"] > 0.8, auc
    assert model.last_attention.shape == (2000, 12)


def test_gpsd_ranker_learns():
    # From scratch the transformer learns "candidate is in the history" slowly (a pretrained backbone is
    # what GPSD transfers); parity (candidate token only) must be learnt, membership must clearly beat
    # chance (0.82-0.92 over seeds 0-3 at 300 steps).
    _, auc = train_and_eval(lambda: GPSDRanker(dataclasses.replace(GPSDRankerConfig.tiny(), features=FEATURES),
                                               SYNTHETIC_VOCAB_SIZES, ("parity", "in_history")),
                            ("parity", "in_history"), lr=3e-3)
    assert auc["parity"] > 0.8 and auc["in_history"] > 0.75, auc


def test_dcn_with_transformer_history_trains():
    cfg = DCNv2Config(features=FEATURES, deep_hidden=(16,), num_cross_layers=1,
                      history=HistoryConfig(encoder="transformer",
                                            backbone={"num_layers": 1, "dim": 16, "num_heads": 2}))
    model, auc = train_and_eval(lambda: DCNv2(cfg, SYNTHETIC_VOCAB_SIZES, ("parity",)), ("parity",), steps=150)
    assert any(n.startswith("input.history_encoder.backbone.") for n, _ in model.named_parameters())
    assert auc["parity"] > 0.8, auc


# --------------------------------------------------------------------------- GPSD details


def test_gpsd_candidate_is_appended_after_the_last_event():
    from hybrid.core.backbones import BackboneConfig

    cfg = GPSDRankerConfig(features=FeatureConfig(embedding_dim=8, max_len=6),
                           backbone=BackboneConfig(num_layers=1, dim=16, num_heads=2))
    model = GPSDRanker(cfg, SYNTHETIC_VOCAB_SIZES, ("click",))
    assert model.input_proj is not None                      # 8 → 16, named as in pretraining
    # only the sequence tables: no user/context fields, no bags
    assert sorted(c.name for c in model.features.ec.embedding_configs()) == ["t_action", "t_category", "t_item_id"]
    seen = {}

    def spy(module, args, output):
        seen["x"], seen["lengths"] = args[0], args[1]

    model.backbone.register_forward_hook(spy)
    batch = make_synthetic_batch(8, torch.Generator().manual_seed(0), ("in_history",), max_hist=9)
    with torch.no_grad():
        model(batch)
        x = model.features(batch)
    hist_len = x.lengths
    assert torch.equal(seen["lengths"], hist_len + 1)
    for b in range(8):
        expected = model.input_proj(x.target[b]) + model.segment.weight[1]
        torch.testing.assert_close(seen["x"][b, int(hist_len[b])], expected)
    with pytest.raises(ValueError, match="features.single_fields"):
        GPSDRanker(dataclasses.replace(cfg, features=FeatureConfig(single_fields=("item_id", "user_id"))),
                   SYNTHETIC_VOCAB_SIZES, ("click",))


def test_gpsd_with_hstu_backbone_uses_timestamps():
    from hybrid.core.backbones import BackboneConfig

    cfg = GPSDRankerConfig(features=FeatureConfig(embedding_dim=16, max_len=6), backbone=BackboneConfig.tiny("hstu"))
    model = GPSDRanker(cfg, SYNTHETIC_VOCAB_SIZES, ("click", "rating5"))
    batch = make_synthetic_batch(8, torch.Generator().manual_seed(0), ("in_history", "parity"))
    assert model(batch).shape == (8, 2)


# --------------------------------------------------------------------------- registry, configs, errors


def _tiny(name):
    cls = {"dcn_v2": DCNv2Config, "mmoe": MMoEConfig, "multi_embedding_moe": MultiEmbeddingMoEConfig,
           "tin": TINConfig, "gpsd": GPSDRankerConfig}[name]
    return cls.tiny()


@pytest.mark.parametrize("name", RANKER_NAMES)
def test_registry_builds_every_ranker_and_forward_is_sane(name):
    tasks = ("click", "rating5")
    model = build_ranker(name, _tiny(name), SYNTHETIC_VOCAB_SIZES, tasks)
    batch = make_synthetic_batch(32, torch.Generator().manual_seed(0), ("in_history", "parity"))
    logits = model(batch)
    assert logits.shape == (32, 2) and torch.isfinite(logits).all()
    assert isinstance(model.auxiliary_losses(), dict) and isinstance(model.logging_metrics(), dict)
    # batch of one and empty histories (single-request inference) must work
    one = make_synthetic_batch(1, torch.Generator().manual_seed(3), ("in_history",), max_hist=0)
    model.eval()
    assert torch.isfinite(model(one)).all()


@pytest.mark.parametrize("name", RANKER_NAMES)
def test_every_ranker_has_one_constructor_path(name):
    """Same signature, and the Ranker base sets config / task_names / spec for all of them."""
    _, model_cls = ranker_classes(name)
    assert issubclass(model_cls, Ranker)
    params = list(inspect.signature(model_cls.__init__).parameters)
    assert params == ["self", "config", "vocab_sizes", "task_names", "embedding_device", "item_vectors"]
    model = model_cls(_tiny(name), SYNTHETIC_VOCAB_SIZES, ["click"])
    assert model.config == _tiny(name) and model.task_names == ("click",)
    assert {base_feature(k) for k in model.spec.kjt_keys} <= set(SYNTHETIC_VOCAB_SIZES)
    assert model.multimodal_features is None
    with pytest.raises(ValueError, match=f"{type(_tiny(name)).__name__}: task_names has duplicates"):
        model_cls(_tiny(name), SYNTHETIC_VOCAB_SIZES, ["click", "click"])


def test_build_ranker_from_nested_mapping():
    model = build_ranker("dcn_v2", {"cross_type": "mixture", "num_experts": 2, "structure": "parallel",
                                    "deep_hidden": [16], "features": {"embedding_dim": 8, "max_len": 4},
                                    "history": {"encoder": "pooled"}},
                         SYNTHETIC_VOCAB_SIZES, ["click"])
    assert model.config.deep_hidden == (16,) and model.config.features.embedding_dim == 8
    assert model.config.history.encoder == "pooled"
    gpsd = build_ranker("gpsd", {"backbone": {"num_layers": 1, "dim": 16, "num_heads": 2},
                                 "features": {"embedding_dim": 16}}, SYNTHETIC_VOCAB_SIZES, ["click"])
    assert gpsd.config.backbone.num_layers == 1


def test_meta_device_tables():
    model = build_ranker("dcn_v2", DCNv2Config.tiny(), SYNTHETIC_VOCAB_SIZES, ("click",), embedding_device="meta")
    assert model.input.features.ec.embeddings["t_item_id"].weight.is_meta
    assert not model.deep.layers[0].weight.is_meta          # dense layers stay materialised


@pytest.mark.parametrize("make,field", [
    (lambda: DCNv2Config(cross_type="diagonal"), "DCNv2Config.cross_type"),
    (lambda: DCNv2Config(structure="serial"), "DCNv2Config.structure"),
    (lambda: DCNv2Config(num_cross_layers=0), "DCNv2Config.num_cross_layers"),
    (lambda: DCNv2Config(deep_hidden=(32, -1)), "DCNv2Config.deep_hidden"),
    (lambda: MMoEConfig(num_experts=0), "MMoEConfig.num_experts"),
    (lambda: MultiEmbeddingMoEConfig(cross_type="vector"), "MultiEmbeddingMoEConfig.cross_type"),
    (lambda: TINConfig(temporal_encoding="absolute"), "TINConfig.temporal_encoding"),
    (lambda: HistoryConfig(encoder="lstm"), "HistoryConfig.encoder"),
    (lambda: HistoryConfig(encoder="transformer"), "HistoryConfig.backbone"),
    (lambda: FeatureConfig(pad_impl="numpy"), "FeatureConfig.pad_impl"),
    (lambda: GPSDRankerConfig(head_mult=0), "GPSDRankerConfig.head_mult"),
])
def test_config_errors_name_the_field(make, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make()


@pytest.mark.parametrize("tasks", [(), ("click", "click"), "click"])
def test_bad_task_names_are_rejected(tasks):
    with pytest.raises(ValueError, match="task_names"):
        DCNv2(DCNv2Config.tiny(), SYNTHETIC_VOCAB_SIZES, tasks)


def test_registry_and_dict_errors():
    with pytest.raises(ValueError, match="unknown name 'xgboost'"):
        build_ranker("xgboost", None, SYNTHETIC_VOCAB_SIZES, ("click",))
    with pytest.raises(ValueError, match="DCNv2Config: unknown key 'cross_typ' \\(did you mean 'cross_type'\\?\\)"):
        build_ranker("dcn_v2", {"cross_typ": "full"}, SYNTHETIC_VOCAB_SIZES, ("click",))
    with pytest.raises(ValueError, match="DCNv2Config.cross_type"):
        config_from_dict(DCNv2Config, {"cross_type": "nope"})
    with pytest.raises(ValueError, match="TINConfig: task_names is empty"):
        build_ranker("tin", TINConfig.tiny(), SYNTHETIC_VOCAB_SIZES, [])
    with pytest.raises(ValueError, match="TINConfig.features.history_fields"):
        TIN(dataclasses.replace(TINConfig.tiny(), features=FeatureConfig(history_fields=())),
            SYNTHETIC_VOCAB_SIZES, ("click",))
    with pytest.raises(ValueError, match="HistoryConfig.encoder"):
        DCNv2(DCNv2Config(features=FeatureConfig(single_fields=("user_id",)), history=HistoryConfig()),
              SYNTHETIC_VOCAB_SIZES, ("click",))
