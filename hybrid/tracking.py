"""The one module that talks to MLflow.

- Tracking URI: the explicit argument, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<working dir>/mlflow.db``
  — MLflow's own default, so ``mlflow ui`` and ``hybrid review`` started in the same directory find the runs of
  every stage, and the store never lives inside an output directory that a stage replaces.
  Experiments this module creates in a SQLite store keep their artifacts beside it
  (``<store dir>/mlartifacts``), not in ``./mlruns`` under whatever directory the process started in.
- One experiment per study; one parent run per pipeline; nested runs per stage (``mlflow.parentRunId``).
- Params are logged once per run (flattened config: ``model.backbone.dim``); metrics carry a ``step``
  and, when given, the fractional epoch as ``progress/epoch`` at the same step; names like ``valid/auc``.
- Tags: MLflow's reserved source tags (``mlflow.source.name`` / ``.type`` / ``.git.commit``, ``mlflow.user``),
  the data hash, package versions, and whatever the stage adds (strategy, model size...); path-valued tags
  (:data:`PATH_TAGS`) are absolute. Experiments this module creates are tagged ``mlflow.experimentKind =
  custom_model_development``, so the UI opens its classic (training) view, not the GenAI one.
- Prepared data is logged as MLflow dataset inputs (:meth:`Tracker.log_prepared_data`): digest = its data hash.
- Optional system metrics (``tracking.system_metrics: true``, needs ``psutil``): CPU / memory / disk / network
  (and GPU) as ``system/...`` metrics of every run, sampled by MLflow's own monitor.
- Only rank 0 logs: on other ranks every call is a no-op, so stage code need not check.
- Reachability (:func:`check_tracking`): before a stage does any work, a server that does not answer within a
  few seconds (no retries) or a SQLite store that is not writable is one line (:class:`TrackingError`, exit 2).
- A fresh SQLite store is created (MLflow's schema) once, under a file lock beside it (``<db>.lock``), so two
  runs starting together on one new store do not race on the schema migration.
- Tracking never costs training work (:class:`Delivery`): writes go through a bounded queue to one background
  thread, with retries; a store that stops answering mid-run is one warning line, training and checkpointing
  go on, and the calls it missed are written to a fallback log (``<out>/mlflow_fallback.jsonl``) that
  ``hybrid tracking import FILE`` (:func:`import_fallback`) replays later. A resumed training run continues the
  MLflow run its checkpoint names (``Tracker.run(..., resume=run_id)``).

Example:
    >>> tracker = Tracker(resolve_tracking_uri(None), experiment="ml-100k", enabled=True)   # ./mlflow.db
    >>> with tracker.run("pipeline") as parent:
    ...     with tracker.run("pretrain", parent=parent) as stage:
    ...         tracker.log_params(stage, {"lr": 1e-3})
    ...         tracker.log_metrics(stage, {"eval/hr_at_10": 0.12}, step=100, epoch=0.5)
    >>> run = tracker.client.get_run(stage)
    >>> run.data.metrics["eval/hr_at_10"], run.data.tags["mlflow.parentRunId"] == parent, run.info.status
    (0.12, True, 'FINISHED')
"""
from __future__ import annotations

import contextlib
import fcntl
import getpass
import importlib.util
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybrid.config import flatten
from hybrid.core.errors import HybridInputError, TrackingError

PARENT_TAG = "mlflow.parentRunId"


class TAGS:
    """Run tag names every stage uses, so ``hybrid review`` and ``mlflow ui`` filters find them."""

    stage = "stage"                  # prepare | pretrain | finetune | sweep | review | pipeline
    strategy = "strategy"            # nt | ft | st | ft_sf | st_sf
    model_size = "model_size"        # L4H64A4
    dense_params = "dense_params"    # backbone parameters (GPSD's count)
    sparse_params = "sparse_params"  # embedding-table parameters
    seed = "seed"
    ranker = "ranker"
    data_hash = "data_hash"
    git_commit = "git_commit"
    one_epoch_drop = "one_epoch_drop"
    pretrain_run = "pretrain_run_id"
    pretrain_checkpoint = "pretrain_checkpoint"
    resumed_from = "resumed_from"


#: tags whose value is a path: logged absolute (a relative one means nothing to ``mlflow ui`` started elsewhere)
PATH_TAGS = (TAGS.pretrain_checkpoint, TAGS.resumed_from)

#: the experiment tag MLflow 3's UI reads to choose its view, and the value of its classic ML / custom model view
#: (``ExperimentKind.CUSTOM_MODEL_DEVELOPMENT`` of the UI; MLflow's Python package has no constant for it)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

