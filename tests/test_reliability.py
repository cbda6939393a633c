"""Reliability of a training run (issue 17.5 / 17.6), against real MLflow stores (SQLite files, no mocks):

- the tracking store is checked before any work: an unreachable server or a read-only SQLite store is one
  line (exit 2) within seconds, not after MLflow's minutes of retries;
- two runs opening one fresh SQLite store at the same moment both succeed (the schema is created under a lock);
- SIGTERM / SIGINT stop a training run at a step boundary with a complete checkpoint, the MLflow run KILLED,
  exit 128 + signal, and ``--resume`` continues from that checkpoint.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from hybrid.cli import EXIT_BAD_INPUT, main
from hybrid.tracking import open_client

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "pretrain_tiny.yaml"


def _pretrain_argv(data: Path, out: Path, uri: str, *extra: str) -> list[str]:
    return ["pretrain", "--config", str(TINY), "--set", f"data={data}", "--set", f"out={out}",
            "--tracking-uri", uri, "--experiment", "rel", *extra]


def _one_line_error(argv: list[str], capsys) -> tuple[str, float]:
    started = time.perf_counter()
    rc = main(argv)
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err, seconds


# ---- 1. the tracking store is checked before any work ------------------------------------------------------

def test_unreachable_tracking_server_is_one_line_within_seconds(prepared_last_item_dir, tmp_path, capsys):
    uri = "http://127.0.0.1:9"  # the discard port: nothing listens
    out = tmp_path / "run"
    err, seconds = _one_line_error(_pretrain_argv(prepared_last_item_dir, out, uri), capsys)
    assert uri in err and "not reachable" in err
    assert seconds < 15, f"took {seconds:.1f} s"
    assert not out.exists()  # refused before anything was written


def _read_only(path: Path) -> None:
    path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def test_read_only_sqlite_store_is_one_line(prepared_last_item_dir, tmp_path, capsys):
    db = tmp_path / "ro" / "mlflow.db"
    open_client(f"sqlite:///{db}")  # an existing store, then made read-only
    _read_only(db)
    out = tmp_path / "run"
    started = time.perf_counter()
    err, _ = _one_line_error(_pretrain_argv(prepared_last_item_dir, out, f"sqlite:///{db}"), capsys)
    assert f"sqlite:///{db}" in err and "not writable" in err and str(db) in err
    assert time.perf_counter() - started < 15
    assert not out.exists()


def test_sqlite_store_in_read_only_directory_is_one_line(prepared_last_item_dir, tmp_path, capsys):
    directory = tmp_path / "locked"
    directory.mkdir()
    _read_only(directory)
    try:
        uri = f"sqlite:///{directory / 'mlflow.db'}"
        err, seconds = _one_line_error(_pretrain_argv(prepared_last_item_dir, tmp_path / "run", uri), capsys)
        assert uri in err and "directory" in err and "not writable" in err
        assert seconds < 15
    finally:
        directory.chmod(0o755)


# ---- 2. two runs on one fresh SQLite store at once ---------------------------------------------------------

_CONCURRENT_RUN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from hybrid.tracking import Tracker
    uri, go, name = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    import mlflow  # the slow import before the barrier, so both processes open the store together
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.005)
    tracker = Tracker(uri, experiment="race", enabled=True)
    with tracker.run(name) as run:
        tracker.log_params(run, {"who": name})
        tracker.log_metrics(run, {"valid/auc": 0.5}, step=1)
""")


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(3))
def test_two_runs_on_one_fresh_sqlite_store_both_succeed(tmp_path, trial):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_RUN, uri, str(go), f"run{i}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        go.touch()
        results = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["run0", "run1"]
    assert {r.info.status for r in runs} == {"FINISHED"}
