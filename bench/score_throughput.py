"""Issue 16.4: scoring throughput (rows/s) and peak memory of DCN-v2 and the GPSD ranker, eager vs exported.

On protocol B (``ratings``) of ml-1m-partial, the test rows (events after the 80th-percentile time cut with at
least one earlier event of their user: 97,306 rows), one process, ``--threads`` torch threads, batch 1024 for
every variant (``hybrid score``'s default), each model with its example config's ranker and history window:
DCN-v2 from ``configs/finetune_ml1m_ratings_dcn_v2.yaml`` (history 50), the GPSD sequence ranker (L4H64A4
LLaMA backbone, candidate as the last token) from ``configs/finetune_ml1m_last_item_gpsd.yaml`` with its data
switched to protocol B (history 100). Throughput does not depend on the weights: the eager and exported
variants use the random initialisation of ``train.seed = 0`` (no pretraining, no fine-tuning).

- **eager**: the built-in ranker, ``eval()`` forward under ``no_grad`` on a ``CTRBatch`` (TorchRec
  ``EmbeddingCollection`` / ``EmbeddingBagCollection`` tables fed by a ``KeyedJaggedTensor``);
- **exported**: the same ranker through ``hybrid.ctr_models.export``: ``save_exported`` writes the
  ``torch.export`` program (plain tables, padded ids, dynamic batch) to a ``.pt2``, ``load_exported`` reads it
  back, and ``program.module()(*serving_inputs(model, batch))`` runs under ``no_grad``. Before timing, every
  timed batch is run by both and the logits must agree within ``--tolerance`` (1e-5);
- **end to end** (``hybrid score``): ``hybrid.jobs.score.run_score`` on the raw ml-1m-partial files with
  ``since`` = just after the time cut — the same 97,306 test rows plus the 222 rows whose user has no earlier
  event — from a fine-tuning checkpoint (made here once with ``hybrid finetune`` for one step, in
  ``runs/bench-score/``, when missing): checkpoint load, DuckDB read and sort of all 487k events, id encoding,
  history building by the training converter, the eager model, the parquet write. Its rows/s is
  ``run_score``'s own figure (scored rows / its wall time). Each repeat is a fresh process, run after the
  eager/exported windows of the model (not interleaved with them).

Eager and exported get the same batches, converted before timing (the model step is measured, not the data
path): ``--batches`` batches spread evenly over the test rows in file order (user, time), as ``CTRBatch`` for
eager and as the seven serving tensors for exported. A window is one pass over them; the two variants'
windows alternate (the first of each pair alternating too), so machine noise hits both alike, after one
untimed pass each (the parity check). The figure is the median over ``--repeats`` windows; the ratio
exported / eager is of the two medians of the same run. The one-time costs beside them: export (trace +
save), ``.pt2`` load, CTRBatch conversion and CTRBatch → serving tensors, as rows/s or seconds.

Peak resident memory (VmHWM) of a separate process per (model, variant): eager = torch + TorchRec + the
ranker + its pre-converted batches (no prepared data); exported = torch only (nothing of hybrid or TorchRec is
imported) + the ``.pt2`` program + its serving tensors, i.e. what a serving process holds; end to end = the
whole ``hybrid score`` run. Each runs one untimed and one timed pass (and checks its logits against the main
process's). The load average is recorded around every phase (another job may share the CPU).

    python bench/score_throughput.py [--data runs/ml1m/ratings] [--threads 2] [--repeats 5] \
        [--out bench/results/score_throughput.json] [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Only torch at module level: the exported variant's memory process must not import hybrid or TorchRec.
from _device import peak_rss_mb  # noqa: E402

CONFIGS = {"dcn_v2": "configs/finetune_ml1m_ratings_dcn_v2.yaml", "gpsd": "configs/finetune_ml1m_last_item_gpsd.yaml"}
#: batches per timed window (one pass): about 1.5 s of DCN-v2 and 10 s of the GPSD ranker on 2 CPU cores
WINDOW_BATCHES = {"dcn_v2": 48, "gpsd": 4}
QUICK_BATCHES = {"dcn_v2": 4, "gpsd": 1}
QUICK_E2E_ROWS = 2000           # --quick: end to end scores only the last rows (the rest is history)
VARIANTS = ("eager", "exported")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def model_config(args, name: str):
    from hybrid.config import load_config
    from hybrid.jobs.finetune import FinetuneConfig

    return load_config(FinetuneConfig, REPO / CONFIGS[name], [f"data={args.data}"])


def build_eager(args, name: str, feature_map):
    """The ranker of the model's config over protocol B's vocabularies, random init (seed 0), eval mode."""
    from hybrid.jobs.finetune import build_model

    cfg = model_config(args, name)
    return build_model(cfg, feature_map).eval(), cfg


def test_batches(args, name: str, model, cfg, prepared) -> tuple[list, float]:
    """``args.batches`` test batches of ``args.batch_size``, spread evenly over the test rows (file order), and the
    converter's rows/s over all of them."""
    from hybrid.data.batching import CTRBatchConverter, make_loader

    converter = CTRBatchConverter(prepared, "ctr_test", max_history=cfg.train.max_history,
                                  fields=list(model.spec.kjt_keys), task_names=tuple(cfg.task_names))
    start = time.perf_counter()
    every = list(make_loader(converter, args.batch_size, shuffle=False))
    convert_rows_per_s = sum(b.batch_size for b in every) / (time.perf_counter() - start)
    n = min(args.window_batches[name], len(every))
    picks = sorted({round(i * (len(every) - 1) / max(n - 1, 1)) for i in range(n)})
    return [every[i] for i in picks], convert_rows_per_s