#: ``mlflow.data.context`` of the prepared directory as ``hybrid data prepare`` logs it (what the stage wrote)
OUTPUT_CONTEXT = "output"
#: the prepared tables each training stage reads → their ``mlflow.data.context`` (its dataset inputs)
PRETRAIN_INPUTS = {"pretrain_train": "training", "pretrain_eval": "validation"}
FINETUNE_INPUTS = {"ctr_train": "training", "ctr_valid": "validation", "ctr_test": "test"}

MAX_PARAM_LENGTH = 6000  # MLflow's limit for a param value


#: the store every command uses when given none (MLflow 3's own default, in the working directory)
DEFAULT_STORE = "mlflow.db"


def resolve_tracking_uri(explicit: str | None) -> str:
    """Argument, then ``MLFLOW_TRACKING_URI``, then ``sqlite:///<working dir>/mlflow.db`` (absolute).

    Not inside a stage's output: ``hybrid data prepare`` replaces its output directory atomically, which
    would delete an open store with it.
    """
    if explicit:
        return explicit
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd().resolve() / DEFAULT_STORE}"


#: seconds a reachability probe waits for a tracking server (one attempt, no retries)
PROBE_TIMEOUT_S = 5
SQLITE_PREFIX = "sqlite:///"
_checked: set[str] = set()


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``None`` for other stores and in-memory SQLite)."""
    if not tracking_uri.startswith(SQLITE_PREFIX):
        return None
    path = tracking_uri[len(SQLITE_PREFIX):].split("?", 1)[0]
    return Path(path).resolve() if path and path != ":memory:" else None


@contextlib.contextmanager
def store_lock(db: Path) -> Iterator[None]:
    """An exclusive ``fcntl.flock`` on ``<db>.lock`` (beside the database), released on exit."""
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _not_writable(path: Path) -> bool:
    """No write permission for this process, or no write bit at all (a file made read-only on purpose:
    root would write it anyway)."""
    return not os.access(path, os.W_OK) or not path.stat().st_mode & 0o222


def _check_sqlite(uri: str, db: Path) -> None:
    """A SQLite store is usable: its directory (or the nearest existing parent) and the file are writable
    (SQLite writes a journal beside the file); then it is opened once under :func:`store_lock` (a fresh store
    gets its schema here)."""
    directory = db.parent
    while not directory.exists() and directory != directory.parent:  # MLflow creates missing directories
        directory = directory.parent
    for path, what in ((directory, "directory"), (db, "file")):
        if path.exists() and _not_writable(path):
            raise TrackingError(f"{uri}: tracking store {what} {path} is not writable (choose another "
                                f"--tracking-uri or fix its permissions)")
    try:
        open_client(uri)
    except Exception as err:  # noqa: BLE001 - not a SQLite file, a locked or corrupt one
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TrackingError(f"{uri}: cannot open the tracking store ({first[:200]})") from None


def _check_server(uri: str, timeout_s: float) -> None:
    """One request to the server (``search_experiments``), ``timeout_s`` seconds, no retries."""
    from mlflow import MlflowClient

    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(max(1, int(timeout_s))))
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - connection refused, timeout, HTTP error: all mean "cannot log"
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TrackingError(f"{uri}: tracking server not reachable within {timeout_s:g} s ({first[:200]}); start "
                            f"it, or choose another --tracking-uri") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_tracking(tracking_uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Refuse a tracking store this process cannot log to, in seconds, before any work (once per URI).

    ``http(s)://``: one request, ``timeout_s`` seconds, no retries (MLflow's own client retries for minutes).
    ``sqlite:///``: the file and its directory writable; the store is opened (its schema created under a lock).
    Other schemes (``databricks``...) are left to MLflow.

    Raises:
        TrackingError: one line naming the URI and what is wrong.
    """
    if tracking_uri in _checked:
        return
    db = sqlite_path(tracking_uri)
    if db is not None:
        _check_sqlite(tracking_uri, db)
    elif tracking_uri.startswith(("http://", "https://")):
        _check_server(tracking_uri, timeout_s)
    _checked.add(tracking_uri)


