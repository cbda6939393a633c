"""P4: sharded scaling of pretraining — 2 processes (gloo, row-wise item table) against 1, same total batch.

Runs ``hybrid pretrain`` twice on the same config and data, the two runs on the same cores:

- 1 process with ``--threads`` intra-op threads (default 2);
- ``torchrun --nproc_per_node=2``: 2 processes with ``--threads / 2`` threads each, each taking half of
  every global batch (``train.batch_size`` is global), the item table sharded row-wise over both.

Reports the median time per training step (evaluation and checkpoints excluded; median over log windows),
the ratio, and the eval HR@10 / NDCG@10 / loss each run reached (they should agree within the seed-to-seed
spread: the runs differ in table initialisation, negatives per rank and reduction order).

    python bench/pretrain_sharded.py --data runs/ml1m/last-item [--epochs 3] [--out bench/results/pretrain_sharded.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(processes: int, threads: int, args, out: Path) -> dict:
    """One ``hybrid pretrain`` run; returns its result.json plus the wall time."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    overrides = [f"data={args.data}", f"out={out}", f"train.epochs={args.epochs}", "train.eval_every=0",
                 "train.checkpoint_every=0", "train.log_every=4", "train.progress=false", "tracking.enabled=false",
                 f"train.batch_size={args.batch_size}"]
    cmd = [*launcher, "-m", "hybrid", "pretrain", "--config", args.config]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    result = json.loads((out / "result.json").read_text())
    result["wall_seconds"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="runs/ml1m/last-item", help="prepared protocol-A directory")
    parser.add_argument("--config", default=str(REPO / "configs" / "pretrain_ml1m_last_item_llama.yaml"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch (split over the processes)")
    parser.add_argument("--threads", type=int, default=2, help="cores used by either run")
    parser.add_argument("--single-process-threads", type=int, default=None,
                        help="threads of the 1-process run (default: --threads). On a machine shared with other "
                             "busy processes, 2-thread OpenMP kernels can be far slower than 1-thread ones")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "pretrain_sharded.json"))
    args = parser.parse_args()

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for processes in (1, 2):
            threads = max(1, args.threads // processes)
            if processes == 1 and args.single_process_threads:
                threads = args.single_process_threads
            result = run(processes, threads, args, Path(tmp) / f"p{processes}")
            metrics = result["metrics"]
            rows[processes] = {"processes": processes, "threads_per_process": threads, "steps": result["step"],
                               "seconds_per_step": result["seconds_per_step"],
                               "events_per_s_last_window": metrics.get("perf/events_per_s"),
                               "eval_hr_at_10": metrics["eval/hr_at_10"], "eval_ndcg_at_10": metrics["eval/ndcg_at_10"],
                               "eval_loss": metrics["eval/loss"], "wall_seconds": result["wall_seconds"],
                               "popularity_hr_at_10": result["baseline"]["hr_at_10"]}
    report = {"benchmark": "P4 sharded scaling", "date": time.strftime("%Y-%m-%d"), "data": args.data,
              "config": args.config, "epochs": args.epochs, "global_batch": args.batch_size,
              "runs": list(rows.values()),
              "time_per_step_ratio_2_over_1": rows[2]["seconds_per_step"] / rows[1]["seconds_per_step"]}
    print(f"{'processes':>9} {'threads':>7} {'steps':>5} {'s/step':>7} {'HR@10':>7} {'NDCG@10':>8} {'eval loss':>9}")
    for r in rows.values():
        print(f"{r['processes']:9d} {r['threads_per_process']:7d} {r['steps']:5d} {r['seconds_per_step']:7.3f} "
              f"{r['eval_hr_at_10']:7.4f} {r['eval_ndcg_at_10']:8.4f} {r['eval_loss']:9.4f}")
    print(f"time per step, 2 processes / 1 process: {report['time_per_step_ratio_2_over_1']:.2f}  "
          f"(most popular HR@10: {rows[1]['popularity_hr_at_10']:.4f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