def timed_pass(fn, items) -> float:
    """Rows per second of one pass of ``fn`` over ``items`` (each call returns its rows)."""
    start, rows = time.perf_counter(), 0
    for item in items:
        rows += fn(item)
    return rows / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------- eager vs exported

def measure(args, prepared, name: str, work: Path) -> dict:
    from hybrid.ctr_models.export import load_exported, save_exported, serving_inputs

    loads = {"start": loadavg()}
    model, cfg = build_eager(args, name, prepared.feature_map)
    batches, convert_rows_per_s = test_batches(args, name, model, cfg, prepared)
    rows = sum(b.batch_size for b in batches)

    start = time.perf_counter()
    inputs = [tuple(serving_inputs(model, b)) for b in batches]
    serving_inputs_rows_per_s = rows / (time.perf_counter() - start)
    start = time.perf_counter()
    save_exported(model, batches[0], work / f"{name}.pt2")
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    program, _ = load_exported(work / f"{name}.pt2")
    exported = program.module()
    load_s = time.perf_counter() - start

    # parity on every timed batch (also the untimed warm-up pass of both variants)
    with torch.no_grad():
        eager_logits = [model(b) for b in batches]
        diff = max(float((exported(*x) - e).abs().max()) for x, e in zip(inputs, eager_logits))
    if not diff < args.tolerance:
        raise AssertionError(f"{name}: exported and eager logits differ by {diff:.2e} (> {args.tolerance:g})")
    # for the memory processes: the same inputs and the logits they must reproduce
    torch.save(batches, work / f"{name}.batches.pt")
    torch.save(inputs, work / f"{name}.inputs.pt")
    torch.save(eager_logits, work / f"{name}.logits.pt")

    steps = {"eager": lambda b: (model(b), b.batch_size)[1],
             "exported": lambda x: (exported(*x), x[0].shape[0])[1]}
    data = {"eager": batches, "exported": inputs}
    windows: dict[str, list[float]] = {v: [] for v in VARIANTS}
    loads["timing_start"] = loadavg()
    with torch.no_grad():
        for r in range(args.repeats):
            for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                windows[variant].append(timed_pass(steps[variant], data[variant]))
    loads["timing_end"] = loadavg()
    out = {"model": name, "config": CONFIGS[name], "max_history": cfg.train.max_history,
           "params": sum(p.numel() for p in model.parameters()), "batch_size": args.batch_size,
           "window_batches": len(batches), "window_rows": rows, "max_abs_logit_diff": diff,
           "one_time": {"ctr_batch_conversion_rows_per_s": round(convert_rows_per_s, 1),
                        "serving_inputs_rows_per_s": round(serving_inputs_rows_per_s, 1),
                        "export_and_save_s": round(export_s, 2), "load_exported_s": round(load_s, 2),
                        "pt2_mb": round((work / f"{name}.pt2").stat().st_size / 2**20, 1)}}
    for variant, w in windows.items():
        out[variant] = {"rows_per_s": statistics.median(w), "windows_rows_per_s": [round(x, 1) for x in w]}
    out["ratio_exported_over_eager"] = out["exported"]["rows_per_s"] / out["eager"]["rows_per_s"]
    out["loadavg"] = loads
    return out


