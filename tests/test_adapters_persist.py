"""What a transfer owns survives a fresh model (save_transfer / load_transfer), and sharding a transferred model
with a plain DistributedModelParallel — the TorchRec tutorials' way, which re-initialises or trains the
transferred tables — stops at the first forward with one line, while ``hybrid.adapters.shard_model`` runs."""
from __future__ import annotations

import pytest
import torch
from adapters_support import (
    one_rank_group,
    one_thread,  # noqa: F401 (autouse fixture)
    random_ctr_batch,
    snapshot,
    source_and_target_maps,
    write_pretrain_checkpoint,
)
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from hybrid.adapters import (
    TableTarget,
    TransferConfig,
    TransferError,
    apply_transfer,
    load_transfer,
    save_transfer,
    shard_model,
)
from hybrid.core.errors import HybridInputError
from hybrid.core.training import OptimConfig, apply_sparse_optimizer
from hybrid.ctr_models import GPSDRankerConfig, build_ranker
from hybrid.ctr_models.trainer import embedding_modules


def _ranker(fm, seed):
    torch.manual_seed(seed)
    return build_ranker("gpsd", GPSDRankerConfig.tiny(), fm.vocab_sizes(), ("click",))


@pytest.fixture
def transferred(tmp_path):
    src_fm, tgt_fm = source_and_target_maps()
    checkpoint, _ = write_pretrain_checkpoint(tmp_path / "pretrain", src_fm)
    return checkpoint, tgt_fm


@pytest.mark.parametrize("strategy", ["st_sf", "ft_sf"])
def test_a_saved_transfer_reapplies_values_freezing_and_report_to_a_fresh_model(tmp_path, transferred, strategy):
    checkpoint, fm = transferred
    model = _ranker(fm, 0)
    report = apply_transfer(model, TransferConfig(strategy, checkpoint, new_rows="mean"), fm)
    save_transfer(model, report, tmp_path / "saved")

    fresh = _ranker(fm, 1)
    own = snapshot(fresh)
    loaded = load_transfer(fresh, tmp_path / "saved")
    assert loaded.to_dict() == report.to_dict()
    want, got = model.state_dict(), fresh.state_dict()
    owned = {k for k in want if k.startswith("features.") or (strategy == "ft_sf" and k.startswith("backbone."))}
    assert owned and all(torch.equal(got[k], want[k]) for k in owned)
    others = [k for k in got if k not in owned]
    assert others and all(torch.equal(got[k], own[k]) for k in others)   # what the transfer does not own
    frozen = {n for n, p in fresh.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, p in model.named_parameters() if not p.requires_grad} and frozen


def test_loading_a_transfer_refuses_what_does_not_fit(tmp_path, transferred):
    checkpoint, fm = transferred
    model = _ranker(fm, 0)
    save_transfer(model, apply_transfer(model, TransferConfig("st_sf", checkpoint), fm), tmp_path / "saved")
    with pytest.raises(TransferError, match="not a saved transfer"):
        load_transfer(_ranker(fm, 0), checkpoint)                  # a pretraining checkpoint
    with pytest.raises(TransferError, match="no saved transfer"):
        load_transfer(_ranker(fm, 0), tmp_path / "nothing")
    bigger = build_ranker("gpsd", GPSDRankerConfig.tiny(), {**fm.vocab_sizes(), "item_id": 99}, ("click",))
    with pytest.raises(HybridInputError, match=r"t_item_id.*\(52, 16\) vs model \(99, 16\)"):
        load_transfer(bigger, tmp_path / "saved")


class MyCTR(nn.Module):
    """The README's own model: an EmbeddingBagCollection and an MLP (what a user shards with plain DMP)."""

    def __init__(self, fm):
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name="t_item_id", embedding_dim=16, num_embeddings=fm.vocab_sizes()["item_id"], feature_names=["item"])])
        self.mlp = nn.Linear(16, 1)

    def forward(self, kjt):
        return self.mlp(self.ebc(kjt)["item"])


def _items(fm, n=16):
    ids = torch.randint(2, fm.vocab_sizes()["item_id"], (n,), generator=torch.Generator().manual_seed(0))
    return KeyedJaggedTensor.from_lengths_sync(keys=["item"], values=ids, lengths=torch.ones(n, dtype=torch.long))


@pytest.mark.parametrize("strategy", ["st_sf", "st"])
def test_a_plain_dmp_that_undoes_the_transfer_stops_at_the_first_forward(transferred, strategy):
    from torchrec.distributed.model_parallel import DistributedModelParallel

    checkpoint, fm = transferred
    with one_rank_group() as ctx:
        torch.manual_seed(0)
        model = MyCTR(fm)
        apply_transfer(model, TransferConfig(strategy, checkpoint, table_map={"t_item_id": TableTarget(
            "ebc:t_item_id", feature="item_id")}), fm)
        apply_sparse_optimizer(embedding_modules(model), OptimConfig())
        dmp = DistributedModelParallel(model, device=ctx.device)   # re-initialises the bag collection
        with pytest.raises(TransferError) as err:
            dmp(_items(fm))
        message = str(err.value)
        assert "plain DistributedModelParallel" in message and "hybrid.adapters.shard_model" in message
        assert "ebc:t_item_id no longer holds the transferred values" in message and "\n" not in message


def test_shard_model_keeps_the_transfer_and_runs(transferred):
    checkpoint, fm = transferred
    with one_rank_group() as ctx:
        model = _ranker(fm, 0)
        apply_transfer(model, TransferConfig("st_sf", checkpoint), fm)
        apply_sparse_optimizer(embedding_modules(model), OptimConfig())
        dmp = shard_model(model, ctx)
        batch = random_ctr_batch(fm.vocab_sizes(), 8, torch.Generator().manual_seed(0))
        assert dmp.module(batch).shape == (8, 1)
        # an unsharded transferred model runs too (the guard only looks once, and only at sharded tables)
        plain = _ranker(fm, 0)
        apply_transfer(plain, TransferConfig("st_sf", checkpoint), fm)
        assert plain(batch).shape == (8, 1) and not plain._forward_pre_hooks


def test_a_plain_dmp_that_would_train_a_frozen_table_stops_too(transferred):
    from torchrec.distributed.model_parallel import DistributedModelParallel

    checkpoint, fm = transferred
    with one_rank_group() as ctx:
        model = _ranker(fm, 0)   # EmbeddingCollection on CPU: DMP copies its values, but trains frozen tables
        apply_transfer(model, TransferConfig("st_sf", checkpoint, tables=("t_item_id",)), fm)
        apply_sparse_optimizer(embedding_modules(model), OptimConfig())
        dmp = DistributedModelParallel(model, device=ctx.device)
        batch = random_ctr_batch(fm.vocab_sizes(), 8, torch.Generator().manual_seed(0))
        with pytest.raises(TransferError, match=r"features.ec:t_item_id is frozen but gets DMP's default fused "
                                                r"optimizer \(it would train\)\. Shard it with hybrid.adapters"):
            dmp.module(batch)
