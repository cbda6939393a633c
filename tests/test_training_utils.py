"""Shared training plumbing: schedule, dense/sparse optimizer split, frozen tables under fused optimizers,
which modules and state-dict keys are embedding tables."""
import math

import pytest
import torch
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
)

from hybrid.core.tables import embedding_modules, is_table_key, table_parameters
from hybrid.core.training import (
    OptimConfig,
    apply_sparse_optimizer,
    dense_parameters,
    make_dense_optimizer,
    warmup_cosine,
)


def test_warmup_cosine_shape():
    f = warmup_cosine(10, 110, min_ratio=0.1)
    assert [round(f(s), 3) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert warmup_cosine(0, 100, schedule="constant")(50) == 1.0


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ec = EmbeddingCollection(tables=[
            EmbeddingConfig(name="t_item_id", embedding_dim=4, num_embeddings=10, feature_names=["item_id"]),
            EmbeddingConfig(name="t_category", embedding_dim=4, num_embeddings=5, feature_names=["category"])])
        self.head = torch.nn.Linear(4, 1)

    def forward(self, kjt):
        out = self.ec(kjt)
        return self.head(out["item_id"].values() + out["category"].values()).pow(2).mean()


@pytest.mark.parametrize("sparse", ["adagrad", "rowwise_adagrad", "sgd", "adam"])
def test_sparse_tables_update_in_backward_and_frozen_ones_do_not(sparse):
    torch.manual_seed(0)
    model = Tiny()
    model.ec.embeddings["t_category"].weight.requires_grad_(False)        # a frozen table
    cfg = OptimConfig(lr=0.1, sparse_optimizer=sparse)
    owned = apply_sparse_optimizer([model.ec], cfg)
    assert owned == [model.ec.embeddings["t_item_id"].weight]
    assert set(map(id, dense_parameters(model))) == {id(model.head.weight), id(model.head.bias)}
    dense, schedule = make_dense_optimizer(model, cfg, total_steps=10)
    item0 = model.ec.embeddings["t_item_id"].weight.detach().clone()
    cat0 = model.ec.embeddings["t_category"].weight.detach().clone()
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["item_id", "category"], values=torch.tensor([1, 2, 3, 1, 2, 3]),
                                              lengths=torch.tensor([1, 2, 1, 2]))
    for _ in range(3):
        model(kjt).backward()
        dense.step()
        dense.zero_grad()
        schedule.step()
    item1 = model.ec.embeddings["t_item_id"].weight
    assert not torch.equal(item1[1:4], item0[1:4])                        # updated in backward
    assert torch.equal(item1[4:], item0[4:])                               # untouched rows stay
    assert torch.equal(model.ec.embeddings["t_category"].weight, cat0)    # frozen: bit-identical
    assert model.ec.embeddings["t_item_id"].weight.grad is None           # consumed by the fused step


def test_optim_config_errors():
    with pytest.raises(ValueError, match="optim.lr must be positive"):
        OptimConfig(lr=0)


def test_embedding_tables_are_found_as_modules_parameters_and_state_dict_keys():
    model = Tiny()
    model.experts = torch.nn.ModuleList([EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="t_genres", embedding_dim=4, num_embeddings=6, feature_names=["genres"])])])
    assert embedding_modules(model) == [model.ec, model.experts[0]]
    assert [(path, name) for path, name, _ in table_parameters(model)] == [
        ("ec", "t_item_id"), ("ec", "t_category"), ("experts.0", "t_genres")]
    table_ids = {id(p) for m in embedding_modules(model) for p in m.parameters()}
    assert table_ids == {id(w) for _, _, w in table_parameters(model)}
    assert sorted(k for k in model.state_dict() if is_table_key(k)) == [
        "ec.embeddings.t_category.weight", "ec.embeddings.t_item_id.weight",
        "experts.0.embedding_bags.t_genres.weight"]
