"""S5 — the whole GPSD Taobao recipe at full size on one machine (BENCHMARKS.md, section S).

Four stages on Taobao-shaped synthetic events (``bench/synth_events.py``, seeded, cached in ``--data-dir``),
each in fresh processes, each sampled every ``--sample-every`` seconds for the memory of its whole process
tree (launcher, ranks and loader workers):

1. ``hybrid data prepare --dataset taobao --protocol last-item`` (DuckDB, out of core; writes the parquet
   tables and the uncompressed column cache the loaders map);
2. the pretraining loader alone: ``SequenceBatchConverter`` over the mapped ``pretrain_train`` windows, one
   rank's share of a 2-rank job (``batch_size / 2`` sequences per batch, ``max_len`` 200), with 0 and 2
   worker processes: events/s delivered, against what stage 3 consumes;
3. ``torchrun --nproc_per_node=2 -m hybrid pretrain``: L4H64A4 LLaMA, item table row-wise sharded over the
   2 ranks (gloo), ``--pretrain-steps`` steps, evaluated at the end on ``--eval-users`` users against the full
   item catalogue;
4. ``hybrid finetune``: the GPSD ranker (same backbone) from stage 3's checkpoint with ST&SF (sparse
   transfer, sparse frozen), ``--finetune-steps`` steps, validation and test AUC on ``--eval-users`` users.

Memory is reported three ways, each summed over the process tree: RSS counts a page once per process that maps
it (so the prepared columns, mapped by both ranks, count twice), PSS splits each shared page between the
processes that map it (what the tree really holds), anonymous counts only the heap (tables, optimizer state,
activations, batches: what the kernel cannot reclaim; mapped column pages are page cache it can drop and
re-read). Peaks are of the sums.

    python bench/taobao_recipe.py [--events 100000000] [--pretrain-steps 300] [--finetune-steps 200]
        [--data-dir runs/bench-scale] [--out bench/results/taobao_recipe.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import prepare_scale  # bench/ is on sys.path when this file runs as a script

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIG = REPO / "configs" / "pretrain_ml1m_last_item_llama.yaml"
FINETUNE_CONFIG = REPO / "configs" / "finetune_ml1m_last_item_gpsd.yaml"

# One rank's loader of a 2-rank pretraining job, timed over whole batches after a warm-up.
_LOADER = """
import json, sys, time
import numpy as np
from hybrid.data.batching import SequenceBatchConverter, make_loader
from hybrid.data.store import open_prepared
data, (batch_size, max_len, workers), seconds = sys.argv[1], map(int, sys.argv[2:5]), float(sys.argv[5])
prepared = open_prepared(data)
converter = SequenceBatchConverter(prepared, "pretrain_train", max_len=max_len, features=["item_id", "category", "action"])
loader = make_loader(converter, batch_size=batch_size, shuffle=True, seed=0, num_replicas=2, rank=0, num_workers=workers)
def endless():
    epoch = 0
    while True:                           # epoch after epoch, as training does
        loader.batch_sampler.set_epoch(epoch)
        yield from loader
        epoch += 1
batches = endless()
for _ in range(20):                       # warm-up: workers started, pages faulted in
    next(batches)
events = n = 0
started = time.perf_counter()
while time.perf_counter() - started < seconds:
    events += int(next(batches).lengths.sum())
    n += 1
elapsed = time.perf_counter() - started
print(json.dumps({"workers": workers, "batches": n, "events": events, "seconds": elapsed,
                  "events_per_s": events / elapsed, "batches_per_rank_epoch": len(loader)}))
