"""Tracking never costs training work (issue 17.6), against a real ``mlflow server`` that is killed mid-run:

- logging returns at once and the run ends within its flush timeout, not after MLflow's minutes of retries;
- one warning line says the store stopped answering; the calls it missed are in the fallback log, and
  ``hybrid tracking import`` replays them (runs started while it was down included, nested under their parent);
- a training run whose server dies keeps training and checkpointing to its last step and exits 0;
- a resumed pretraining run continues the MLflow run its checkpoint names.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from hybrid.cli import EXIT_BAD_INPUT, main
from hybrid.core.checkpoint import latest_checkpoint, verify_checkpoint
from hybrid.tracking import FALLBACK_NAME, OFFLINE_PREFIX, PARENT_TAG, Tracker

REPO = Path(__file__).resolve().parents[1]
MLFLOW = Path(sys.executable).with_name("mlflow")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``mlflow server`` on a free port over a SQLite store in ``root`` (the store outlives the server)."""

    def __init__(self, root: Path) -> None:
        self.db = root / "server.db"
        self.store = f"sqlite:///{self.db}"
        self.uri = f"http://127.0.0.1:{_free_port()}"
        self.log = open(root / "server.log", "w")
        self.proc = subprocess.Popen(
            [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", self.uri.rsplit(":", 1)[1], "--workers", "1",
             "--backend-store-uri", self.store, "--no-serve-artifacts",
             # artifacts in a plain directory: the import below writes to the server's store without the server
             "--default-artifact-root", (root / "artifacts").as_uri()],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not start within 120 s"
            time.sleep(0.25)

    def kill(self) -> None:
        """SIGKILL the server and its workers: gone without a word, as a crashed host is."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path)
    yield srv
    srv.kill()


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.slow
def test_a_server_that_dies_mid_run_costs_a_warning_and_import_restores_every_call(server, tmp_path, capsys):
    fallback = tmp_path / "out" / FALLBACK_NAME
    tracker = Tracker(server.uri, "vanishing", enabled=True, fallback=fallback)
    with tracker.run("pipeline") as parent:
        with tracker.run("stage", parent=parent, tags={"stage": "pretrain"}) as run:
            tracker.log_params(run, {"lr": 1e-3})
            for step in range(1, 6):
                tracker.log_metrics(run, {"train/loss": 1.0 / step}, step=step)
            tracker.flush()
            assert _history(MlflowClient(server.uri), run, "train/loss") == {s: 1.0 / s for s in range(1, 6)}

            server.kill()
            started = time.monotonic()
            for step in range(6, 11):
                tracker.log_metrics(run, {"train/loss": 1.0 / step}, step=step)   # returns at once: queued
            assert time.monotonic() - started < 1.0
            tracker.set_tags(run, {"one_epoch_drop": "false"})
            tracker.log_json(run, {"hr_at_10": 0.1}, "result.json")
        # a stage that starts while the store is down is created offline, nested under its parent on import
        with tracker.run("late stage", parent=parent, tags={"stage": "finetune"}) as late:
            tracker.log_metrics(late, {"valid/auc": 0.7}, step=3)
        ended = time.monotonic() - started
    assert ended < 3 * 60, f"the runs took {ended:.0f} s to end after the server died"
    assert late.startswith(OFFLINE_PREFIX)

    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: tracking store")]
    assert len(warnings) == 1 and server.uri in warnings[0] and str(fallback) in warnings[0], err
    records = [json.loads(line) for line in fallback.read_text().splitlines()]
    missed = sorted(m[3] for r in records if r["run_id"] == run for m in r.get("metrics", ()))
    assert set(range(6, 11)) <= set(missed), records
    assert {"create_run", "set_terminated", "log_artifact"} <= {r["op"] for r in records}

    # the server's own store, read directly: what got there before the crash, and nothing more
    store = MlflowClient(server.store)
    assert store.get_run(run).info.status == "RUNNING"
    assert max(_history(store, run, "train/loss")) <= 5

    assert main(["tracking", "import", str(fallback), "--tracking-uri", server.store]) == 0, capsys.readouterr().err
    assert not fallback.exists() and fallback.with_name(FALLBACK_NAME + ".imported").is_file()
    assert _history(store, run, "train/loss") == {s: 1.0 / s for s in range(1, 11)}
    finished = store.get_run(run)
    assert finished.info.status == "FINISHED" and finished.data.tags["one_epoch_drop"] == "false"
    assert finished.data.params == {"lr": "0.001"}
    assert [a.path for a in store.list_artifacts(run)] == ["result.json"]
    assert store.get_run(parent).info.status == "FINISHED"
    (created,) = [r for r in store.search_runs([finished.info.experiment_id]) if r.info.run_name == "late stage"]
    assert created.data.tags[PARENT_TAG] == parent and created.info.status == "FINISHED"
    assert _history(store, created.info.run_id, "valid/auc") == {3: 0.7}


def test_import_refuses_a_file_that_is_not_a_fallback_log(tmp_path, capsys):
    bad = tmp_path / "notes.jsonl"
    bad.write_text('{"op": "log_batch", "run_id": "r1"}\nnot json\n')
    assert main(["tracking", "import", str(bad), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err == f"error: {bad}, line 2: not a tracking record (a hybrid fallback log has one JSON object with " \
                  "'op' and 'run_id' per line)\n"
    assert bad.is_file()  # refused: nothing renamed
    assert main(["tracking", "import", str(tmp_path / "missing.jsonl")]) == EXIT_BAD_INPUT
    assert "missing.jsonl: fallback log not found" in capsys.readouterr().err


@pytest.mark.slow
def test_pretraining_goes_on_when_its_server_dies_and_the_log_completes_the_run(server, prepared_last_item_dir,
                                                                               tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["pretrain", "--config", str(REPO / "configs" / "pretrain_tiny.yaml"), "--set", f"data={prepared_last_item_dir}",
            "--set", f"out={out}", "--set", "train.max_steps=60", "--set", "train.checkpoint_every=10",
            "--set", "train.log_every=5", "--set", "train.eval_every=30", "--tracking-uri", server.uri,
            "--experiment", "vanishing-pretrain", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hybrid", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while latest_checkpoint(out / "checkpoints") is None:   # training is under way, and logged
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        server.kill()
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and err.count("warning: tracking store") == 1, err[-3000:]
    assert verify_checkpoint(latest_checkpoint(out / "checkpoints"))["step"] == 60   # trained and saved to the end

    store = MlflowClient(server.store)
    (run,) = store.search_runs([store.get_experiment_by_name("vanishing-pretrain").experiment_id])
    assert run.info.status == "RUNNING" and max(_history(store, run.info.run_id, "train/loss"), default=0) < 60
    assert main(["tracking", "import", str(out / FALLBACK_NAME), "--tracking-uri", server.store]) == 0
    done = store.get_run(run.info.run_id)
    assert done.info.status == "FINISHED"
    assert sorted(_history(store, run.info.run_id, "train/loss")) == list(range(5, 61, 5))
    assert 60 in _history(store, run.info.run_id, "eval/hr_at_10")
