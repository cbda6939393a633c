"""S — scale: ``hybrid data prepare`` on Taobao-shaped events at 1M / 10M / 100M (BENCHMARKS.md, section S).

For each size, ``bench/synth_events.py`` writes the input once (seeded, cached in ``--data-dir``); then
``hybrid data prepare --dataset taobao --protocol last-item`` runs in a fresh process per repeat:

- **duckdb** (the default engine, out of core, ``engine.memory_limit`` 4GB) at every size;
- **pandas** (the in-memory reference) at sizes up to ``--pandas-up-to``, in the same run, alternating with
  duckdb, so the ratio is measured under the same machine noise.

Reported per size and engine: wall seconds (median over repeats; the process from start to exit, Python
start-up included), peak RSS of the process (``ru_maxrss``: DuckDB's threads live in it), microseconds per
event, events/s, input and output bytes, and the prepared data's users / items / vocabulary sizes.

    python bench/prepare_scale.py [--sizes 1000000,10000000,100000000] [--repeats 3] [--big-repeats 1]
        [--data-dir runs/bench-scale] [--out bench/results/prepare_scale.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs the CLI in this process and reports its own peak RSS (kB on Linux) on the last line of stderr.
_CHILD = """
import resource, sys
from hybrid.cli import main
code = main(sys.argv[1:])
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def _synth():
    spec = importlib.util.spec_from_file_location("synth_events", REPO / "bench" / "synth_events.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _input(data_dir: Path, events: int) -> Path:
    path = data_dir / f"taobao_{events}.csv"
    if not path.is_file():
        print(f"generating {events:,} events -> {path}", flush=True)
        _synth().generate(path, events, seed=0)
    return path


def _prepare(engine: str, path: Path, out: Path, memory_limit: str) -> dict:
    cmd = [sys.executable, "-c", _CHILD, "data", "prepare", "--dataset", "taobao", "--path", str(path),
           "--protocol", "last-item", "--out", str(out), "--set", f"engine.name={engine}",
           "--set", f"engine.memory_limit={memory_limit}", "--set", "tracking.enabled=false"]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{engine} prepare failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rss_kb = int(next(line.split()[1] for line in reversed(done.stderr.splitlines()) if line.startswith("MAXRSS_KB")))
    return {"seconds": seconds, "peak_rss_gb": rss_kb / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,10000000,100000000")
    parser.add_argument("--repeats", type=int, default=3, help="repeats at sizes below 100M")
    parser.add_argument("--big-repeats", type=int, default=1, help="repeats at 100M events and above")
    parser.add_argument("--pandas-up-to", type=int, default=1_000_000, help="largest size the pandas engine runs")
    parser.add_argument("--memory-limit", default="4GB")
    parser.add_argument("--data-dir", default=str(REPO / "runs" / "bench-scale"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "prepare_scale.json"))
    args = parser.parse_args(argv)
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for events in (int(float(s)) for s in args.sizes.split(",")):
        path = _input(data_dir, events)
        engines = ["duckdb"] + (["pandas"] if events <= args.pandas_up_to else [])
        repeats = args.big_repeats if events >= 100_000_000 else args.repeats
        runs: dict[str, list[dict]] = {e: [] for e in engines}
        scratch = Path(tempfile.mkdtemp(prefix="prepare-scale-", dir=data_dir))
        try:
            for repeat in range(repeats):
                for engine in engines:  # alternating: both engines see the same machine noise
                    out = scratch / f"{engine}-{repeat}"
                    runs[engine].append(_prepare(engine, path, out, args.memory_limit))
                    stats = json.loads((out / "stats.json").read_text())
                    output_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
                    runs[engine][-1]["protocol_seconds"] = stats["prepare_seconds"]
                    shutil.rmtree(out)
                    print(f"{events:>11,} events  {engine:6s}  {runs[engine][-1]['seconds']:7.1f} s  "
                          f"{runs[engine][-1]['peak_rss_gb']:5.2f} GB", flush=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        for engine in engines:
            seconds = statistics.median(r["seconds"] for r in runs[engine])
            results.append({
                "events": events, "engine": engine, "repeats": repeats,
                "seconds_median": round(seconds, 2), "seconds_all": [round(r["seconds"], 2) for r in runs[engine]],
                # the protocol step alone (stats.json); the rest is start-up, reading, metadata, column cache
                "protocol_seconds_median": round(statistics.median(r["protocol_seconds"] for r in runs[engine]), 2),
                "peak_rss_gb_max": round(max(r["peak_rss_gb"] for r in runs[engine]), 3),
                "us_per_event": round(seconds / events * 1e6, 3), "events_per_s": round(events / seconds),
                "input_bytes": path.stat().st_size, "output_bytes": output_bytes,
                "users": stats["users"], "items": stats["items"], "vocab_sizes": stats["vocab_sizes"],
                "ctr_samples": {s: stats[s]["samples"] for s in ("ctr_train", "ctr_valid", "ctr_test")},
            })
        if "pandas" in engines:
            rows = [r for r in results if r["events"] == events]
            pair = {r["engine"]: r["seconds_median"] for r in rows}
            for r in rows:
                r["duckdb_speedup_over_pandas"] = round(pair["pandas"] / pair["duckdb"], 2)
    report = {
        "benchmark": "S: hybrid data prepare, protocol last-item, Taobao-shaped synthetic events",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "memory_limit": args.memory_limit, "results": results,
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'events':>12} {'engine':7} {'median s':>9} {'peak RSS GB':>12} {'us/event':>9}")
    for r in results:
        print(f"{r['events']:>12,} {r['engine']:7} {r['seconds_median']:>9.1f} {r['peak_rss_gb_max']:>12.2f} "
              f"{r['us_per_event']:>9.2f}")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
