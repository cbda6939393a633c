"""Sparse freeze (SF) holds: a frozen table is bit-identical after training — with TorchRec's in-backward
optimizer on an unsharded model, and under ``DistributedModelParallel`` (1 rank, fused FBGEMM kernels) —
while every trainable table and the dense weights move. Also: values loaded before sharding survive it,
values load into an already sharded model, and the TorchRec default that made freezing fail is shown."""
from __future__ import annotations

import pytest
import torch
from adapters_support import (
    SHARED,
    local_table,
    one_rank_group,
    one_thread,  # noqa: F401 (autouse fixture)
    snapshot,
    write_pretrain_checkpoint,
)
from ctr_synthetic import SYNTHETIC_VOCAB_SIZES, make_synthetic_batch
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology

from hybrid.adapters import TransferConfig, TransferError, apply_transfer
from hybrid.core.feature_map import FeatureMap, Vocabulary
from hybrid.core.tables import is_table_key
from hybrid.core.training import (
    OptimConfig,
    apply_sparse_optimizer,
    dense_parameters,
    make_dense_optimizer,
    shard_model,
)
from hybrid.ctr_models import build_ranker
from hybrid.ctr_models.trainer import (
    bce_per_task,
    embedding_modules,
    prepare_for_training,
)

OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", sparse_optimizer="adagrad", sparse_lr=0.1)
STEPS = 5
CONFIGS = {
    "dcn_v2": {"features": {"embedding_dim": 16, "max_len": 12}, "history": {"attention_hidden": [8]},
               "num_cross_layers": 1, "deep_hidden": [16]},
    "gpsd": {"features": {"embedding_dim": 16, "max_len": 12},
             "backbone": {"num_layers": 2, "dim": 16, "num_heads": 2, "max_len": 32}},
}


def _map(offset: int) -> FeatureMap:
    """Vocabularies of the synthetic batches' sizes; ``offset`` shifts which raw items exist (and their ids)."""
    n_items = SYNTHETIC_VOCAB_SIZES["item_id"] - 2
    items = [f"m{k}" for k in range(offset, offset + n_items)]
    vocab = {"item_id": items[::-1] if offset else items,
             "category": [f"c{k}" for k in range(10)][::(-1 if offset else 1)],
             "action": ["1", "2", "3", "4", "5"]}
    return FeatureMap({n: Vocabulary(n, t, [1] * len(t)) for n, t in vocab.items()}, shared=SHARED)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    source_fm, target_fm = _map(50), _map(0)  # 150 of 200 items shared, in other id orders
    path, _ = write_pretrain_checkpoint(tmp_path_factory.mktemp("pretrain"), source_fm)
    return path, target_fm


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_ranker(name, CONFIGS[name], SYNTHETIC_VOCAB_SIZES, ("in_history",))


def train_steps(model, core, steps: int = STEPS) -> None:
    """The CTR trainer's step (BCE, backward with the fused table update, dense AdamW) on synthetic batches."""
    optimizer, _ = make_dense_optimizer(model, OPTIM, steps)
    g = torch.Generator().manual_seed(0)
    core.train()
    for _ in range(steps):
        batch = make_synthetic_batch(64, g)
        bce_per_task(core(batch), batch.labels).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def table_keys(state) -> list[str]:
    return [k for k in state if is_table_key(k)]


@pytest.mark.parametrize("name,strategy", [("dcn_v2", "st_sf"), ("gpsd", "ft_sf"), ("dcn_v2", "st")])
def test_frozen_tables_are_bit_identical_after_training_unsharded(setup, name, strategy):
    path, fm = setup
    model = build(name)
    report = apply_transfer(model, TransferConfig(strategy, path), fm)
    loaded = snapshot(model)
    model = prepare_for_training(model, OPTIM)  # in-backward optimizers: trainable tables only
    frozen = {t.replace(":", ".embeddings.") + ".weight" for t in report.frozen_tables}
    for key, param in model.named_parameters():
        assert hasattr(param, "_in_backward_optimizers") is (is_table_key(key) and key not in frozen), key
    train_steps(model, model)

    after = model.state_dict()
    tables = table_keys(after)
    assert len(frozen) == (3 if strategy.endswith("_sf") else 0)
    for key in tables:
        if key in frozen:
            assert torch.equal(after[key], loaded[key]), f"frozen {key} moved"
        else:
            assert not torch.equal(after[key], loaded[key]), f"trainable {key} did not move"
    dense = [k for k in after if k not in tables]
    assert any(not torch.equal(after[k], loaded[k]) for k in dense)


