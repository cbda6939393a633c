"""Run a 2-process ``torchrun`` job from a test, the way every distributed test here does.

About one 2-process run in ten under the full suite (never when run alone: 0 of 11) has one rank abort with
"terminate called without an active exception" (SIGABRT from gloo/TorchRec C++ code; cause not found yet —
see the closing notes). That exact abort is reported as a warning with its log and the job is run once more
from scratch (``reset`` clears what the first attempt wrote); any other failure fails the test.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RANK_ABORT = "terminate called without an active exception"


def run_torchrun(args: Sequence[str], *, timeout: int, cwd: str | Path | None = None,
                 reset: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node=2 *args`` (1 thread per rank)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    if done.returncode != 0 and RANK_ABORT in done.stderr:
        warnings.warn(f"2-process run: one rank aborted ({RANK_ABORT!r}); retried once. "
                      f"stderr tail:\n{done.stderr[-6000:]}")
        if reset is not None:
            reset()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    return done
