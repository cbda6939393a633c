"""Sharded tables under 2 gloo ranks: every table keeps the optimizer it was configured with, and a transfer
that one rank cannot do fails on both ranks with the same clear line instead of hanging.

* TorchRec's planner, left free, places small tables ``data_parallel`` — a dense kernel with no fused
  optimizer, which the dense AdamW then steps with the dense lr and weight decay. ``shard_model`` forbids
  that: every table of a tiny DCN-v2 is planned with a fused kernel and its configured table optimizer
  (Adagrad, ``sparse_lr``) on the rank(s) that hold it, and a request for ``data_parallel`` is refused.
* ST&SF into an already sharded model cannot freeze a table DMP already trains; with ``table_wise`` tables
  only one rank holds each table, and the other would see nothing wrong and enter the collective read alone.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from adapters_support import one_rank_group, one_thread, source_and_target_maps  # noqa: F401 (autouse fixture)
from torchrun_support import run_torchrun

from hybrid.core.training import OptimConfig, apply_sparse_optimizer, shard_model
from hybrid.ctr_models import DCNv2Config, build_ranker
from hybrid.ctr_models.trainer import embedding_modules

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent('''
    """Runs under torchrun --nproc_per_node=2: argv = out dir, pretraining checkpoint dir, repo."""
    import json, sys
    from pathlib import Path
    out, checkpoint, repo = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    sys.path[:0] = [repo, repo + "/tests"]
    import torch, torch.distributed as dist
    from adapters_support import source_and_target_maps
    from hybrid.adapters import TransferConfig, TransferError, apply_transfer
    from hybrid.core.training import OptimConfig, init_distributed
    from hybrid.ctr_models import DCNv2Config, GPSDRankerConfig, build_ranker
    from hybrid.ctr_models.trainer import prepare_for_training

    torch.set_num_threads(1)
    ctx = init_distributed()
    _, tgt_fm = source_and_target_maps()
    optim = OptimConfig(lr=1e-2, weight_decay=0.1, warmup_steps=0, schedule="constant",
                        sparse_optimizer="adagrad", sparse_lr=0.25)
    result = {}

    # 1. default plan of a tiny DCN-v2: sharding type of every table, and its fused optimizer's lr here
    torch.manual_seed(0)
    dmp = prepare_for_training(build_ranker("dcn_v2", DCNv2Config.tiny(), tgt_fm.vocab_sizes(), ("click",)),
                               optim, ctx=ctx)
    result["types"] = {table: str(p.sharding_type) for plan in dmp.plan.plan.values() for table, p in plan.items()}
    fused = dmp.fused_optimizer
    lrs = {}
    for key, param in fused.params.items():
        lrs[key] = next(float(g["lr"]) for g in fused.param_groups if any(p is param for p in g["params"]))
    result["fused_lr"] = lrs

    # 2. ST&SF into a model whose tables are already sharded table-wise (and trained by DMP)
    torch.manual_seed(0)
    gpsd = build_ranker("gpsd", GPSDRankerConfig.tiny(), tgt_fm.vocab_sizes(), ("click",))
    dmp = prepare_for_training(gpsd, optim, ctx=ctx, sharding_types={
        "t_item_id": "table_wise", "t_category": "table_wise", "t_action": "table_wise"})
    result["local_shards"] = {k: len(v.local_shards()) for k, v in dmp.state_dict().items()
                              if hasattr(v, "local_shards")}
    try:
        # the item table only (GPSD's public ST&SF recipe): the rank that holds none of it sees no problem
        apply_transfer(dmp, TransferConfig("st_sf", checkpoint, tables=("t_item_id",)), tgt_fm)
        result["transfer_error"] = None
    except TransferError as err:
        result["transfer_error"] = str(err)
    dist.barrier()   # both ranks got here: nobody hangs in the collective read
    with open(out / f"result{ctx.rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
''')


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_keep_every_table_optimizer_and_agree_on_a_refused_transfer(tmp_path):
    from adapters_support import write_pretrain_checkpoint

    src_fm, _ = source_and_target_maps()
    checkpoint, _ = write_pretrain_checkpoint(tmp_path / "pretrain", src_fm)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    done = run_torchrun([script, tmp_path, checkpoint, REPO], timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(2)]

    # no data_parallel table: each one is held by a fused kernel carrying the configured Adagrad lr 0.25
    types = results[0]["types"]
    assert set(types) == {"t_item_id", "t_category", "t_user_id", "t_action"}, types
    assert all("data_parallel" not in t for t in types.values()), types
    held = {key.split(".")[-2] for r in results for key in r["fused_lr"]}
    assert held == set(types), (held, results)
    assert all(lr == 0.25 for r in results for lr in r["fused_lr"].values()), results

    # the transfer: each table lives on one rank only, yet both ranks refuse with the same table problem
    shards = [r["local_shards"] for r in results]
    assert all(sorted((a[k], b[k])) == [0, 1] for a, b in [shards] for k in a), shards
    messages = [r["transfer_error"] for r in results]
    assert all(m and "ST&SF freezes" in m and "already sharded and trained by DMP" in m for m in messages), messages
    holder = [r for r in range(2) if shards[r]["features.ec.embeddings.t_item_id.weight"] == 1][0]
    assert "t_item_id" in messages[holder] and not messages[holder].startswith("rank "), messages
    assert messages[1 - holder] == f"rank {holder}: {messages[holder]}", messages


def test_a_data_parallel_request_is_refused_before_sharding(tmp_path):
    _, tgt_fm = source_and_target_maps()
    model = build_ranker("dcn_v2", DCNv2Config.tiny(), tgt_fm.vocab_sizes(), ("click",))
    apply_sparse_optimizer(embedding_modules(model), OptimConfig())
    with one_rank_group() as ctx:
        with pytest.raises(ValueError, match="table t_category would lose its table optimizer.*data_parallel"):
            shard_model(model, ctx, {"t_category": "data_parallel"})
        model.input.features.ec.embeddings["t_action"].weight.requires_grad_(False)
        with pytest.raises(ValueError, match="table t_action is frozen"):
            shard_model(model, ctx, {"t_action": "data_parallel"})