def test_frozen_tables_are_bit_identical_under_dmp(setup):
    path, fm = setup
    with one_rank_group() as ctx:
        model = build("dcn_v2")
        report = apply_transfer(model, TransferConfig("st_sf", path, new_rows="zero"), fm)
        loaded = snapshot(model)
        apply_sparse_optimizer(embedding_modules(model), OPTIM)
        dmp = shard_model(model, ctx)

        state = dmp.state_dict()
        frozen = {t.replace(":", ".embeddings.") + ".weight" for t in report.frozen_tables}
        assert len(frozen) == 3 and set(table_keys(state)) == set(table_keys(loaded))
        for key in table_keys(state):  # every table kept its values through sharding (transferred or not)
            assert torch.equal(local_table(state[key]), loaded[key]), key
        lr = {k: g["lr"] for g in dmp.fused_optimizer.param_groups for k, p in dmp.fused_optimizer.params.items()
              if any(p is q for q in g["params"])}
        assert all(lr[k] == 0.0 for k in frozen) and lr["input.features.ec.embeddings.t_user_id.weight"] > 0
        assert not any(k in frozen for k, _ in dmp.named_parameters() if any(p is _ for p in dense_parameters(dmp)))

        train_steps(dmp, dmp.module)
        after = dmp.state_dict()
        for key in table_keys(after):
            moved = not torch.equal(local_table(after[key]), loaded[key])
            assert moved is (key not in frozen), key

        # an already sharded model: values go into its shards; it cannot be frozen after the fact
        fresh = build("dcn_v2", seed=1)
        apply_sparse_optimizer(embedding_modules(fresh), OPTIM)
        sharded = shard_model(fresh, ctx)
        report = apply_transfer(sharded, TransferConfig("st", path, new_rows="zero"), fm)
        assert report.sharded and len(report.loaded_tables) == 3
        state = sharded.state_dict()
        for key in frozen:  # every row but padding (which keeps each model's own row)
            assert torch.equal(local_table(state[key])[1:], loaded[key][1:]), key
        with pytest.raises(TransferError, match=r"already sharded and trained by DMP's fused optimizer \(lr=0\.1\); "
                                                r"a table can only be frozen before sharding"):
            apply_transfer(sharded, TransferConfig("st_sf", path), fm)

        # why shard_model sets lr-0 defaults: with TorchRec's default sharders a table that has no optimizer
        # is still updated by FBGEMM's default (SGD, lr 0.01)
        plain = build("dcn_v2", seed=2)
        apply_transfer(plain, TransferConfig("st_sf", path), fm)
        before = snapshot(plain)["input.features.ec.embeddings.t_item_id.weight"]
        apply_sparse_optimizer(embedding_modules(plain), OPTIM)
        sharders = [EmbeddingCollectionSharder(), EmbeddingBagCollectionSharder()]
        plan = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device="cpu")).collective_plan(
            plain, sharders, torch.distributed.GroupMember.WORLD)
        naive = DistributedModelParallel(plain, device=torch.device("cpu"), plan=plan, sharders=sharders)
        with pytest.raises(TransferError, match="t_item_id is frozen but gets DMP's default fused optimizer"):
            train_steps(naive, naive.module, steps=1)   # hybrid.adapters.guard stops it at the first forward
        train_steps(naive, naive.module, steps=1)       # (the guard looks once) and what it prevents:
        moved = local_table(naive.state_dict()["input.features.ec.embeddings.t_item_id.weight"])
        assert not torch.equal(moved, before)
