"""Q (no transfer): quality of every built-in ranker on ml-1m-partial, means ± std over seeds.

For DCN-v2, MMoE, the multi-embedding MoE and TIN on protocol B (``ratings``) and the GPSD sequence
ranker on protocol A (``last-item``), each for every seed: eval AUC at the end of epoch 1, the best AUC, the
AUC after the last epoch, logloss and gAUC (after the last epoch), and whether the one-epoch drop happened.
Every run is a plain :func:`hybrid.jobs.finetune.run_finetune` of the example config
``configs/finetune_ml1m_<protocol>_<ranker>.yaml`` (only data, out, seed and tracking are overridden), nested
under one parent MLflow run, so ``hybrid review`` and ``mlflow ui`` read the same runs.

Usage::

    python bench/ctr_quality.py --ratings runs/ml1m/ratings --last-item runs/ml1m/last-item \\
        --tracking-uri sqlite:///runs/bench/mlflow.db [--seeds 0 1 2] [--rankers dcn_v2 tin] [--workers 2]

Each worker process uses ``--threads`` torch threads (default 1: on a small shared machine several
threads per process oversubscribe the cores and run several times slower). Results are written after every
run (``--out``, default ``bench/results/ctr_quality.json``), so an interrupted grid keeps what it finished.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _grid import init_worker, load_finetune_config, mean_std, pm, timed, worker_pool  # noqa: E402

#: ranker → (protocol, example config)
GRID = {
    "dcn_v2": ("ratings", "configs/finetune_ml1m_ratings_dcn_v2.yaml"),
    "mmoe": ("ratings", "configs/finetune_ml1m_ratings_mmoe.yaml"),
    "multi_embedding_moe": ("ratings", "configs/finetune_ml1m_ratings_multi_embedding_moe.yaml"),
    "tin": ("ratings", "configs/finetune_ml1m_ratings_tin.yaml"),
    "gpsd": ("last-item", "configs/finetune_ml1m_last_item_gpsd.yaml"),
}
# validation selects (valid_*), test is reported at the selected step (test_*) and for the final weights
FIGURES = ("valid_auc_epoch1", "valid_best_auc", "test_auc", "test_logloss", "test_gauc", "test_final_auc")


def run_one(job: dict) -> dict:
    """One fine-tuning run (in a worker process); returns its summary plus what identifies it."""
    from hybrid.jobs.finetune import run_finetune

    cfg = load_finetune_config(job, job["config"])
    return {"ranker": job["ranker"], "protocol": job["protocol"], "seed": job["seed"],
            **timed(lambda: run_finetune(cfg, parent_run=job["parent"]))}


def aggregate(runs: list[dict]) -> list[dict]:
    """Mean ± std over seeds per ranker (population std of the finished seeds; 0 for one seed)."""
    rows = []
    for ranker in GRID:
        mine = [r for r in runs if r["ranker"] == ranker]
        if not mine:
            continue
        row = {"ranker": ranker, "protocol": mine[0]["protocol"], "seeds": len(mine), **mean_std(mine, FIGURES)}
        row["one_epoch_drop"] = sum(bool(r["one_epoch_drop"]) for r in mine)
        row["best_epoch"] = statistics.fmean(r["best_epoch"] for r in mine)
        row["wall_s"] = statistics.fmean(r["wall_s"] for r in mine)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| ranker | protocol | valid AUC end of epoch 1 | best valid AUC (mean epoch) | test AUC at best valid "
             "| test logloss | test gAUC | test AUC, final weights | one-epoch drop (valid) | s / run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ranker']} | {r['protocol']} | {pm(r, 'valid_auc_epoch1')} | {pm(r, 'valid_best_auc')} "
                     f"({r['best_epoch']:.2f}) | {pm(r, 'test_auc')} | {pm(r, 'test_logloss')} | "
                     f"{pm(r, 'test_gauc')} | {pm(r, 'test_final_auc')} | {r['one_epoch_drop']}/{r['seeds']} seeds | "
                     f"{r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", default="runs/ml1m/ratings", help="prepared protocol-B (ratings) directory")
    parser.add_argument("--last-item", default="runs/ml1m/last-item", help="prepared protocol-A directory")
    parser.add_argument("--rankers", nargs="+", default=list(GRID), choices=list(GRID))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run, e.g. train.epochs=2")
    parser.add_argument("--tracking-uri", required=True, help="MLflow store, e.g. sqlite:///runs/bench/mlflow.db")
    parser.add_argument("--experiment", default="ctr-quality")
    parser.add_argument("--runs-dir", default="runs/bench/ctr_quality", help="where each run's out dir goes")
    parser.add_argument("--out", default=str(REPO / "bench/results/ctr_quality.json"))
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--previous", action="append", default=[], metavar="JSON",
                        help="results of an earlier, cut-short grid: its runs join this one's table")
    args = parser.parse_args(argv)

    from hybrid.tracking import Tracker

    started = time.perf_counter()
    tracker = Tracker(args.tracking_uri, args.experiment)
    runs_dir = Path(args.runs_dir) / time.strftime("%Y%m%d-%H%M%S")
    with tracker.run("ctr-quality-grid", tags={"stage": "pipeline"}) as parent:
        jobs = []
        for seed in args.seeds:               # seeds outermost: a cut-short grid has every ranker at least once
            for ranker in args.rankers:
                protocol, config = GRID[ranker]
                jobs.append({"ranker": ranker, "protocol": protocol, "config": config, "seed": seed,
                             "data": args.ratings if protocol == "ratings" else args.last_item,
                             "out": str(runs_dir / f"{ranker}-seed{seed}"), "tracking_uri": args.tracking_uri,
                             "experiment": args.experiment, "parent": parent, "overrides": args.overrides})
        runs: list[dict] = [r for path in args.previous for r in json.loads(Path(path).read_text())["runs"]]
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.workers == 1:                 # in this process: no pool to lose
            init_worker(args.threads)
            pool, results = None, map(run_one, jobs)
        else:
            pool = worker_pool(args.workers, args.threads)
            results = pool.imap_unordered(run_one, jobs)
        try:
            for result in results:
                runs.append(result)
                print(f"[{time.perf_counter() - started:7.0f} s] {result['ranker']} seed {result['seed']}: "
                      f"valid AUC@1 {result['valid_auc_epoch1']:.4f} best {result['valid_best_auc']:.4f}; test "
                      f"{result['test_auc']:.4f} logloss {result['test_logloss']:.4f} gAUC "
                      f"{result['test_gauc']:.4f} final {result['test_final_auc']:.4f} drop {result['one_epoch_drop']} "
                      f"({result['wall_s']:.0f} s)",
                      flush=True)
                rows = aggregate(runs)
                report = {"date": date.today().isoformat(), "machine": f"{os.cpu_count()}-core CPU "
                          f"({platform.processor() or platform.machine()})", "workers": args.workers,
                          "threads_per_worker": args.threads, "seeds": sorted({r["seed"] for r in runs}),
                          "overrides": args.overrides, "previous": args.previous,
                          "grid_seconds": round(time.perf_counter() - started, 1), "table": rows,
                          "runs": runs}
                out.write_text(json.dumps(report, indent=2, default=str))
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    print()
    print(table(aggregate(runs)))
    print(f"\ngrid: {len(runs)} runs in {time.perf_counter() - started:.0f} s; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
