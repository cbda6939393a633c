"""What the quality grids (``ctr_quality``, ``transfer_quality``, ``multimodal_quality``) share.

Each grid runs :func:`hybrid.jobs.finetune.run_finetune` once per point in a pool of spawned worker processes
(one torch thread each by default: on a small CPU, processes with one thread each scale far better than one
process with many) and aggregates the points over seeds. What differs between the grids — which points, the
table's columns — stays in each script.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def init_worker(threads: int) -> None:
    """Pool initializer: pin the worker's torch threads (the pool's ``initargs=(threads,)``)."""
    import torch

    torch.set_num_threads(threads)


def worker_pool(workers: int, threads: int):
    """A spawn-context pool of ``workers`` processes with ``threads`` torch threads each."""
    return mp.get_context("spawn").Pool(workers, initializer=init_worker, initargs=(threads,))


def load_finetune_config(job: dict, config: str | Path, extra: Sequence[str] = ()):
    """The point's :class:`FinetuneConfig`: ``config`` (relative to the repo) with the point's data, output,
    seed and tracking set, then the grid's own overrides ``job["overrides"]`` and ``extra``."""
    from hybrid.config import load_config
    from hybrid.jobs.finetune import FinetuneConfig

    overrides = [f"data={json.dumps(job['data'])}", f"out={json.dumps(job['out'])}", f"train.seed={job['seed']}",
                 "train.progress=false", f"tracking.tracking_uri={json.dumps(job['tracking_uri'])}",
                 f"tracking.experiment={json.dumps(job['experiment'])}", *job["overrides"], *extra]
    return load_config(FinetuneConfig, REPO / config, overrides)


def timed(fn: Callable[[], dict]) -> dict:
    """``fn()``'s summary with its wall time added as ``wall_s``."""
    started = time.perf_counter()
    summary = fn()
    return {"wall_s": round(time.perf_counter() - started, 1), **summary}


def mean_std(runs: Iterable[dict], keys: Sequence[str]) -> dict:
    """``key`` → mean and ``key_std`` → population std over the runs' finite values (std 0 for one value)."""
    runs = list(runs)
    row = {}
    for key in keys:
        values = [r[key] for r in runs if r.get(key) is not None and not math.isnan(r[key])]
        row[key] = statistics.fmean(values) if values else float("nan")
        row[f"{key}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
    return row


def pm(row: dict, key: str) -> str:
    """``mean ± std`` of an aggregated figure, four decimals."""
    return f"{row[key]:.4f} ± {row[key + '_std']:.4f}"