def memory_process(args, variant: str, name: str, work: Path) -> float:
    """Peak RSS (MiB) of a fresh process running one untimed and one timed pass of one variant of one model."""
    cmd = [sys.executable, __file__, "--memory-only", variant, "--models", name, "--threads", str(args.threads),
           "--data", args.data, "--work", str(work), "--tolerance", str(args.tolerance)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise RuntimeError(f"memory process {name}/{variant} failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def memory_only(args) -> None:
    name, work = args.models[0], Path(args.work)
    expected = torch.load(work / f"{name}.logits.pt")
    if args.memory_only == "exported":      # torch only: the program and its serving tensors
        program = torch.export.load(work / f"{name}.pt2").module()
        data = torch.load(work / f"{name}.inputs.pt")
        step = program
    else:                                   # the TorchRec ranker (same init) and its CTRBatches
        from hybrid.core.feature_map import FeatureMap

        model, _ = build_eager(args, name, FeatureMap.load(Path(args.data) / "feature_map.json"))
        data = [(b,) for b in torch.load(work / f"{name}.batches.pt", weights_only=False)]
        step = model
    with torch.no_grad():
        diff = max(float((step(*x) - e).abs().max()) for x, e in zip(data, expected))   # untimed pass
        if not diff < args.tolerance:
            raise AssertionError(f"{name}/{args.memory_only}: logits differ from the main process's by {diff:.2e}")
        timed_pass(lambda x: (step(*x), x[0].batch_size if args.memory_only == "eager" else x[0].shape[0])[1], data)
    print(peak_rss_mb())


# ------------------------------------------------------------------------------------------- end to end

def ensure_checkpoint(args, name: str) -> tuple[Path, str]:
    """A fine-tuning checkpoint of the model on protocol B (one step of ``hybrid finetune``), made once."""
    out = Path(args.checkpoints) / f"finetune-{name}"
    best = out / "checkpoints" / "best"
    if (best / "LATEST").is_file():
        return best, "reused"
    cmd = [sys.executable, "-m", "hybrid", "finetune", "--config", str(REPO / CONFIGS[name]),
           "--set", f"data={args.data}", "--set", f"out={out}", "--set", "train.max_steps=1",
           "--set", "train.eval_max_users=20", "--set", "tracking.enabled=false", "--set", "train.progress=false"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode or not (best / "LATEST").is_file():
        raise RuntimeError(f"hybrid finetune ({name}) failed:\n{done.stderr[-3000:]}")
    return best, "made: hybrid finetune, 1 step (train.max_steps=1)"


def e2e_since(args) -> int:
    """``since`` for ``run_score``: the first second after protocol B's time cut (test = timestamp > cut); with
    ``--quick``, the time of the last ``QUICK_E2E_ROWS`` events instead."""
    stats = json.loads((Path(args.data) / "stats.json").read_text())
    if not args.quick:
        return math.floor(stats["time_cut"]) + 1
    import pyarrow.parquet as pq

    ts = pq.read_table(Path(args.data) / "events.parquet", columns=["timestamp"]).column(0).to_numpy()
    ts.sort()
    return int(ts[-QUICK_E2E_ROWS])


def e2e_process(args, name: str, checkpoint: Path, since: int, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--e2e-only", str(checkpoint), "--models", name, "--threads", str(args.threads),
           "--data", args.data, "--work", str(work), "--since", str(since)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise RuntimeError(f"hybrid score ({name}) failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - start, 2)
    return result


def e2e_only(args) -> None:
    from hybrid.jobs.score import ScoreConfig, run_score

    source = json.loads((Path(args.data) / "stats.json").read_text())["source"]
    out = Path(args.work) / f"scores-{args.models[0]}.parquet"
    result = run_score(ScoreConfig(model=args.e2e_only, input=source, dataset="movielens-1m", since=str(args.since),
                                   out=str(out), batch_size=args.batch_size))
    out.unlink(missing_ok=True)
    print(json.dumps({k: result[k] for k in ("rows", "scored", "users", "unknown_users", "unknown_items",
                                             "empty_history", "seconds", "rows_per_s")}
                     | {"peak_rss_mb": peak_rss_mb()}))


def measure_e2e(args, name: str, work: Path) -> dict:
    checkpoint, how = ensure_checkpoint(args, name)
    since = e2e_since(args)
    start_load = loadavg()
    runs = [e2e_process(args, name, checkpoint, since, work) for _ in range(args.e2e_repeats)]
    return {"checkpoint": str(checkpoint), "checkpoint_source": how, "since": since,
            "rows_per_s": statistics.median(r["rows_per_s"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "scored": runs[0]["scored"], "runs": runs, "loadavg": {"start": start_load, "end": loadavg()}}


# ------------------------------------------------------------------------------------------- main

def machine() -> dict:
    mem = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    try:
        import torchrec
        torchrec_version = torchrec.__version__
    except Exception:  # noqa: BLE001 - a fact to record, not a requirement
        torchrec_version = None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "memory_gib": round(int(mem.split()[1]) / 2**20, 1),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "torchrec": torchrec_version,
            "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="runs/ml1m/ratings", help="prepared protocol-B (ratings) directory")
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per variant (alternating)")
    parser.add_argument("--batches", type=int, help=f"batches per window (default per model: {WINDOW_BATCHES})")
    parser.add_argument("--e2e-repeats", type=int, default=2, help="hybrid score runs per model (0: skip)")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="max |exported - eager| logit difference")
    parser.add_argument("--checkpoints", default="runs/bench-score", help="where the one-step checkpoints live")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 repeats of 1-4 batches, one hybrid score run on the last "
                             f"{QUICK_E2E_ROWS} events, JSON to runs/bench-score/ unless --out")
    parser.add_argument("--out", help="JSON report (default bench/results/score_throughput.json)")
    parser.add_argument("--memory-only", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--e2e-only", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--since", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.data = str(Path(args.data).resolve())
    if args.memory_only:
        memory_only(args)
        return
    if args.e2e_only:
        e2e_only(args)
        return

    if args.quick:
        args.repeats, args.e2e_repeats = 2, min(args.e2e_repeats, 1)
    args.window_batches = ({m: args.batches for m in CONFIGS} if args.batches
                           else dict(QUICK_BATCHES if args.quick else WINDOW_BATCHES))
    out = Path(args.out or (REPO / "runs" / "bench-score" / "score_throughput_quick.json" if args.quick
                            else REPO / "bench" / "results" / "score_throughput.json"))
    from hybrid.data.store import load_prepared

    started = time.perf_counter()
    load_start = loadavg()
    prepared = load_prepared(args.data)
    results = []
    with tempfile.TemporaryDirectory(prefix="score_throughput-") as tmp:
        work = Path(tmp)
        for name in args.models:
            row = measure(args, prepared, name, work)
            for variant in VARIANTS:
                row[variant]["peak_rss_mb"] = memory_process(args, variant, name, work)
            if args.e2e_repeats:
                row["end_to_end"] = measure_e2e(args, name, work)
                row["ratio_end_to_end_over_eager"] = row["end_to_end"]["rows_per_s"] / row["eager"]["rows_per_s"]
            results.append(row)
            print(f"{name}: done at {time.perf_counter() - started:.0f} s", flush=True)
    report = {"benchmark": "issue 16.4 scoring throughput (eager / exported / hybrid score) and peak RSS",
              "data": os.path.relpath(args.data, REPO), "split": "ctr_test (protocol B test rows)",
              "weights": "random init (train.seed=0) for eager/exported; a 1-step hybrid finetune checkpoint "
                         "for end to end",
              "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "loadavg": {"start": load_start, "end": loadavg()},
              "runtime_s": round(time.perf_counter() - started, 1),
              "command": " ".join(["python", "bench/score_throughput.py", *sys.argv[1:]]),
              "settings": {k: v for k, v in vars(args).items()
                           if k not in ("memory_only", "e2e_only", "work", "since")},
              "results": results}
    print(f"{'model':7} {'variant':10} {'rows/s':>9} {'vs eager':>9} {'peak RSS':>10}")
    for row in results:
        for variant in (*VARIANTS, "end_to_end"):
            if variant not in row:
                continue
            r = row[variant]
            ratio = r["rows_per_s"] / row["eager"]["rows_per_s"]
            print(f"{row['model']:7} {variant:10} {r['rows_per_s']:9,.0f} {ratio:8.2f}x {r['peak_rss_mb']:6.0f} MiB")
        print(f"{row['model']:7} exported logits agree to {row['max_abs_logit_diff']:.1e}; export + save "
              f"{row['one_time']['export_and_save_s']} s")
    print(f"runtime {report['runtime_s']:.0f} s, load average {report['loadavg']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
