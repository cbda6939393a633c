"""Resharding: a pretraining checkpoint written by 2 ranks (gloo, row-wise item table) loads into an
unsharded and a 1-rank DMP model, and a checkpoint written by one process loads into a model sharded over 2
ranks — before sharding (then carried into the shards) and after — with identical table values. The 2-rank
model also trains with its transferred tables frozen, and they stay bit-identical on both ranks.

Ground truth never goes through DCP: the 2-rank side dumps each rank's local shards, and expected target
rows come from the in-memory pretrained model through a raw-id dict lookup.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from adapters_support import (
    local_table,
    one_rank_group,
    one_thread,  # noqa: F401 (autouse fixture)
    raw_alignment,
    snapshot,
    source_and_target_maps,
    write_pretrain_checkpoint,
)
from torchrun_support import run_torchrun

from hybrid.adapters import TransferConfig, apply_transfer
from hybrid.core.training import OptimConfig, apply_sparse_optimizer, shard_model
from hybrid.ctr_models import GPSDRankerConfig, build_ranker
from hybrid.ctr_models.trainer import embedding_modules

REPO = Path(__file__).resolve().parents[1]
TABLES = ("t_item_id", "t_category", "t_action")

WORKER = textwrap.dedent('''
    """Runs under torchrun --nproc_per_node=2: argv = out dir, single-process checkpoint dir, repo."""
    import json, sys
    from pathlib import Path
    out, single_ckpt, repo = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    sys.path[:0] = [repo, repo + "/tests"]
    import torch, torch.distributed as dist
    from hybrid.adapters import TransferConfig, apply_transfer
    from adapters_support import random_ctr_batch, source_and_target_maps
    from hybrid.ctr_models import GPSDRankerConfig, build_ranker
    from hybrid.ctr_models.trainer import bce_per_task, prepare_for_training
    from hybrid.core.checkpoint import save_checkpoint
    from hybrid.core.training import OptimConfig, average_dense_gradients, dense_parameters, init_distributed
    from hybrid.core.training import make_dense_optimizer
    from hybrid.pretrain import GenerativeModelConfig, build_model

    torch.set_num_threads(1)
    ctx = init_distributed()
    src_fm, tgt_fm = source_and_target_maps()
    optim = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", sparse_optimizer="adagrad", sparse_lr=0.1)
    result = {}

    # 1. a pretraining model sharded over the 2 ranks writes a checkpoint; each rank dumps its shards
    config = GenerativeModelConfig.tiny()
    pre = build_model(config, src_fm.vocab_sizes(), optim, seed=0, ctx=ctx)
    state = pre.state_dict()
    path = save_checkpoint(out / "two_rank", 1, {"model": state},
                           {"feature_map": src_fm.to_dict(), "model": config.to_dict(), "mlflow_run_id": "two-rank"})
    shards = {k: [(list(s.metadata.shard_offsets), s.tensor.clone()) for s in v.local_shards()]
              for k, v in state.items() if hasattr(v, "local_shards")}
    dense = {k: v.clone() for k, v in state.items() if not hasattr(v, "local_shards")}
    torch.save({"shards": shards, "dense": dense, "plan": str(pre.plan)}, out / f"rank{ctx.rank}.pt")
    result["checkpoint"] = str(path)

    # 2. the single-process checkpoint into a ranker sharded over the 2 ranks
    expected = torch.load(out / "expected.pt")

    def rows_match(model, key):
        table = model.state_dict()[key]
        ok = True
        for shard in table.local_shards():
            r0, c0 = shard.metadata.shard_offsets
            block = shard.tensor
            want = expected[key][r0:r0 + block.shape[0], c0:c0 + block.shape[1]]
            start = 1 if r0 == 0 else 0  # padding keeps each model's own row
            ok &= torch.equal(block[start:], want[start:])
        return ok

    def ranker():
        torch.manual_seed(0)
        return build_ranker("gpsd", GPSDRankerConfig.tiny(), tgt_fm.vocab_sizes(), ("click",))

    # (a) loaded into the shards of an already sharded model (FT: tables + backbone)
    sharded = prepare_for_training(ranker(), optim, ctx=ctx)
    apply_transfer(sharded, TransferConfig("ft", single_ckpt, new_rows="zero"), tgt_fm)
    result["after_sharding"] = {k: rows_match(sharded, k) for k in expected if k.startswith("features.")}
    result["after_sharding_backbone"] = all(torch.equal(v, expected[k]) for k, v in sharded.state_dict().items()
                                            if k.startswith("backbone."))
    result["plan"] = str(sharded.plan)

    # (b) loaded (and frozen) before sharding, carried into the shards; then 3 training steps
    model = ranker()
    apply_transfer(model, TransferConfig("st_sf", single_ckpt, new_rows="zero"), tgt_fm)
    dmp = prepare_for_training(model, optim, ctx=ctx)
    result["before_sharding"] = {k: rows_match(dmp, k) for k in expected if k.startswith("features.")}
    before = {k: [s.tensor.clone() for s in v.local_shards()] for k, v in dmp.state_dict().items()
              if hasattr(v, "local_shards")}
    dense_before = [p.detach().clone() for p in dense_parameters(dmp)]
    optimizer, _ = make_dense_optimizer(dmp, optim, 3)
    g = torch.Generator().manual_seed(10 + ctx.rank)
    for _ in range(3):
        batch = random_ctr_batch(tgt_fm.vocab_sizes(), 16, g)
        bce_per_task(dmp.module(batch), batch.labels).sum().backward()
        average_dense_gradients(dense_parameters(dmp), ctx.world_size)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = dmp.state_dict()
    result["frozen_identical"] = {k: all(torch.equal(a.tensor, b) for a, b in zip(after[k].local_shards(), before[k]))
                                  for k in before}
    result["local_shards"] = {k: len(v) for k, v in before.items()}
    result["dense_moved"] = any(not torch.equal(p, q) for p, q in zip(dense_parameters(dmp), dense_before))
    with open(out / f"result{ctx.rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
''')


def _expected(src_fm, tgt_fm, source_state, prefix="features.ec.embeddings"):
    """Target table values for rows >= 1 (new_rows="zero"): the pretrained row of the same raw id, else 0."""
    out = {}
    for table in TABLES:
        src = source_state[f"embeddings.embeddings.{table}.weight"]
        mapping = raw_alignment(tgt_fm, src_fm, table[2:])
        full = torch.zeros(tgt_fm[table[2:]].size, src.shape[1])
        for t, s in mapping.items():
            full[t] = src[s]
        out[f"{prefix}.{table}.weight"] = full
    out.update({k: v.clone() for k, v in source_state.items() if k.startswith("backbone.")})
    return out


def _assemble(dumps) -> dict[str, torch.Tensor]:
    """Full tables from every rank's local shards (offsets as TorchRec wrote them)."""
    tables: dict[str, torch.Tensor] = {}
    for dump in dumps:
        for key, shards in dump["shards"].items():
            for (r0, c0), tensor in shards:
                rows, cols = r0 + tensor.shape[0], c0 + tensor.shape[1]
                full = tables.setdefault(key, torch.full((0, 0), float("nan")))
                if full.shape[0] < rows or full.shape[1] < cols:
                    grown = torch.full((max(rows, full.shape[0]), max(cols, full.shape[1])), float("nan"))
                    grown[:full.shape[0], :full.shape[1]] = full
                    full = tables[key] = grown
                full[r0:rows, c0:cols] = tensor
    return tables


