"""Q (multimodal): AUC / gAUC of DCN-v2 and TIN on protocol B with title vectors, with and without SimTier,
MNSE (of the candidate-to-history similarity), MK-MMD, and all three; means ± std over seeds.

Every run is a plain :func:`hybrid.jobs.finetune.run_finetune` of the example config
``configs/finetune_ml1m_ratings_<ranker>.yaml`` with ``item_vectors.source: text`` (MovieLens title + genres
through the packaged all-MiniLM-L6-v2; computed once, then read from the cache) and the variant's
``ranker.config.multimodal`` section; the runs nest under one parent MLflow run.

Variants (``--variants``):

* ``none``      — no multimodal feature (the baseline; same data, same budget);
* ``simtier``   — SimTier, 20 tiers over [-1, 1], log1p counts;
* ``mnse``      — MNSE (bases 2, 3, 10) of the max and the mean candidate-to-history cosine (1024 levels);
* ``mkmmd``     — the candidate's projected title vector as one more input, aligned with its ID embedding by
  MK-MMD (weight 0.2, PAD's γ; five Gaussian kernels);
* ``all``       — the three together;
* ``vector``, ``mmd_only`` (ablations of ``mkmmd``) — the projected vector as an input with no MMD; the MMD
  loss alone (the projection then only feeds the loss, which reshapes the ID embeddings).

The full budget (3 epochs of 379 steps per run) takes ~10 min per run on a 2-core machine; ``--budget
reduced`` (the default) trains 1 epoch cut at ``--max-steps`` (default 200 steps of 1024 samples = 53% of an
epoch), max_history 50, and evaluates once at the end on the whole test split.

Usage::

    python bench/multimodal_quality.py --ratings runs/ml1m/ratings --tracking-uri sqlite:///runs/bench/mlflow.db \\
        [--rankers dcn_v2 tin] [--variants none simtier mnse mkmmd all] [--seeds 0 1 2] [--workers 2]

Results are written after every run (``--out``, default ``bench/results/multimodal_quality.json``).
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

from _grid import load_finetune_config, mean_std, pm, timed, worker_pool  # noqa: E402

CONFIGS = {"dcn_v2": "configs/finetune_ml1m_ratings_dcn_v2.yaml", "tin": "configs/finetune_ml1m_ratings_tin.yaml"}
VARIANTS: dict[str, dict] = {
    "none": {},
    "simtier": {"simtier": True, "num_tiers": 20},
    "mnse": {"mnse": True, "mnse_inputs": ["max_similarity", "mean_similarity"], "mnse_bases": [2, 3, 10]},
    "mkmmd": {"item_field": True, "mkmmd_weight": 0.2},
}
VARIANTS["all"] = {**VARIANTS["simtier"], **VARIANTS["mnse"], **VARIANTS["mkmmd"]}
VARIANTS["vector"] = {"item_field": True}
VARIANTS["mmd_only"] = {"mkmmd_weight": 0.2}
DEFAULT_VARIANTS = ("none", "simtier", "mnse", "mkmmd", "all")
# test figures at the validation-selected step (validation selects; test is only reported)
FIGURES = ("test_auc", "test_gauc", "test_logloss", "valid_best_auc")


def run_one(job: dict) -> dict:
    """One fine-tuning run (in a worker process)."""
    from hybrid.jobs.finetune import run_finetune

    extra = []
    if job["multimodal"]:
        extra = ["item_vectors.source=text", f"item_vectors.cache_dir={json.dumps(job['cache_dir'])}",
                 f"ranker.config.multimodal={json.dumps(job['multimodal'])}"]
    cfg = load_finetune_config(job, CONFIGS[job["ranker"]], extra)
    return {"ranker": job["ranker"], "variant": job["variant"], "seed": job["seed"],
            **timed(lambda: run_finetune(cfg, parent_run=job["parent"], strategy=f"nt-mm-{job['variant']}"))}


def aggregate(runs: list[dict]) -> list[dict]:
    rows = []
    for ranker in CONFIGS:
        base = [r for r in runs if r["ranker"] == ranker and r["variant"] == "none"]
        for variant in VARIANTS:
            mine = [r for r in runs if r["ranker"] == ranker and r["variant"] == variant]
            if not mine:
                continue
            row = {"ranker": ranker, "variant": variant, "seeds": len(mine), **mean_std(mine, FIGURES)}
            # Paired by seed against the baseline: same init seed and data order, only the features differ.
            pairs = [(r["test_auc"], b["test_auc"]) for r in mine for b in base if b["seed"] == r["seed"]]
            row["delta_auc"] = statistics.fmean(a - b for a, b in pairs) if pairs and variant != "none" else 0.0
            row["wall_s"] = statistics.fmean(r["wall_s"] for r in mine)
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| ranker | multimodal | test AUC (best valid step) | Δ AUC vs none (paired) | test gAUC | test logloss "
             "| s / run |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ranker']} | {r['variant']} | {pm(r, 'test_auc')} | {r['delta_auc']:+.4f} | "
                     f"{pm(r, 'test_gauc')} | {pm(r, 'test_logloss')} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", default="runs/ml1m/ratings", help="prepared protocol-B (ratings) directory")
    parser.add_argument("--rankers", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", choices=("reduced", "full"), default="reduced")
    parser.add_argument("--max-steps", type=int, default=200, help="reduced budget: steps per run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run")
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", default="multimodal-quality")
    parser.add_argument("--runs-dir", default="runs/bench/multimodal_quality")
    parser.add_argument("--cache-dir", default="runs/bench/text_vectors", help="text-vector cache")
    parser.add_argument("--out", default=str(REPO / "bench/results/multimodal_quality.json"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    budget = [] if args.budget == "full" else [
        "train.epochs=1", f"train.max_steps={args.max_steps}", "train.eval_every=0", "train.max_history=50"]
    overrides = budget + args.overrides

    from hybrid.tracking import Tracker

    started = time.perf_counter()
    tracker = Tracker(args.tracking_uri, args.experiment)
    runs_dir = Path(args.runs_dir) / time.strftime("%Y%m%d-%H%M%S")
    with tracker.run("multimodal-quality-grid", tags={"stage": "pipeline"}) as parent:
        jobs = [{"ranker": ranker, "variant": variant, "multimodal": VARIANTS[variant], "seed": seed,
                 "data": args.ratings, "out": str(runs_dir / f"{ranker}-{variant}-seed{seed}"),
                 "tracking_uri": args.tracking_uri, "experiment": args.experiment, "parent": parent,
                 "cache_dir": args.cache_dir, "overrides": overrides}
                for seed in args.seeds for ranker in args.rankers for variant in args.variants]
        if any(VARIANTS[v] for v in args.variants):
            run_text_vectors_once(args)   # fill the cache before the workers race to compute it
        runs: list[dict] = []
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with worker_pool(args.workers, args.threads) as pool:
            for result in pool.imap_unordered(run_one, jobs):
                runs.append(result)
                print(f"[{time.perf_counter() - started:6.0f} s] {result['ranker']:7s} {result['variant']:8s} "
                      f"seed {result['seed']}: test AUC {result['test_auc']:.4f} gAUC {result['test_gauc']:.4f} "
                      f"logloss {result['test_logloss']:.4f} ({result['wall_s']:.0f} s)", flush=True)
                report = {"date": date.today().isoformat(),
                          "machine": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
                                     "shared with other jobs", "workers": args.workers,
                          "threads_per_worker": args.threads, "seeds": args.seeds, "budget": args.budget,
                          "overrides": overrides, "variants": {v: VARIANTS[v] for v in args.variants},
                          "grid_seconds": round(time.perf_counter() - started, 1), "table": aggregate(runs),
                          "runs": runs}
                out.write_text(json.dumps(report, indent=2, default=str))
    print()
    print(table(aggregate(runs)))
    print(f"\ngrid: {len(runs)} runs in {time.perf_counter() - started:.0f} s; written to {args.out}")
    return 0


def run_text_vectors_once(args: argparse.Namespace) -> None:
    """Compute (or find in the cache) the title vectors of the prepared data's items."""
    from hybrid.data.item_vectors import (
        ItemVectorsConfig,
        load_item_vectors,
    )
    from hybrid.data.store import load_prepared
    from hybrid.jobs.finetune import items_of_prepared

    t = time.perf_counter()
    fm = load_prepared(args.ratings).feature_map
    iv = load_item_vectors(ItemVectorsConfig(source="text", cache_dir=args.cache_dir), fm,
                           items_of_prepared(args.ratings))
    print(f"title vectors: {tuple(iv.vectors.shape)}, coverage {iv.coverage:.3f} ({time.perf_counter() - t:.0f} s)",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