def open_client(tracking_uri: str):
    """An :class:`mlflow.MlflowClient` of ``tracking_uri`` whose store is open: a SQLite one is opened under
    :func:`store_lock`, so MLflow creates a fresh store's schema once even when runs start together."""
    from mlflow import MlflowClient

    db = sqlite_path(tracking_uri)
    if db is None:
        return MlflowClient(tracking_uri=tracking_uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    with store_lock(db):  # MlflowClient() builds the store: a fresh one gets its tables here
        client = MlflowClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)
    return client


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment's artifacts go: ``<dir of the SQLite file>/mlartifacts`` for a ``sqlite:///``
    store (MLflow's own default is ``./mlruns`` relative to the current directory), else MLflow's default."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    return (Path(tracking_uri[len(prefix):]).resolve().parent / "mlartifacts").as_uri()


def is_rank_zero() -> bool:
    """True outside distributed runs and on rank 0 inside them."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return int(os.environ.get("RANK", "0")) == 0


def git_commit(path: str | os.PathLike | None = None) -> str:
    """The commit of the repository holding this package (or ``path``), ``unknown`` outside git."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def source_name() -> str:
    """``mlflow.source.name``: the program that runs (as ``mlflow.start_run`` names it: the absolute path of the
    main script, e.g. ``.../bin/hybrid`` or ``.../hybrid/__main__.py``), else ``hybrid``."""
    main = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    return os.path.abspath(main) if main is not None and main.is_file() else "hybrid"


def source_tags(commit: str | None = None) -> dict[str, str]:
    """MLflow's reserved source tags: program, source type ``LOCAL``, user, and the git commit when known
    (``commit``: default :func:`git_commit`)."""
    from mlflow.entities import SourceType
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name (some containers)
        user = "unknown"
    tags = {MLFLOW_SOURCE_NAME: source_name(), MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL),
            MLFLOW_USER: user}
    commit = commit or git_commit()
    if commit != "unknown":
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


def environment_tags() -> dict[str, str]:
    """The tags of every run: :func:`source_tags`, ``git_commit`` (the same commit, kept for saved searches)
    and the torch / TorchRec versions."""
    import torch

    commit = git_commit()
    tags = {**source_tags(commit), TAGS.git_commit: commit, "torch_version": torch.__version__}
    try:
        import torchrec

        tags["torchrec_version"] = torchrec.__version__
    except ImportError:  # pragma: no cover
        pass
    return tags


def absolute_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    """``tags`` as strings, the :data:`PATH_TAGS` among them made absolute (URIs such as ``s3://...`` kept)."""
    out = {k: str(v) for k, v in tags.items()}
    for key in PATH_TAGS:
        if out.get(key) and "://" not in out[key]:
            out[key] = os.path.abspath(out[key])
    return out


# -- delivery: a bounded queue, retries, and a fallback log the store never misses -------------------------------

#: queued tracking calls at most (a training step never waits for the store: past this, calls go to the fallback log)
QUEUE_SIZE = 10_000
#: attempts per call while the store answers (then the call goes to the fallback log), and the first back-off
RETRIES, BACKOFF_S = 3, 0.5
#: seconds between reconnection attempts once the store stopped answering
RECONNECT_S = 30.0
#: seconds a run's end waits for its queued calls to reach the store (what is left goes to the fallback log)
FLUSH_TIMEOUT_S = 60.0
#: MLflow's own HTTP client: one request, this many seconds (its default retries for minutes per call)
HTTP_TIMEOUT_S = 10
#: the fallback log's name inside a stage's output directory
FALLBACK_NAME = "mlflow_fallback.jsonl"
#: run ids of runs created while the store did not answer: they live in the fallback log until imported
OFFLINE_PREFIX = "offline-"
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100  # MLflow's log_batch limits