@pytest.mark.slow
@pytest.mark.distributed
def test_checkpoints_reshard_between_two_ranks_one_rank_and_unsharded(tmp_path):
    src_fm, tgt_fm = source_and_target_maps()
    single_ckpt, single_model = write_pretrain_checkpoint(tmp_path / "single", src_fm)
    torch.save(_expected(src_fm, tgt_fm, single_model.state_dict()), tmp_path / "expected.pt")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    done = run_torchrun([script, tmp_path, single_ckpt, REPO], timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]

    # unsharded checkpoint → 2-rank sharded ranker, after and before sharding; frozen tables hold on both ranks
    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert all(r["after_sharding"].values()) and len(r["after_sharding"]) == 3, r["after_sharding"]
        assert r["after_sharding_backbone"]
        assert all(r["before_sharding"].values()), r["before_sharding"]
        assert all(r["frozen_identical"].values()) and len(r["frozen_identical"]) == 3, r["frozen_identical"]
        assert r["dense_moved"]
    assert "t_item_id  | row_wise" in results[0]["plan"]
    assert results[0]["local_shards"]["features.ec.embeddings.t_item_id.weight"] == 1  # each rank holds a part
    assert results[1]["local_shards"]["features.ec.embeddings.t_item_id.weight"] == 1

    # 2-rank checkpoint → unsharded and 1-rank DMP models, compared with the shards the ranks dumped
    dumps = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert "t_item_id  | row_wise" in dumps[0]["plan"]
    truth = {k.removeprefix("embeddings.embeddings."): v for k, v in _assemble(dumps).items()}
    assert all(not torch.isnan(v).any() for v in truth.values()) and set(truth) == {f"{t}.weight" for t in TABLES}
    assert [len(d["shards"]["embeddings.embeddings.t_item_id.weight"]) for d in dumps] == [1, 1]
    pretrained = {f"embeddings.embeddings.{k}": v for k, v in truth.items()} | dumps[0]["dense"]
    expected = _expected(src_fm, tgt_fm, pretrained)
    checkpoint = Path(results[0]["checkpoint"])

    torch.manual_seed(0)
    plain = build_ranker("gpsd", GPSDRankerConfig.tiny(), tgt_fm.vocab_sizes(), ("click",))
    before = snapshot(plain)
    report = apply_transfer(plain, TransferConfig("ft", checkpoint, new_rows="zero"), tgt_fm)
    assert report.pretrain_run_id == "two-rank"
    state = plain.state_dict()
    for key, value in expected.items():
        if key.startswith("backbone."):
            assert torch.equal(state[key], value), key
        else:
            assert torch.equal(state[key][1:], value[1:]) and torch.equal(state[key][0], before[key][0]), key

    with one_rank_group() as ctx:
        torch.manual_seed(0)
        model = build_ranker("gpsd", GPSDRankerConfig.tiny(), tgt_fm.vocab_sizes(), ("click",))
        apply_sparse_optimizer(embedding_modules(model), OptimConfig())
        dmp = shard_model(model, ctx)
        apply_transfer(dmp, TransferConfig("ft", checkpoint, new_rows="zero"), tgt_fm)
        state = dmp.state_dict()
        for key, value in expected.items():
            got = local_table(state[key])
            assert torch.equal(got if key.startswith("backbone.") else got[1:],
                               value if key.startswith("backbone.") else value[1:]), key