"""


def _tree(root: int) -> list[int]:
    """``root`` and every process descended from it (read from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def _memory_kb(pid: int) -> tuple[int, int, int]:
    """(RSS, PSS, anonymous) of one process in kB; zeros once it has gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) for line in f
                      if line.split(":")[0] in ("Rss", "Pss", "Anonymous")}
        return fields.get("Rss", 0), fields.get("Pss", 0), fields.get("Anonymous", 0)
    except (OSError, ValueError, IndexError):
        return 0, 0, 0


def run_sampled(cmd: list[str], every: float, env: dict | None = None, cwd: Path = REPO) -> dict:
    """Run ``cmd``; return wall seconds, peak total RSS / PSS of its process tree (GB), stdout, stderr."""
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    peak = {"rss": 0, "pss": 0, "anon": 0, "processes": 0}
    started = time.perf_counter()

    def sample() -> None:
        while process.poll() is None:
            pids = _tree(process.pid)
            sizes = [_memory_kb(pid) for pid in pids]
            for i, name in enumerate(("rss", "pss", "anon")):
                peak[name] = max(peak[name], sum(size[i] for size in sizes))
            peak["processes"] = max(peak["processes"], sum(1 for size in sizes if size[0]))
            time.sleep(every)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({process.returncode}):\n{stderr[-4000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(peak["rss"] / 2**20, 3),
            "peak_pss_gb": round(peak["pss"] / 2**20, 3), "peak_anonymous_gb": round(peak["anon"] / 2**20, 3),
            "processes": peak["processes"],
            "stdout": stdout, "stderr": stderr}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hybrid", *args]


def _sets(overrides: dict) -> list[str]:
    out = []
    for key, value in overrides.items():
        out += ["--set", f"{key}={value}"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000_000)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128, help="global pretraining batch (64 per rank)")
    parser.add_argument("--eval-users", type=int, default=2000)
    parser.add_argument("--loader-seconds", type=float, default=20.0)
    parser.add_argument("--memory-limit", default="4GB", help="DuckDB's, for prepare")
    parser.add_argument("--sample-every", type=float, default=0.5)
    parser.add_argument("--reuse", action="store_true", help="keep an existing prepared directory / pretraining")
    parser.add_argument("--data-dir", default=str(REPO / "runs" / "bench-scale"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "taobao_recipe.json"))
    args = parser.parse_args(argv)
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    source = prepare_scale._input(data_dir, args.events)
    work = data_dir / f"recipe-{args.events}"
    prepared, pretrained, finetuned = work / "prepared", work / "pretrain", work / "finetune"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    stages: dict[str, dict] = {}
    # with --reuse, a stage that is not rerun keeps what the last report measured of it
    previous = (json.loads(Path(args.out).read_text()).get("stages", {})
                if args.reuse and Path(args.out).is_file() else {})

    def report(name: str, run: dict, **extra) -> None:
        stages[name] = {k: v for k, v in run.items() if k not in ("stdout", "stderr")} | extra
        print(f"{name:10s} {run['seconds']:8.1f} s   RSS {run['peak_rss_gb']:6.2f} GB   "
              f"PSS {run['peak_pss_gb']:6.2f} GB   anon {run['peak_anonymous_gb']:6.2f} GB   {extra}", flush=True)

    # 1. prepare
    if not (args.reuse and (prepared / "stats.json").is_file()):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        result = run_sampled(_cli("data", "prepare", "--dataset", "taobao", "--path", str(source), "--protocol",
                                  "last-item", "--out", str(prepared),
                                  *_sets({"engine.memory_limit": args.memory_limit, "tracking.enabled": "false"})),
                             args.sample_every, env)
        report("prepare", result, events_per_s=round(args.events / result["seconds"]))
    else:
        stages["prepare"] = previous.get("prepare", {})
    stats = json.loads((prepared / "stats.json").read_text())

    # 2. the loader alone, then 3. pretraining: what the loader delivers vs what training consumes
    per_rank = args.batch_size // 2
    for workers in (0, 2):
        result = run_sampled([sys.executable, "-c", _LOADER, str(prepared), str(per_rank), "200", str(workers),
                              str(args.loader_seconds)], args.sample_every, env)
        measured = json.loads(result["stdout"].strip().splitlines()[-1])
        report(f"loader-w{workers}", result, events_per_s=round(measured["events_per_s"]),
               batches=measured["batches"], batches_per_rank_epoch=measured["batches_per_rank_epoch"])

    if not (args.reuse and (pretrained / "result.json").is_file()):
        shutil.rmtree(pretrained, ignore_errors=True)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        overrides = {"data": prepared, "out": pretrained, "train.max_steps": args.pretrain_steps,
                     "train.batch_size": args.batch_size, "train.eval_every": 0, "train.checkpoint_every": 0,
                     "train.log_every": 10, "train.progress": "false", "train.eval_max_users": args.eval_users,
                     "tracking.enabled": "false"}
        result = run_sampled([*launcher, "-m", "hybrid", "pretrain", "--config", str(PRETRAIN_CONFIG),
                              *_sets(overrides)], args.sample_every, {**env, "OMP_NUM_THREADS": "1"})
        pre = json.loads((pretrained / "result.json").read_text())
        report("pretrain", result, steps=pre["step"], epoch=pre["epoch"], seconds_per_step=pre["seconds_per_step"],
               events_per_s=round(pre["metrics"]["perf/events_per_s"]),
               eval={k: pre["metrics"][k] for k in ("eval/hr_at_10", "eval/ndcg_at_10", "eval/loss", "eval/targets")},
               baseline_most_popular=pre["baseline"])
    else:
        stages["pretrain"] = previous.get("pretrain", {})
    pre = json.loads((pretrained / "result.json").read_text())

    # 4. fine-tune the GPSD ranker from the pretrained checkpoint, ST&SF
    shutil.rmtree(finetuned, ignore_errors=True)
    overrides = {"data": prepared, "out": finetuned, "train.max_steps": args.finetune_steps, "train.epochs": 1,
                 "train.eval_every": 0, "train.log_every": 10, "train.progress": "false",
                 "train.eval_max_users": args.eval_users, "tracking.enabled": "false"}
    result = run_sampled(_cli("finetune", "--config", str(FINETUNE_CONFIG), "--init", pre["checkpoint"],
                              "--strategy", "st_sf", *_sets(overrides)), args.sample_every, env)
    fine = json.loads((finetuned / "result.json").read_text())
    report("finetune", result, result=fine)

    loader = stages["loader-w0"]["events_per_s"]
    consumed = stages["pretrain"].get("events_per_s", 0) / 2
    summary = {
        "benchmark": "S5: the GPSD Taobao recipe at full size, Taobao-shaped synthetic events",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
        "events": args.events, "users": stats["users"], "items": stats["items"], "vocab_sizes": stats["vocab_sizes"],
        "ctr_samples": {s: stats[s]["samples"] for s in ("ctr_train", "ctr_valid", "ctr_test")},
        "pretrain_sequences": stats.get("pretrain_train", {}),
        "stages": stages,
        # one rank's loader, alone on the machine, against one rank's share of what the 2-rank job consumed
        "loader_over_consumption": round(loader / consumed, 1) if consumed else None,
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(json.dumps({k: summary[k] for k in ("events", "users", "items", "loader_over_consumption")}))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