def _first_line(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text[:200]


def _transient(err: BaseException) -> bool:
    """Worth retrying: the store did not answer (connection, timeout, 5xx, 429, a locked SQLite file) — not a
    request the store refused (4xx: a param changed its value, a deleted run)."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        code = err.get_http_status_code()
        return code >= 500 or code == 429
    return True


class FallbackLog:
    """The tracking calls that did not reach the store, one JSON object per line, in the order they were made.

    ``hybrid tracking import FILE`` (:func:`import_fallback`) replays them into a store. Artifacts are copied into
    ``<file stem>_artifacts/`` beside it. Written line by line (flushed), so a crash keeps what was recorded.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.records = 0
        self._lock = threading.Lock()

    @property
    def artifact_dir(self) -> Path:
        return self.path.with_name(self.path.stem + "_artifacts")

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record``; an artifact is copied beside the log first (its file may be a temporary one)."""
        if record.get("op") == "log_artifact":
            local = Path(record["local_path"])
            if local.exists() and self.artifact_dir not in local.parents:
                record = {**record, "local_path": str(self.keep_artifact(record["run_id"], local,
                                                                         record.get("artifact_path")))}
        line = json.dumps(record, default=str)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
            self.records += 1

    def keep_artifact(self, run_id: str, local_path: Path, artifact_path: str | None) -> Path:
        """A copy of ``local_path`` (file or directory) under :attr:`artifact_dir` (the original may be temporary)."""
        target = self.artifact_dir / run_id / (artifact_path or "") / local_path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if local_path.is_dir():
            shutil.copytree(local_path, target, dirs_exist_ok=True)
        else:
            shutil.copy2(local_path, target)
        return target


def apply_record(client, record: Mapping[str, Any], run_ids: Mapping[str, str] | None = None) -> str | None:
    """Make the tracking call ``record`` describes (the queue's calls and the fallback log's lines alike).

    ``run_ids`` maps offline run ids to the runs created for them (import); returns the id of a created run.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

    ids = run_ids or {}
    run_id = ids.get(record["run_id"], record["run_id"])
    op = record["op"]
    if op == "log_batch":
        client.log_batch(run_id, metrics=[Metric(k, float(v), int(t), int(s)) for k, v, t, s in record.get("metrics", ())],
                         params=[Param(k, str(v)) for k, v in record.get("params", ())],
                         tags=[RunTag(k, str(v)) for k, v in record.get("tags", ())])
    elif op == "set_terminated":
        client.set_terminated(run_id, status=record["status"], end_time=record.get("end_time"))
    elif op == "log_artifact":
        path = Path(record["local_path"])
        if path.is_dir():
            client.log_artifacts(run_id, str(path), record.get("artifact_path"))
        else:
            client.log_artifact(run_id, str(path), record.get("artifact_path"))
    elif op == "log_inputs":
        client.log_inputs(run_id, datasets=[
            DatasetInput(Dataset(**d["dataset"]), tags=[InputTag(k, v) for k, v in d["tags"].items()])
            for d in record["datasets"]])
    elif op == "create_run":
        experiment = record["experiment"]
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else client.create_experiment(
            experiment, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        tags = dict(record.get("tags") or {})
        if tags.get(PARENT_TAG) in ids:
            tags[PARENT_TAG] = ids[tags[PARENT_TAG]]
        run = client.create_run(experiment_id, start_time=record.get("start_time"), tags=tags,
                                run_name=record.get("run_name"))
        return run.info.run_id
    else:
        raise ValueError(f"unknown tracking record {op!r}")
    return None


class Delivery:
    """Hands a tracker's calls to the store from one background thread, so training never waits on MLflow.

    Calls go through a bounded queue (:data:`QUEUE_SIZE`); each is tried :data:`RETRIES` times with back-off
    while the store answers. When the store stops answering, one warning line says so, the run keeps
    training, and calls go to the :class:`FallbackLog` — every :data:`RECONNECT_S` seconds one is tried
    again, and when the store answers again a line says so. :meth:`flush` (at each run's end) waits up to
    :data:`FLUSH_TIMEOUT_S` for the queue; what is still queued then is written to the fallback log too.

    Args:
        client: the :class:`mlflow.MlflowClient` the calls go to.
        fallback: where undelivered calls go.
        uri: the store's URI (for the messages).
    """

    def __init__(self, client, fallback: FallbackLog, uri: str) -> None:
        self.client, self.fallback, self.uri = client, fallback, uri
        self.offline = False          # the last call failed: calls go to the fallback log between attempts
        self._last_attempt = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_SIZE)
        self._in_flight: Mapping[str, Any] | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, record: Mapping[str, Any]) -> None:
        """Queue one call (never blocks: a full queue sends it to the fallback log)."""
        if str(record["run_id"]).startswith(OFFLINE_PREFIX):
            self.fallback.write(record)   # a run the store has never seen: all of it waits for the import
            return
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.fallback.write(record)
        self._ensure_thread()

    def call(self, record: Mapping[str, Any]) -> bool:
        """Make one call now, in this thread (artifacts, dataset inputs): one attempt, or none while the store is
        offline between reconnection attempts; a failure goes to the fallback log. True when delivered."""
        if str(record["run_id"]).startswith(OFFLINE_PREFIX) or not self._should_try():
            self.fallback.write(record)
            return False
        return self._deliver(record, attempts=1)

    def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Wait until the queued calls are delivered (or written to the fallback log), at most ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._queue.all_tasks_done.wait(left)
        if self._queue.unfinished_tasks:  # the store hangs: keep the rest (and the call in flight) locally
            self._spill()

    def _spill(self) -> None:
        in_flight = self._in_flight
        if in_flight is not None:
            self.fallback.write(in_flight)   # may also arrive: replaying a metric or tag twice is harmless
        while True:
            try:
                self.fallback.write(self._queue.get_nowait())
            except queue.Empty:
                break
            self._queue.task_done()
        self.mark_offline(f"no answer within {FLUSH_TIMEOUT_S:g} s")

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="hybrid-tracking", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                record = self._queue.get(timeout=5.0)
            except queue.Empty:
                with self._lock:  # idle: end the thread (submit starts another); no record can slip in between
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            self._in_flight = record
            try:
                if self._should_try():
                    self._deliver(record, attempts=1 if self.offline else RETRIES)
                else:
                    self.fallback.write(record)
            finally:
                self._in_flight = None
                self._queue.task_done()

    def _should_try(self) -> bool:
        return not self.offline or time.monotonic() - self._last_attempt >= RECONNECT_S

    def _deliver(self, record: Mapping[str, Any], attempts: int) -> bool:
        for attempt in range(attempts):
            self._last_attempt = time.monotonic()
            try:
                apply_record(self.client, record)
            except Exception as err:  # noqa: BLE001 - whatever the store answers, training goes on
                if _transient(err) and attempt + 1 < attempts:
                    time.sleep(BACKOFF_S * 2 ** attempt)
                    continue
                self.fallback.write({**record, "error": _first_line(err)})
                if _transient(err):
                    self.mark_offline(_first_line(err))
                else:
                    print(f"warning: tracking store {self.uri} refused a {record['op']} call ({_first_line(err)}); "
                          f"kept in {self.fallback.path}", file=sys.stderr)
                return False
            if self.offline:
                self.offline = False
                print(f"tracking store {self.uri} answers again; {self.fallback.records} calls made meanwhile are in "
                      f"{self.fallback.path} (hybrid tracking import {self.fallback.path})", file=sys.stderr)
            return True
        return False  # pragma: no cover - attempts >= 1

    def mark_offline(self, reason: str) -> None:
        """The store did not answer (``reason``): warn once, send calls to the fallback log until it answers."""
        if not self.offline:  # one line when the store stops answering, not one per call
            print(f"warning: tracking store {self.uri} does not answer ({reason}); training goes on, tracking calls "
                  f"go to {self.fallback.path} until it answers again (load them later with: hybrid tracking "
                  f"import {self.fallback.path})", file=sys.stderr)
        self.offline = True


