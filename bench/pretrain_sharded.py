"""P4: sharded scaling of pretraining — 2 processes (gloo, row-wise item table) against 1, same total batch.

Runs ``hybrid pretrain`` twice on the same config and data, the two runs on the same cores:

- 1 process with ``--threads`` intra-op threads (default 2);
- ``torchrun --nproc_per_node=2``: 2 processes with ``--threads / 2`` threads each, each taking half of
  every global batch (``train.batch_size`` is global), the item table sharded row-wise over both.

Reports the median time per training step (evaluation and checkpoints excluded; median over log windows),
the ratio, and the eval HR@10 / NDCG@10 / loss each run reached (they should agree within the seed-to-seed
spread: the runs differ in table initialisation, negatives per rank and reduction order).

    python bench/pretrain_sharded.py --data runs/ml1m/last-item [--epochs 3] [--out bench/results/pretrain_sharded.json]

On a GPU machine (``--device cuda``, default ``cpu``: the runs then see no GPU) each process trains on the GPU of
its local rank over nccl, with ``--precision bf16`` passed as ``train.precision``. With fewer GPUs than
processes, ``--one-gpu`` puts every rank on GPU 0 (each sees ``LOCAL_RANK=0``) — nccl may refuse two ranks on
one device; ``--keep-going`` then records the failed run (its error) instead of stopping, and
``--shard-tables`` gives the 1-process run its tables in a 1-rank DMP (FBGEMM's CUDA kernels), the sharded path
on one GPU:

    python bench/pretrain_sharded.py --device cuda --precision bf16 --one-gpu --shard-tables --keep-going \
        --epochs 1 --out bench/results/gpu/p4.json
"""
from __future__ import annotations

import argparse
import json
import os
import signal
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
    if processes > 1 and args.one_gpu:   # every rank on cuda:0 (init_distributed takes cuda:LOCAL_RANK)
        launcher = [*launcher, "--no-python", "env", "LOCAL_RANK=0", sys.executable]
    overrides = [f"data={args.data}", f"out={out}", f"train.epochs={args.epochs}", "train.eval_every=0",
                 "train.checkpoint_every=0", "train.log_every=4", "train.progress=false", "tracking.enabled=false",
                 f"train.batch_size={args.batch_size}"]
    if args.precision != "fp32":
        overrides.append(f"train.precision={args.precision}")
    if args.shard_tables and processes == 1:
        overrides.append("train.shard_tables=true")
    cmd = [*launcher, "-m", "hybrid", "pretrain", "--config", args.config]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""   # hybrid pretrain trains on CUDA whenever it sees a GPU
    started = time.perf_counter()
    # its own process group: past --run-timeout the launcher *and* its ranks are stopped (no rank left on the GPU)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=args.run_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        raise RuntimeError(f"{' '.join(cmd)} did not finish in {args.run_timeout} s (--run-timeout)") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
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
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: each process on the GPU of its local rank (nccl); cpu: the runs see no GPU (gloo)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="train.precision of both runs")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to run")
    parser.add_argument("--one-gpu", action="store_true",
                        help="multi-process CUDA runs: every rank on GPU 0 (for a machine with one GPU)")
    parser.add_argument("--shard-tables", action="store_true",
                        help="1-process runs: train.shard_tables=true (a 1-rank DMP, FBGEMM's fused kernels)")
    parser.add_argument("--keep-going", action="store_true",
                        help="record a failed run (its error) in the report instead of stopping")
    parser.add_argument("--run-timeout", type=float, default=None, help="seconds one run may take")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "pretrain_sharded.json"))
    args = parser.parse_args()
    gpus = None
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit(f"--device cuda: CUDA is not available to torch {torch.__version__} on this machine")
        gpus = torch.cuda.device_count()

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for processes in args.processes:
            threads = max(1, args.threads // processes)
            if processes == 1 and args.single_process_threads:
                threads = args.single_process_threads
            extra = {}
            if args.device != "cpu" or args.precision != "fp32" or args.shard_tables:
                extra = {"device": args.device, "precision": args.precision,
                         "backend": "nccl" if args.device == "cuda" else "gloo",
                         "shard_tables": processes > 1 or args.shard_tables}
                if args.device == "cuda":
                    extra["gpus_used"] = 1 if (processes == 1 or args.one_gpu) else processes
            try:
                result = run(processes, threads, args, Path(tmp) / f"p{processes}")
            except RuntimeError as err:
                if not args.keep_going:
                    raise
                rows[processes] = {"processes": processes, "threads_per_process": threads, **extra,
                                   "error": str(err)[-2000:]}
                print(f"{processes} process(es): FAILED\n{str(err)[-1500:]}", file=sys.stderr)
                continue
            metrics = result["metrics"]
            rows[processes] = {"processes": processes, "threads_per_process": threads, "steps": result["step"],
                               "seconds_per_step": result["seconds_per_step"],
                               "events_per_s_last_window": metrics.get("perf/events_per_s"),
                               "eval_hr_at_10": metrics["eval/hr_at_10"], "eval_ndcg_at_10": metrics["eval/ndcg_at_10"],
                               "eval_loss": metrics["eval/loss"], "wall_seconds": result["wall_seconds"],
                               "popularity_hr_at_10": result["baseline"]["hr_at_10"], **extra}
    ok = {p: r for p, r in rows.items() if "error" not in r}
    report = {"benchmark": "P4 sharded scaling", "date": time.strftime("%Y-%m-%d"), "data": args.data,
              "config": args.config, "epochs": args.epochs, "global_batch": args.batch_size,
              "runs": list(rows.values()),
              "time_per_step_ratio_2_over_1": (ok[2]["seconds_per_step"] / ok[1]["seconds_per_step"]
                                               if 1 in ok and 2 in ok else None)}
    if args.device != "cpu" or args.precision != "fp32":
        report.update(device=args.device, precision=args.precision, gpus=gpus)
    if args.device == "cuda" and args.one_gpu and any(p > 1 for p in rows):
        shared = all("error" not in r for p, r in rows.items() if p > 1)
        report["processes_share_one_gpu_over_nccl"] = shared
        if not shared:
            report["note"] = ("nccl refused (or failed) several processes on one GPU: see the failed run's error; "
                              "the 1-process run on the GPU" + (" (tables in a 1-rank DMP, FBGEMM's CUDA kernels)"
                                                                if args.shard_tables else "")
                              + " is the GPU figure, and the 2-process scaling needs one GPU per process")
    print(f"{'processes':>9} {'threads':>7} {'steps':>5} {'s/step':>7} {'HR@10':>7} {'NDCG@10':>8} {'eval loss':>9}")
    for r in rows.values():
        if "error" in r:
            print(f"{r['processes']:9d} {r['threads_per_process']:7d} failed (see the report's error)")
            continue
        print(f"{r['processes']:9d} {r['threads_per_process']:7d} {r['steps']:5d} {r['seconds_per_step']:7.3f} "
              f"{r['eval_hr_at_10']:7.4f} {r['eval_ndcg_at_10']:8.4f} {r['eval_loss']:9.4f}")
    if report["time_per_step_ratio_2_over_1"] is not None:
        print(f"time per step, 2 processes / 1 process: {report['time_per_step_ratio_2_over_1']:.2f}  "
              f"(most popular HR@10: {ok[1]['popularity_hr_at_10']:.4f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
