"""Issue 17.4: how long the CLI takes to answer ``--help`` and a typo (target < 1.5 s on the 2-core machine).

Each case is a fresh ``python -m hybrid ...`` process, timed wall-clock from start to exit; the cases alternate
within each repeat and the figure is the median over ``--repeats``. For scale, the same run times the import the
early checks avoid (``import torchrec, mlflow``), which a command pays only once its input is known to be there.

    python bench/cli_startup.py [--repeats 7] [--out bench/results/cli_startup.json]
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

CASES = {
    "hybrid --help": ["-m", "hybrid", "--help"],
    "finetune, missing config": ["-m", "hybrid", "finetune", "--config", "missing.yaml"],
    "finetune, prepared data not there": ["-m", "hybrid", "finetune", "--config",
                                          str(REPO / "configs/finetune_tiny.yaml"), "--set", "data=nowhere"],
    "score, missing checkpoint": ["-m", "hybrid", "score", "--model", "nowhere", "--input", "x.csv",
                                  "--out", "s.parquet"],
    "prepare, missing input": ["-m", "hybrid", "data", "prepare", "--dataset", "events", "--path", "nowhere.csv",
                               "--out", "o"],
    "(reference) import torchrec, mlflow": ["-c", "import torchrec, mlflow"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(REPO / "bench/results/cli_startup.json"))
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    seconds: dict[str, list[float]] = {name: [] for name in CASES}
    with tempfile.TemporaryDirectory() as cwd:
        for _ in range(args.repeats):
            for name, argv in CASES.items():
                start = time.perf_counter()
                done = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True)
                seconds[name].append(time.perf_counter() - start)
                expected = 0 if name.startswith(("hybrid --help", "(reference)")) else 2
                if done.returncode != expected:
                    raise SystemExit(f"{name}: exit {done.returncode}, expected {expected}\n{done.stderr[-2000:]}")
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average": os.getloadavg()},
        "repeats": args.repeats,
        "median_s": {name: round(statistics.median(v), 3) for name, v in seconds.items()},
        "all_s": {name: [round(x, 3) for x in v] for name, v in seconds.items()},
        "target_s": 1.5,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    width = max(map(len, CASES))
    for name, median in result["median_s"].items():
        print(f"{name:<{width}}  {median:6.2f} s")


if __name__ == "__main__":
    main()
