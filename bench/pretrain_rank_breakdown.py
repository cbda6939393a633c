"""Issue 18.3: where a 2-rank pretraining step spends its time, against 1 rank on the same global batches.

The pretraining config (default ``configs/pretrain_ml1m_last_item_llama.yaml``: L4H64A4, batch 128, max_len 200,
1024 negatives, adagrad tables) on its prepared data, each variant in its own process group, 1 thread per rank:

- **1 rank**: one process, the tables unsharded (what ``hybrid pretrain`` runs in one process);
- **2 ranks, dealt** (today's sampler): each global batch of 128 is dealt round-robin over its length-sorted
  samples, 64 to each rank — both ranks get the same mix of lengths;
- **2 ranks, whole batches** (the sampler before): every other per-rank batch of 64 to each rank, so at one step
  one rank may hold a bucket of short sequences and the other a bucket of long ones.

Every variant trains on the same global batches (the 1-rank run's), in the same order. The step is timed in
phases, per rank: ``lookup`` (the one collection lookup: KJT input all-to-all, FBGEMM lookups, output
all-to-all when sharded), ``forward`` (the rest of the loss: tokens, backbone, sampled softmax),
``backward`` (autograd, with the tables' fused update and, sharded, the gradient all-to-all — where a rank that
finished its own work waits for the slower one), ``allreduce`` (dense gradients, one flat buffer) and
``optimizer`` (clip + AdamW). ``imbalance`` is the median over steps of (slower rank's lookup + forward) /
(faster rank's). Throughput = real (non-padding) events of the global batch per second of the slowest rank.

The variants' windows alternate (``--repeats`` rounds, each variant once a round, in a fresh process group);
figures are medians over rounds of each round's median step.

    python bench/pretrain_rank_breakdown.py [--data runs/ml1m/last-item] [--steps 12] [--repeats 3]
        [--out bench/results/pretrain_rank_breakdown.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("lookup", "forward", "backward", "allreduce", "optimizer", "step")
VARIANTS = {"1_rank": (1, "dealt"), "2_ranks_dealt": (2, "dealt"), "2_ranks_whole_batches": (2, "whole")}


# ------------------------------------------------------------------------------------------- one process

def rank_batches(sampler_cls, lengths, global_batch: int, world: int, rank: int, deal: str, seed: int):
    """This rank's sample indices per step: the 1-rank run's global batches, dealt or split the old way."""
    if deal == "dealt":
        return list(sampler_cls(lengths, global_batch // world, seed=seed, num_replicas=world, rank=rank))
    # the sampler before: per-rank batches formed like a 1-rank run's, every W-th one to a rank
    per_rank = sampler_cls(lengths, global_batch // world, seed=seed).global_batches()
    per_rank = per_rank[:len(per_rank) - len(per_rank) % world]
    return [b.tolist() for b in per_rank[rank::world]]


def child(args) -> None:
    """Runs inside ``torchrun`` (or alone): times ``args.steps`` steps after ``args.warmup``; prints JSON."""
    sys.path.insert(0, str(REPO))
    import torch
    import torch.distributed as dist

    from hybrid.config import load_config
    from hybrid.core.training import dense_parameters, init_distributed, make_dense_optimizer
    from hybrid.data.batching import BucketBatchSampler, SequenceBatchConverter
    from hybrid.data.store import open_prepared
    from hybrid.jobs.pretrain import SEQUENCE_FEATURES, PretrainConfig
    from hybrid.pretrain.trainer import average_dense_gradients, build_model, unwrap

    torch.set_num_threads(1)
    cfg = load_config(PretrainConfig, args.config, [f"data={args.data}"])
    ctx = init_distributed()
    prepared = open_prepared(cfg.data)
    fm = prepared.feature_map
    available = [f for f in SEQUENCE_FEATURES if f in prepared.events and f in fm]
    model_cfg = cfg.model.build(cfg.train.max_len, available)
    model = build_model(model_cfg, fm.vocab_sizes(), cfg.train.optim, seed=cfg.train.seed, ctx=ctx)
    core = unwrap(model)
    dense = dense_parameters(model)
    optimizer, schedule = make_dense_optimizer(model, cfg.train.optim, 10**6)
    converter = SequenceBatchConverter(prepared, "pretrain_train", max_len=cfg.train.max_len,
                                       features=list(model_cfg.features))
    indices = rank_batches(BucketBatchSampler, converter.sequence_lengths(), cfg.train.batch_size, ctx.world_size,
                           ctx.rank, args.deal, cfg.train.seed)
    generator = torch.Generator().manual_seed(cfg.train.seed + ctx.rank)

    lookup_seconds: list[float] = []
    plain_lookup = core._lookup

    def timed_lookup(*a, **k):
        start = time.perf_counter()
        out = plain_lookup(*a, **k)
        lookup_seconds.append(time.perf_counter() - start)
        return out

    core._lookup = timed_lookup
    rows = []
    for i in range(args.warmup + args.steps):
        batch = converter.__getitems__(indices[i % len(indices)])
        t0 = time.perf_counter()
        losses = core.loss(batch, generator=generator)
        t1 = time.perf_counter()
        losses["loss"].backward()
        t2 = time.perf_counter()
        if ctx.is_distributed:
            average_dense_gradients(dense, ctx.world_size)
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(dense, cfg.train.optim.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        t4 = time.perf_counter()
        if i >= args.warmup:
            lookup = lookup_seconds[-1]
            rows.append({"lookup": lookup, "forward": t1 - t0 - lookup, "backward": t2 - t1, "allreduce": t3 - t2,
                         "optimizer": t4 - t3, "step": t4 - t0, "events": int(batch.lengths.sum()),
                         "longest": int(batch.lengths.max())})
    gathered = [rows]
    if ctx.is_distributed:
        gathered = [None] * ctx.world_size
        dist.all_gather_object(gathered, rows)
    if ctx.rank == 0:
        print("RESULT " + json.dumps(gathered), flush=True)
    if ctx.is_distributed:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- the driver

def run_variant(args, name: str) -> dict:
    world, deal = VARIANTS[name]
    me = [str(Path(__file__).resolve()), "--child", "--deal", deal, "--data", args.data, "--config", args.config,
          "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *me]
           if world > 1 else [sys.executable, *me])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-4000:]}")
    ranks = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    steps = len(ranks[0])
    # a step takes as long as its slowest rank; the global batch's events are the ranks' sum
    step = [max(r[i]["step"] for r in ranks) for i in range(steps)]
    events = [sum(r[i]["events"] for r in ranks) for i in range(steps)]
    out = {"seconds_per_step": statistics.median(step), "events_per_s": sum(events) / sum(step)}
    for phase in PHASES[:-1]:  # per phase, the rank-mean of each step, median over steps
        out[phase] = statistics.median(statistics.mean(r[i][phase] for r in ranks) for i in range(steps))
    if world > 1:
        work = [[r[i]["lookup"] + r[i]["forward"] for r in ranks] for i in range(steps)]
        out["imbalance"] = statistics.median(max(w) / min(w) for w in work)
        out["longest_sequence_gap"] = statistics.median(
            max(r[i]["longest"] for r in ranks) - min(r[i]["longest"] for r in ranks) for i in range(steps))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="runs/ml1m/last-item", help="prepared protocol-A directory")
    parser.add_argument("--config", default=str(REPO / "configs" / "pretrain_ml1m_last_item_llama.yaml"))
    parser.add_argument("--steps", type=int, default=12, help="timed steps per window")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each runs every variant once")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "pretrain_rank_breakdown.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--deal", choices=["dealt", "whole"], default="dealt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.data = str(Path(args.data).resolve())
    if args.child:
        child(args)
        return

    rounds: dict[str, list[dict]] = {v: [] for v in args.variants}
    for r in range(args.repeats):
        for name in args.variants:  # alternate: noise hits every variant alike
            rounds[name].append(run_variant(args, name))
            print(f"round {r + 1}: {name} {rounds[name][-1]['seconds_per_step']:.3f} s/step", file=sys.stderr)
    results = {name: {key: statistics.median(w[key] for w in ws) for key in ws[0]} for name, ws in rounds.items()}
    for name, ws in rounds.items():
        results[name]["rounds_seconds_per_step"] = [round(w["seconds_per_step"], 4) for w in ws]
    base = results.get("1_rank")
    if base:
        for name, row in results.items():
            row["throughput_over_1_rank"] = row["events_per_s"] / base["events_per_s"]
    report = {"benchmark": "18.3 pretraining step breakdown, 1 vs 2 ranks", "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, 1 thread per rank",
              "data": args.data, "config": args.config, "steps": args.steps, "repeats": args.repeats,
              "results": results}
    print(f"{'variant':22} {'s/step':>7} {'events/s':>9} {'x 1 rank':>8} " + " ".join(f"{p:>9}" for p in PHASES[:-1])
          + f" {'imbalance':>9}")
    for name, row in results.items():
        print(f"{name:22} {row['seconds_per_step']:7.3f} {row['events_per_s']:9,.0f} "
              f"{row.get('throughput_over_1_rank', float('nan')):8.2f} "
              + " ".join(f"{row[p]:9.3f}" for p in PHASES[:-1]) + f" {row.get('imbalance', 1.0):9.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