def import_fallback(path: str | os.PathLike, tracking_uri: str) -> dict[str, int]:
    """Replay a :class:`FallbackLog` into ``tracking_uri``; runs created offline are created there.

    The file is renamed ``<name>.imported`` afterwards, so it is not replayed twice.

    Returns:
        ``{"records": n, "runs_created": m, "failed": k}``.

    Raises:
        HybridInputError: the file is missing or not a fallback log (names the line).
    """
    path = Path(path)
    if not path.is_file():
        raise HybridInputError(f"{path}: fallback log not found")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record["op"], record["run_id"]  # noqa: B018 - both required
        except (json.JSONDecodeError, KeyError, TypeError):
            raise HybridInputError(f"{path}, line {number}: not a tracking record (a hybrid fallback log has one "
                                   "JSON object with 'op' and 'run_id' per line)") from None
        records.append(record)
    client = open_client(tracking_uri)
    run_ids: dict[str, str] = {}
    failed = 0
    for record in records:
        try:
            created = apply_record(client, record, run_ids)
        except Exception as err:  # noqa: BLE001 - report and go on: the other records are still worth having
            failed += 1
            print(f"warning: {path}: {record['op']} of run {record['run_id']} not imported ({_first_line(err)})",
                  file=sys.stderr)
            continue
        if created is not None:
            run_ids[record["run_id"]] = created
    path.rename(path.with_name(path.name + ".imported"))
    return {"records": len(records), "runs_created": len(run_ids), "failed": failed}


