"""GenerativeModel on hand-built SequenceBatches: token composition, PAD semantics, learning a
deterministic next-item task, one embedding lookup per step, eval targets, meta/sharded construction,
parameter counts."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hybrid.core.backbones import BackboneConfig
from hybrid.core.batch import SequenceBatch
from hybrid.core.jagged import jagged_to_padded
from hybrid.pretrain.model import GenerativeModel, GenerativeModelConfig
from hybrid.pretrain.objectives import (
    ObjectiveConfig,
    full_softmax_loss,
    sample_uniform_negatives,
    sampled_softmax_loss,
)

NUM_ITEMS = 42  # ids 2..41 are real items
VOCAB = {"item_id": NUM_ITEMS, "category": 7, "action": 4}
FEATURES = ("item_id", "category", "action")


def category_of(items: torch.Tensor) -> torch.Tensor:
    return items % 5 + 2


def make_batch(
    seqs: list[list[int]],
    num_eval_targets: int = 0,
    categories: list[list[int]] | None = None,
) -> SequenceBatch:
    """KJT from per-sequence item lists; category = item % 5 + 2, action = 2 + item % 2, 60 s apart."""
    items = torch.tensor([x for s in seqs for x in s], dtype=torch.int64)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    cats = torch.tensor([x for s in categories for x in s]) if categories is not None else category_of(items)
    actions = 2 + items % 2
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(FEATURES), values=torch.cat([items, cats, actions]), lengths=lengths.repeat(3)
    )
    ts = torch.cat([1_600_000_000 + 60 * torch.arange(len(s)) for s in seqs])
    return SequenceBatch(kjt, ts, lengths, num_eval_targets)


def successor_batch(g: torch.Generator, batch_size: int = 16, num_eval_targets: int = 0) -> SequenceBatch:
    """Sequences of consecutive items (wrapping in 2..41): the next item is always item + 1."""
    seqs = []
    for _ in range(batch_size):
        length = int(torch.randint(4, 11, (1,), generator=g))
        start = int(torch.randint(0, NUM_ITEMS - 2, (1,), generator=g))
        seqs.append([2 + (start + i) % (NUM_ITEMS - 2) for i in range(length)])
    return make_batch(seqs, num_eval_targets)


def tiny_model(kind: str = "llama", **objective) -> GenerativeModel:
    cfg = GenerativeModelConfig.tiny(kind)
    if objective:
        cfg = replace(cfg, objective=replace(cfg.objective, **objective))
    return GenerativeModel(cfg, VOCAB)


def table(model: GenerativeModel, feature: str) -> torch.Tensor:
    return model.embeddings.embeddings[f"t_{feature}"].weight


# ----------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("kind", ["llama", "hstu"])
def test_forward_is_backbone_of_summed_feature_embeddings(kind):
    torch.manual_seed(0)
    model = tiny_model(kind).eval()
    batch = make_batch([[5, 6, 7, 8], [9, 10], [11, 12, 13]])
    hidden, lengths = model(batch)
    assert hidden.shape == (3, 4, 16) and lengths.tolist() == [4, 2, 3]
    assert torch.equal(hidden[1, 2:], torch.zeros(2, 16))

    # by hand: token = item row + category row + action row, padded, through the backbone
    jts = batch.features.to_dict()
    tokens = sum(table(model, f)[jts[f].values()] for f in FEATURES)
    x = jagged_to_padded(tokens, batch.lengths, keep="first")
    ts = jagged_to_padded(batch.timestamps, batch.lengths, keep="first")
    torch.testing.assert_close(hidden, model.backbone(x, batch.lengths, ts))


def test_pad_ids_contribute_nothing_and_get_no_gradient():
    torch.manual_seed(0)
    model = tiny_model()
    seqs = [[5, 6, 7, 8], [9, 10, 11]]
    cats = [[0, 3, 0, 4], [2, 0, 5]]  # category unknown for some events → PAD
    batch = make_batch(seqs, categories=cats)
    before, _ = model(batch)
    with torch.no_grad():
        table(model, "category")[0] = 1e3  # whatever the PAD row holds must not matter
    after, _ = model(batch)
    torch.testing.assert_close(before, after)

    model.loss(batch)["loss"].backward()
    grad = table(model, "category").grad
    assert torch.equal(grad[0], torch.zeros(16))  # PAD: neither an input nor a class
    assert grad[3].abs().sum() > 0


def test_embedding_dim_different_from_backbone_dim_projects():
    cfg = replace(GenerativeModelConfig.tiny(), embedding_dim=8)
    model = GenerativeModel(cfg, VOCAB)
    assert model.input_proj is not None and model.output_proj is not None
    batch = successor_batch(torch.Generator().manual_seed(0), 4)
    hidden, _ = model(batch)
    assert hidden.shape[-1] == 16 and model.query_vectors(hidden).shape[-1] == 8
    assert torch.isfinite(model.loss(batch)["loss"])


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("kind", ["llama", "hstu"])
def test_loss_decreases_on_deterministic_next_item_task(kind):
    torch.manual_seed(0)
    model = tiny_model(kind)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    eval_batch = successor_batch(torch.Generator().manual_seed(99), 32, num_eval_targets=1)
    hr_before = model.retrieval_metrics(eval_batch)["hr@10"].mean().item()
    history = []
    for _ in range(50):
        losses = model.loss(successor_batch(g), generator=g)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    first, last = history[0], history[-1]
    assert last["item_loss"] < 0.05 * first["item_loss"]
    assert last["category_loss"] < 0.05 * first["category_loss"]  # next category = category of item + 1
    model.eval()
    metrics = model.retrieval_metrics(eval_batch, item_table=model.item_table())
    assert metrics["hr@10"].mean().item() == 1.0 > hr_before
    assert metrics["ndcg@10"].mean().item() > 0.9


def test_in_batch_negatives_train_and_need_counts():
    torch.manual_seed(0)
    model = tiny_model(negatives="in_batch", num_negatives=64)
    g = torch.Generator().manual_seed(1)
    with pytest.raises(ValueError, match="item_counts"):
        model.loss(successor_batch(g))
    with pytest.raises(ValueError, match="entries"):
        model.loss(successor_batch(g), item_counts=torch.ones(5))
    counts = torch.ones(NUM_ITEMS)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    for _ in range(30):
        loss = model.loss(successor_batch(g), item_counts=counts, generator=g)["item_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.2 * history[0]


def test_one_embedding_lookup_per_training_step_covers_negatives_and_categories():
    torch.manual_seed(0)
    model = tiny_model(num_negatives=200)
    calls = []
    model.embeddings.register_forward_hook(lambda *_: calls.append(1))
    batch = make_batch([[2, 3, 4, 5], [3, 4, 5]])  # uses items 2..5 only
    model.loss(batch, generator=torch.Generator().manual_seed(0))["loss"].backward()
    assert len(calls) == 1  # sequences, sampled negatives and the category table in one lookup
    item_grad = table(model, "item_id").grad.abs().sum(-1)
    assert (item_grad[6:] > 0).sum() > 10  # sampled negatives (never in the batch) received gradient
    assert item_grad[:2].sum() == 0  # reserved ids are never sampled
    cat_grad = table(model, "category").grad.abs().sum(-1)
    assert (cat_grad[2:] > 0).all()  # full softmax: every real category row


def test_eval_batches_score_only_trailing_targets():
    torch.manual_seed(0)
    model = tiny_model().eval()
    seqs = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    assert model.retrieval_metrics(make_batch(seqs))["hr@10"].numel() == 4 + 2 + 3  # every next event
    assert model.retrieval_metrics(make_batch(seqs, num_eval_targets=1))["hr@10"].numel() == 3
    assert model.retrieval_metrics(make_batch(seqs, num_eval_targets=2))["ndcg@10"].numel() == 6
    # an OOV target (an item unknown to the feature map) stays in the denominator as a miss
    known = model.retrieval_metrics(make_batch(seqs, num_eval_targets=1))
    seqs[0][-1] = 1
    scored = model.retrieval_metrics(make_batch(seqs, num_eval_targets=1))
    assert scored["hr@10"].numel() == 3 and scored["oov"].tolist() == [True, False, False]
    assert scored["hr@10"][0] == 0 and scored["ndcg@10"][0] == 0
    torch.testing.assert_close(scored["hr@10"][1:], known["hr@10"][1:])    # the others are unchanged
    assert not known["oov"].any()
    single = make_batch([[5]], num_eval_targets=1)  # no target at all → zero, not NaN
    assert model.loss(single)["item_loss"].item() == 0.0


def test_eval_loss_equals_direct_computation_on_the_last_target():
    torch.manual_seed(0)
    model = tiny_model(num_negatives=8).eval()
    seqs = [[5, 6, 7, 8, 9], [10, 11, 12]]
    batch = make_batch(seqs, num_eval_targets=1)
    losses = model.loss(batch, generator=torch.Generator().manual_seed(3))

    # by hand: only position len-2 predicts (the last event); same negatives from the same RNG stream
    negatives = sample_uniform_negatives(2, 8, NUM_ITEMS, generator=torch.Generator().manual_seed(3))
    hidden, lengths = model(batch)
    last = lengths - 2
    query = model.query_vectors(hidden)[torch.arange(2), last].unsqueeze(1)  # [2, 1, E]
    targets = torch.tensor([[9], [12]])
    items = table(model, "item_id")
    expected = sampled_softmax_loss(
        query, torch.ones(2, 1, dtype=torch.bool), targets, items[targets], negatives, items[negatives], 0.05
    )
    torch.testing.assert_close(losses["item_loss"], expected)
    expected_cat = full_softmax_loss(query[:, 0], category_of(targets[:, 0]), table(model, "category"), 0.05)
    torch.testing.assert_close(losses["category_loss"], expected_cat)
    torch.testing.assert_close(losses["loss"], expected + expected_cat)


def test_item_table_lookup_equals_weight():
    model = tiny_model()
    torch.testing.assert_close(model.item_table(chunk_size=10), table(model, "item_id"))


# ----------------------------------------------------------------------------- construction and counts


def test_parameter_counts_and_table_names():
    cfg = GenerativeModelConfig(backbone=BackboneConfig.from_size("L1H32A4"), features=("item_id", "category"))
    model = GenerativeModel(cfg, {"item_id": 1000, "category": 20, "action": 5})
    assert model.dense_parameter_count() == 13_408
    assert model.sparse_parameter_count() == (1000 + 20) * 32
    assert model.table_names == {"item_id": "t_item_id", "category": "t_category"}
    keys = set(model.state_dict())
    assert {"embeddings.embeddings.t_item_id.weight", "embeddings.embeddings.t_category.weight"} <= keys
    assert "backbone.norm.weight" in keys
    # projections exist when embedding_dim != dim, but are not "dense" in GPSD's sense
    proj = GenerativeModel(replace(cfg, embedding_dim=16), {"item_id": 1000, "category": 20})
    assert proj.dense_parameter_count() == 13_408
    assert proj.sparse_parameter_count() == (1000 + 20) * 16
    # embedding_dim=None follows the backbone through a size sweep
    wider = replace(cfg, backbone=BackboneConfig.from_size("L1H64A4"))
    assert wider.embedding_dim is None and wider.table_dim == 64
    assert GenerativeModel(wider, {"item_id": 1000, "category": 20}).input_proj is None


def test_meta_device_construction_and_materialisation():
    cfg = GenerativeModelConfig.tiny()
    reference = GenerativeModel(cfg, VOCAB)
    meta = GenerativeModel(cfg, VOCAB, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    assert meta.dense_parameter_count() == reference.dense_parameter_count()
    assert meta.sparse_parameter_count() == reference.sparse_parameter_count()

    # tables on meta, dense on CPU: the layout DistributedModelParallel shards
    split = GenerativeModel(cfg, VOCAB, embedding_device="meta")
    assert table(split, "item_id").is_meta and not any(p.is_meta for p in split.backbone.parameters())

    meta.to_empty(device="cpu")
    meta.reset_parameters()
    assert abs(table(meta, "item_id").std().item() - cfg.init_std) < 0.005
    batch = successor_batch(torch.Generator().manual_seed(0), 4)
    assert torch.isfinite(meta.loss(batch)["loss"])


def test_sharded_by_distributed_model_parallel_single_rank():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised by another test")
    from torchrec.distributed import DistributedModelParallel

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = GenerativeModel(GenerativeModelConfig.tiny(), VOCAB, embedding_device="meta")
        dmp = DistributedModelParallel(model, device=torch.device("cpu"))
        assert type(dmp.module.embeddings).__name__ == "ShardedEmbeddingCollection"
        batch = successor_batch(torch.Generator().manual_seed(0), 4)
        losses = dmp.module.loss(batch)
        losses["loss"].backward()
        assert torch.isfinite(losses["loss"])
        assert dmp.module.item_table().shape == (NUM_ITEMS, 16)
        # the same checkpoint keys as the unsharded model
        unsharded = set(GenerativeModel(GenerativeModelConfig.tiny(), VOCAB).state_dict())
        assert set(dmp.state_dict()) == unsharded
    finally:
        dist.destroy_process_group()


def test_config_validation_and_roundtrip():
    with pytest.raises(ValueError, match="item_id"):
        GenerativeModelConfig(features=("category",))
    with pytest.raises(ValueError, match="category_loss_weight"):
        GenerativeModelConfig(features=("item_id",))
    GenerativeModelConfig(features=("item_id",), objective=ObjectiveConfig(category_loss_weight=0.0))
    cfg = GenerativeModelConfig.tiny("hstu")
    assert GenerativeModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="GenerativeModelConfig: unknown key 'embeding_dim'"):
        GenerativeModelConfig.from_dict({"embeding_dim": 8})
    with pytest.raises(ValueError, match="vocab_sizes lacks"):
        GenerativeModel(cfg, {"item_id": 10, "category": 5})
    with pytest.raises(ValueError, match="reserved"):
        GenerativeModel(cfg, {"item_id": 2, "category": 5, "action": 4})


def test_batch_missing_a_feature_is_a_clear_error():
    model = tiny_model()
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["item_id", "category"], values=torch.tensor([5, 6, 2, 3]), lengths=torch.tensor([2, 2])
    )
    batch = SequenceBatch(kjt, torch.tensor([1, 2]), torch.tensor([2]))
    with pytest.raises(ValueError, match="lacks key"):
        model(batch)
