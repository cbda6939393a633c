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
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybrid.config import flatten
from hybrid.core.errors import TrackingError

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


class Tracker:
    """Thin, explicit wrapper over :class:`mlflow.MlflowClient` (no global MLflow state is touched).

    Args:
        tracking_uri: where runs are stored (see :func:`resolve_tracking_uri`).
        experiment: experiment name; created when missing.
        enabled: log or not; default: only on rank 0.
        system_metrics: sample CPU / memory / disk / network (and GPU) usage into every run this tracker opens
            (``system/...`` metrics; MLflow's monitor, needs ``psutil``).
    """

    def __init__(self, tracking_uri: str, experiment: str, enabled: bool | None = None,
                 system_metrics: bool = False) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.enabled = is_rank_zero() if enabled is None else enabled
        self.system_metrics = system_metrics
        self._client = None
        self._experiment_id: str | None = None

    @property
    def client(self):
        if self._client is None:
            if self.tracking_uri.startswith(("http://", "https://")):
                check_tracking(self.tracking_uri)  # seconds, not MLflow's minutes of retries
            self._client = open_client(self.tracking_uri)
        return self._client

    def check(self) -> None:
        """:func:`check_tracking` of this tracker's store (nothing when it logs nothing)."""
        if self.enabled:
            check_tracking(self.tracking_uri)

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
    def run(self, name: str, parent: str | None = None, tags: Mapping[str, Any] | None = None) -> Iterator[str | None]:
        """Open a run (nested under ``parent`` when given); it ends FINISHED, FAILED on an exception, or KILLED
        when interrupted (SIGINT / SIGTERM: ``KeyboardInterrupt``)."""
        if not self.enabled:
            yield None
            return
        all_tags = {**environment_tags(), **absolute_tags(tags or {})}
        if parent:
            all_tags[PARENT_TAG] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        run_id = run.info.run_id
        monitor = self._system_metrics_monitor(run_id)
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
            self.client.set_terminated(run_id, status=status)

    def _system_metrics_monitor(self, run_id: str):
        """MLflow's system-metrics monitor of ``run_id``, started (``None`` when ``system_metrics`` is off)."""
        if not self.system_metrics:
            return None
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, tracking_uri=self.tracking_uri)
        monitor.start()
        return monitor

    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        """Log a (nested) mapping of params once, flattened with dots."""
        if not self.enabled or run_id is None:
            return
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, _param_value(v)) for k, v in flat.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int,
                    epoch: float | None = None) -> None:
        """Log metrics at ``step``; ``epoch`` (fractional) goes beside them as ``progress/epoch``."""
        if not self.enabled or run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = dict(metrics)
        if epoch is not None:
            values["progress/epoch"] = float(epoch)
        batch = [Metric(k, float(v), now, int(step)) for k, v in values.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[i:i + 1000])

    def set_tags(self, run_id: str | None, tags: Mapping[str, Any]) -> None:
        if not self.enabled or run_id is None:
            return
        for key, value in absolute_tags(tags).items():
            self.client.set_tag(run_id, key, value)

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
        from mlflow.entities import DatasetInput, InputTag
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
        self.client.log_inputs(run_id, datasets=[
            DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
            for dataset, context in datasets])

    def log_artifact(self, run_id: str | None, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if not self.enabled or run_id is None:
            return
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_json(self, run_id: str | None, data: Any, file_name: str) -> None:
        """Log ``data`` as a JSON artifact named ``file_name``."""
        if not self.enabled or run_id is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / file_name
            target.write_text(json.dumps(data, indent=2, default=str))
            self.client.log_artifact(run_id, str(target))


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


def make_tracker(cfg: TrackingConfig) -> Tracker:
    """The tracker a stage config asks for (store: :func:`resolve_tracking_uri`)."""
    return Tracker(resolve_tracking_uri(cfg.tracking_uri), cfg.experiment,
                   enabled=None if cfg.enabled else False, system_metrics=cfg.system_metrics)


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