class Tracker:
    """Thin, explicit wrapper over :class:`mlflow.MlflowClient` (no global MLflow state is touched).

    Writes (params, metrics, tags, run ends) go through a background :class:`Delivery`: a training step never
    waits for the store, and a store that stops answering costs a warning, not the run — the calls it missed
    are in the fallback log (``hybrid tracking import``). Each run's end waits for its calls (:meth:`flush`).

    Args:
        tracking_uri: where runs are stored (see :func:`resolve_tracking_uri`).
        experiment: experiment name; created when missing.
        enabled: log or not; default: only on rank 0.
        system_metrics: sample CPU / memory / disk / network (and GPU) usage into every run this tracker opens
            (``system/...`` metrics; MLflow's monitor, needs ``psutil``).
        fallback: the fallback log (:class:`FallbackLog`, written only when a call does not reach the store);
            default ``<working dir>/mlflow_fallback-<pid>.jsonl``; training stages use ``<out>/mlflow_fallback.jsonl``.
    """

    def __init__(self, tracking_uri: str, experiment: str, enabled: bool | None = None,
                 system_metrics: bool = False, fallback: str | os.PathLike | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.enabled = is_rank_zero() if enabled is None else enabled
        self.system_metrics = system_metrics
        self.fallback = FallbackLog(fallback or Path.cwd() / f"mlflow_fallback-{os.getpid()}.jsonl")
        self._client = None
        self._experiment_id: str | None = None
        self._delivery: Delivery | None = None
        self._resumed: dict[str, dict[str, str]] = {}   # run id → its params when reopened (resumed runs)

    @property
    def client(self):
        if self._client is None:
            if self.tracking_uri.startswith(("http://", "https://")):
                check_tracking(self.tracking_uri)  # seconds, not MLflow's minutes of retries
                for key, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"),  # Delivery retries, in the background
                                   ("MLFLOW_HTTP_REQUEST_TIMEOUT", str(HTTP_TIMEOUT_S))):
                    os.environ.setdefault(key, value)
            self._client = open_client(self.tracking_uri)
        return self._client

    @property
    def delivery(self) -> Delivery:
        if self._delivery is None:
            self._delivery = Delivery(self.client, self.fallback, self.tracking_uri)
        return self._delivery

    def check(self) -> None:
        """:func:`check_tracking` of this tracker's store (nothing when it logs nothing)."""
        if self.enabled:
            check_tracking(self.tracking_uri)

    def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Wait until every call made so far reached the store (or the fallback log), at most ``timeout_s``."""
        if self._delivery is not None:
            self._delivery.flush(timeout_s)

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                from mlflow.exceptions import MlflowException

                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment, artifact_location=artifact_location(self.tracking_uri),
                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
                    return self._experiment_id
                except MlflowException:  # another run created it in between
                    found = self.client.get_experiment_by_name(self.experiment)
                    if found is None:
                        raise
            self._experiment_id = found.experiment_id
        return self._experiment_id

    @contextlib.contextmanager
    def run(self, name: str, parent: str | None = None, tags: Mapping[str, Any] | None = None,
            resume: str | None = None) -> Iterator[str | None]:
        """Open a run (nested under ``parent`` when given); it ends FINISHED, FAILED on an exception, or KILLED
        when interrupted (SIGINT / SIGTERM: ``KeyboardInterrupt``), and waits for its calls (:meth:`flush`).

        Args:
            resume: the id of a run to continue (a resumed training run: the id its checkpoint recorded). When
                the store holds it in this experiment it is reopened (RUNNING again) and logged into; else a new
                run is opened, tagged ``resumed_from_run``.
        """
        if not self.enabled:
            yield None
            return
        all_tags = {**environment_tags(), **absolute_tags(tags or {})}
        if parent:
            all_tags[PARENT_TAG] = parent
        run_id = self._reopen(resume, all_tags) if resume else None
        if run_id is None:
            if resume:
                all_tags["resumed_from_run"] = resume
            run_id = self._create(name, all_tags)
        offline = run_id.startswith(OFFLINE_PREFIX)
        monitor = None if offline else self._system_metrics_monitor(run_id)
        status = "FAILED"
        try:
            yield run_id
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if monitor is not None:  # flushed while the run is still open
                monitor.finish()
            self.delivery.submit({"op": "set_terminated", "run_id": run_id, "status": status,
                                  "end_time": int(time.time() * 1000)})
            self.flush()

    def _create(self, name: str, tags: Mapping[str, str]) -> str:
        """A new run; while the store does not answer, an offline one (``offline-…``, in the fallback log)."""
        try:
            return self.client.create_run(self.experiment_id, run_name=name, tags=dict(tags)).info.run_id
        except Exception as err:  # noqa: BLE001 - a store that stopped answering must not end the pipeline
            if not _transient(err):
                raise
            run_id = f"{OFFLINE_PREFIX}{uuid.uuid4().hex}"
            self.delivery.mark_offline(_first_line(err))
            self.fallback.write({"op": "create_run", "run_id": run_id, "experiment": self.experiment,
                                 "run_name": name, "tags": dict(tags), "start_time": int(time.time() * 1000)})
            return run_id

    def _reopen(self, run_id: str, tags: Mapping[str, str]) -> str | None:
        """``run_id`` RUNNING again with ``tags`` updated (its parent kept), or None when this experiment of the
        store has no such run. A store that does not answer: the id is kept, its calls wait in the fallback log."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as err:
            if _transient(err):
                self.delivery.mark_offline(_first_line(err))
                self._resumed[run_id] = {}
                return run_id
            return None  # another store (or a deleted run)
        if run.info.experiment_id != self.experiment_id:
            return None
        self.client.update_run(run_id, status="RUNNING")
        self._resumed[run_id] = dict(run.data.params)
        keep = {k: v for k, v in tags.items() if k != PARENT_TAG}
        self.set_tags(run_id, {**keep, "resumed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        return run_id

    def _system_metrics_monitor(self, run_id: str):
        """MLflow's system-metrics monitor of ``run_id``, started (``None`` when ``system_metrics`` is off)."""
        if not self.system_metrics:
            return None
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, tracking_uri=self.tracking_uri)
        monitor.start()
        return monitor

    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        """Log a (nested) mapping of params once, flattened with dots.

        A resumed run keeps the params it has: only new ones are logged, and a changed value is named in the
        ``resumed_changed_params`` tag (MLflow refuses to change a param).
        """
        if not self.enabled or run_id is None:
            return
        flat = {k: _param_value(v) for k, v in flatten(params).items()}
        if run_id in self._resumed:
            known = self._resumed[run_id]
            changed = sorted(k for k, v in flat.items() if k in known and known[k] != v)
            flat = {k: v for k, v in flat.items() if k not in known}
            if changed:
                self.set_tags(run_id, {"resumed_changed_params": ",".join(changed)[:5000]})
        items = list(flat.items())
        for i in range(0, len(items), MAX_PARAMS):
            self.delivery.submit({"op": "log_batch", "run_id": run_id, "params": items[i:i + MAX_PARAMS]})

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int,
                    epoch: float | None = None) -> None:
        """Log metrics at ``step``; ``epoch`` (fractional) goes beside them as ``progress/epoch``. Returns at once:
        the background :class:`Delivery` sends them."""
        if not self.enabled or run_id is None:
            return
        now = int(time.time() * 1000)
        values = dict(metrics)
        if epoch is not None:
            values["progress/epoch"] = float(epoch)
        batch = [(k, float(v), now, int(step)) for k, v in values.items()]
        for i in range(0, len(batch), MAX_METRICS):
            self.delivery.submit({"op": "log_batch", "run_id": run_id, "metrics": batch[i:i + MAX_METRICS]})

    def set_tags(self, run_id: str | None, tags: Mapping[str, Any]) -> None:
        if not self.enabled or run_id is None:
            return
        items = list(absolute_tags(tags).items())
        for i in range(0, len(items), MAX_TAGS):
            self.delivery.submit({"op": "log_batch", "run_id": run_id, "tags": items[i:i + MAX_TAGS]})

    def log_prepared_data(self, run_id: str | None, directory: str | os.PathLike, stats: Mapping[str, Any],
                          tables: Mapping[str, str] | None = None, digest: str | None = None) -> None:
        """Log a prepared data directory as MLflow dataset inputs (the run's *Datasets* in ``mlflow ui``).

        Args:
            directory: the prepared directory (``hybrid data prepare --out``).
            stats: its ``stats.json`` (dataset, protocol, data hash, counts).
            tables: table → ``mlflow.data.context``, e.g. ``{"ctr_train": "training", "ctr_valid": "validation"}``:
                one dataset per table, named ``<dataset>/<protocol>/<table>``, its source the table's parquet
                file, its schema and row count read from the parquet footer (no rows are read). ``None``: the
                directory itself, one dataset ``<dataset>/<protocol>`` with context ``output`` and the counts of
                ``stats`` as its profile (what ``prepare`` wrote; its files need not be in place yet).
            digest: the dataset digest; default ``stats["data_hash"]`` (the prepared data hash).
        """
        if not self.enabled or run_id is None:
            return
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        directory = Path(os.path.abspath(directory))
        digest = str(digest or stats.get("data_hash") or "unknown")
        name = f"{stats.get('dataset', directory.name)}/{stats.get('protocol', 'prepared')}"
        if tables is None:
            profile = {k: v for k, v in stats.items() if isinstance(v, (int, float, dict)) and k != "vocab_sizes"}
            datasets = [(_dataset(name, digest, directory, profile=profile), OUTPUT_CONTEXT)]
        else:
            datasets = [(_table_dataset(f"{name}/{table}", digest, directory / f"{table}.parquet", stats.get(table)),
                         context) for table, context in tables.items()]
        entities = [(dataset._to_mlflow_entity(), context) for dataset, context in datasets]
        self.delivery.call({"op": "log_inputs", "run_id": run_id, "datasets": [
            {"dataset": {k: getattr(e, k) for k in ("name", "digest", "source_type", "source", "schema", "profile")},
             "tags": {MLFLOW_DATASET_CONTEXT: context}} for e, context in entities]})

    def log_artifact(self, run_id: str | None, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Log a file or a directory's files (at once, in this thread; kept in the fallback log if it fails)."""
        if not self.enabled or run_id is None:
            return
        self.delivery.call({"op": "log_artifact", "run_id": run_id, "local_path": str(Path(path).resolve()),
                            "artifact_path": artifact_path})

    def log_json(self, run_id: str | None, data: Any, file_name: str) -> None:
        """Log ``data`` as a JSON artifact named ``file_name``."""
        if not self.enabled or run_id is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / file_name
            target.write_text(json.dumps(data, indent=2, default=str))
            self.log_artifact(run_id, target)


@dataclass
class TrackingConfig:
    """MLflow settings (a section of every stage's config).

    Args:
        tracking_uri: explicit URI; empty → ``MLFLOW_TRACKING_URI`` → ``sqlite:///<working dir>/mlflow.db``.
        experiment: experiment name (one per study).
        enabled: ``false`` turns logging off.
        run_name: the stage's run name; empty: the stage's own (``pretrain-L4H64A4-llama``...). The quickstart and
            ``hybrid sweep`` name each stage (``pretrain L4H64A4 seed0``, ``finetune gpsd L4H64A4 st_sf seed1``).
        system_metrics: log CPU / memory / disk / network (and GPU) usage as ``system/...`` metrics of every run
            (``--set tracking.system_metrics=true``; needs ``psutil``). Sampling interval: MLflow's
            ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` (seconds, default 10).
    """

    tracking_uri: str | None = None
    experiment: str = "hybrid"
    enabled: bool = True
    run_name: str | None = None
    system_metrics: bool = False

    def __post_init__(self) -> None:
        if self.system_metrics and importlib.util.find_spec("psutil") is None:
            raise ValueError("system_metrics: MLflow's system metrics need psutil (pip install psutil)")


def make_tracker(cfg: TrackingConfig, fallback: str | os.PathLike | None = None) -> Tracker:
    """The tracker a stage config asks for (store: :func:`resolve_tracking_uri`; ``fallback``: its fallback log,
    see :class:`Tracker`)."""
    return Tracker(resolve_tracking_uri(cfg.tracking_uri), cfg.experiment,
                   enabled=None if cfg.enabled else False, system_metrics=cfg.system_metrics, fallback=fallback)


def _local_source(path: Path):
    """MLflow's dataset source for a local file or directory (``source_type: local``, ``uri``: the path)."""
    from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source

    for source in get_registered_sources():
        if source._get_source_type() == "local":
            return source(str(path))
    return resolve_dataset_source(str(path))  # pragma: no cover - MLflow always registers the local one


def _dataset(name: str, digest: str, path: Path, schema=None, profile: Mapping[str, Any] | None = None):
    """A :class:`mlflow.data.meta_dataset.MetaDataset` (metadata only: no rows) with a JSON profile."""
    from mlflow.data.meta_dataset import MetaDataset

    class PreparedDataset(MetaDataset):
        @property
        def profile(self) -> Any | None:
            return dict(profile) if profile else None

        def to_dict(self) -> dict[str, str]:
            config = super().to_dict()
            if profile:
                config["profile"] = json.dumps(profile, default=str)
            return config

    return PreparedDataset(_local_source(path), name=name, digest=digest, schema=schema)


def _table_dataset(name: str, digest: str, path: Path, stats: Any):
    """One prepared table: schema and row count from its parquet footer, its ``stats.json`` entry beside them."""
    import pyarrow.parquet as pq

    schema, profile = None, dict(stats) if isinstance(stats, Mapping) else {}
    if path.is_file():
        meta = pq.read_metadata(path)
        schema = _mlflow_schema(meta.schema.to_arrow_schema())
        profile["num_rows"] = meta.num_rows
    return _dataset(name, digest, path, schema=schema, profile=profile)


def _mlflow_schema(arrow_schema):
    """An MLflow column schema of an Arrow schema (lists become arrays; an unmapped type is a string)."""
    import pyarrow as pa
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    def of(t):
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return Array(of(t.value_type))
        for test, dtype in ((pa.types.is_boolean, DataType.boolean), (pa.types.is_int64, DataType.long),
                            (pa.types.is_uint32, DataType.long), (pa.types.is_uint64, DataType.long),
                            (pa.types.is_integer, DataType.integer), (pa.types.is_float32, DataType.float),
                            (pa.types.is_floating, DataType.double), (pa.types.is_timestamp, DataType.datetime),
                            (pa.types.is_binary, DataType.binary)):
            if test(t):
                return dtype
        return DataType.string

    return Schema([ColSpec(of(f.type), f.name, required=not f.nullable) for f in arrow_schema])


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[:MAX_PARAM_LENGTH - 3] + "..."

