"""Reliability of a training run (issue 17.5 / 17.6), against real MLflow stores (SQLite files, no mocks):

- the tracking store is checked before any work: an unreachable server or a read-only SQLite store is one
  line (exit 2) within seconds, not after MLflow's minutes of retries;
- two runs opening one fresh SQLite store at the same moment both succeed (the schema is created under a lock);
- SIGTERM / SIGINT stop a training run at a step boundary with a complete checkpoint, the MLflow run KILLED,
  exit 128 + signal, and ``--resume`` continues from that checkpoint, in the same MLflow run.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from hybrid.cli import EXIT_BAD_INPUT, main
from hybrid.core.checkpoint import latest_checkpoint, verify_checkpoint
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


# ---- 3. SIGTERM / SIGINT stop at a step boundary, with a checkpoint ----------------------------------------

def _interrupted_pretrain(data: Path, tmp_path: Path, sig: signal.Signals, *extra: str):
    """Start a tiny pretraining run in a subprocess, send ``sig`` once its first checkpoint exists; return
    ``(process, stderr, out, uri, argv)``."""
    out, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = _pretrain_argv(data, out, uri, "--set", "train.max_steps=150", "--set", "train.checkpoint_every=7",
                          "--set", "train.eval_every=1000", *extra)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hybrid", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while latest_checkpoint(out / "checkpoints") is None:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        time.sleep(0.3)  # a few steps past the first checkpoint
        sent = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert time.monotonic() - sent < 60
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, err, out, uri, argv


@pytest.mark.slow
def test_sigterm_stops_at_a_step_with_a_checkpoint_and_resume_continues(prepared_last_item_dir, tmp_path, capsys):
    proc, err, out, uri, argv = _interrupted_pretrain(prepared_last_item_dir, tmp_path, signal.SIGTERM)
    assert proc.returncode == 143, err[-3000:]
    line = err.strip().splitlines()[-1]
    match = re.fullmatch(r"interrupted by SIGTERM at step (\d+); checkpoint (\S+) written \(continue with --resume\)",
                         line)
    assert match, err[-3000:]
    step = int(match.group(1))
    assert 7 <= step < 150
    last = latest_checkpoint(out / "checkpoints")
    assert last == Path(match.group(2)) and last.name == f"step-{step:08d}"
    assert verify_checkpoint(last)["step"] == step

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("rel").experiment_id])
    assert run.info.status == "KILLED"

    assert main([*argv, "--resume"]) == 0, capsys.readouterr().err
    assert latest_checkpoint(out / "checkpoints").name == "step-00000150"
    (resumed,) = client.search_runs([run.info.experiment_id])   # the same MLflow run, continued
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert resumed.data.tags["resumed_from"] == str(last) and "resumed_at" in resumed.data.tags
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert min(steps) < step < max(steps) == 150   # before the signal and after the resume, in one history


@pytest.mark.slow
def test_sigint_stops_with_exit_130_and_the_run_killed(prepared_last_item_dir, tmp_path):
    proc, err, out, uri, _ = _interrupted_pretrain(prepared_last_item_dir, tmp_path, signal.SIGINT)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("interrupted by SIGINT at step ")
    manifest = verify_checkpoint(latest_checkpoint(out / "checkpoints"))
    assert int(err.strip().splitlines()[-1].split()[5].rstrip(";")) == manifest["step"]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("rel").experiment_id])
    assert run.info.status == "KILLED"


@pytest.mark.slow
def test_sigterm_stops_finetuning_with_the_last_checkpoint_and_resume_continues(prepared_ratings_dir, tmp_path,
                                                                                 capsys):
    out, uri = tmp_path / "ft", f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["finetune", "--config", str(REPO / "configs/finetune_tiny.yaml"), "--set", f"data={prepared_ratings_dir}",
            "--set", f"out={out}", "--set", "train.epochs=6", "--set", "train.eval_every=10",
            "--tracking-uri", uri, "--experiment", "rel-ft"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hybrid", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while latest_checkpoint(out / "checkpoints" / "best") is None:  # the first evaluation: training runs
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    match = re.fullmatch(r"interrupted by SIGTERM at step (\d+); checkpoint (\S+) written \(continue with --resume\)",
                         err.strip().splitlines()[-1])
    assert match, err[-3000:]
    last = latest_checkpoint(out / "checkpoints" / "last")
    assert last == Path(match.group(2)) and verify_checkpoint(last)["step"] == int(match.group(1))
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("rel-ft").experiment_id])
    assert run.info.status == "KILLED"

    # the interrupted run is not "finished": it is refused without --resume and continued with it, in its MLflow run
    err, _ = _one_line_error(argv, capsys)
    assert "an interrupted run: pass --resume to continue it, or choose another out" in err
    assert main([*argv, "--resume"]) == 0, capsys.readouterr().err
    (resumed,) = client.search_runs([run.info.experiment_id])
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert resumed.data.tags["resumed_from"] == str(last)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "valid/auc")]
    assert min(steps) <= int(match.group(1)) < max(steps)
    err, _ = _one_line_error([*argv, "--resume"], capsys)
    assert "this fine-tuning run finished (result.json is written); nothing to resume" in err


# ---- 4. a killed worker of a 2-process run -----------------------------------------------------------------

def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def _torchrun_pretrain(data: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path, dict[int, int]]:
    """A tiny 2-process pretraining run under torchrun, once its first checkpoint exists: ``(torchrun, out,
    {rank: worker pid})``."""
    out, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = _pretrain_argv(data, out, uri, "--set", "train.checkpoint_every=5", "--set", "train.eval_every=1000",
                          *extra)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "hybrid", *argv], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while latest_checkpoint(out / "checkpoints") is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint: {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    workers = {_rank_of(pid): pid for pid in _children(proc.pid)}
    assert set(workers) == {0, 1}, workers
    return proc, out, workers


@pytest.mark.slow
@pytest.mark.distributed
def test_kill_9_of_one_worker_ends_the_other_within_60_s(prepared_last_item_dir, tmp_path):
    """torchrun's agent sees the dead worker and stops the other; its report names the root cause."""
    proc, out, workers = _torchrun_pretrain(prepared_last_item_dir, tmp_path)
    try:
        killed = time.monotonic()
        os.kill(workers[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        seconds = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert seconds < 60, err[-3000:]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*exitcode\s*: -9", err), err[-3000:]
    assert verify_checkpoint(latest_checkpoint(out / "checkpoints"))  # the last complete one survives


@pytest.mark.slow
@pytest.mark.distributed
def test_a_hung_worker_ends_the_other_within_the_collective_timeout(prepared_last_item_dir, tmp_path):
    """A worker that hangs (SIGSTOP: alive, so torchrun waits) — the other fails its collective after
    ``train.collective_timeout_s`` with one line naming itself, instead of waiting torch's 30 minutes."""
    proc, out, workers = _torchrun_pretrain(prepared_last_item_dir, tmp_path, "--set", "train.collective_timeout_s=10")
    try:
        stopped = time.monotonic()
        os.kill(workers[1], signal.SIGSTOP)
        deadline = stopped + 60
        while Path(f"/proc/{workers[0]}").exists() and _rank_of(workers[0]) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        seconds = time.monotonic() - stopped
    finally:
        for pid in workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    assert seconds < 60, err[-3000:]
    line = next((x for x in err.splitlines() if x.startswith("error: rank 0 of 2: a collective failed or timed out")),
                None)
    assert line is not None, err[-3000:]
    assert "after 10.0 s" in line or "after 10 s" in line
    assert verify_checkpoint(latest_checkpoint(out / "checkpoints"))
