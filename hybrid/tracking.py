"""The one module that talks to MLflow.

- Tracking URI: the explicit argument, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<working dir>/mlflow.db``
  — MLflow's own default, so ``mlflow ui`` and ``hybrid review`` started in the same directory find the runs of
  every stage, and the store never lives inside an output directory that a stage replaces.
  Experiments this module creates in a SQLite store keep their artifacts beside it
  (``<store dir>/mlartifacts``), not in ``./mlruns`` under whatever directory the process started in.
- One experiment per study; one parent run per pipeline; nested runs per stage (``mlflow.parentRunId``).
- Params are logged once per run (flattened config: ``model.backbone.dim``); metrics carry a ``step``
  and, when given, the fractional epoch as ``progress/epoch`` at the same step; names like ``valid/auc``.
- Tags: git commit, data hash, package versions, and whatever the stage adds (strategy, model size...).
- Only rank 0 logs: on other ranks every call is a no-op, so stage code need not check.

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
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybrid.config import flatten

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


def environment_tags() -> dict[str, str]:
    import torch

    tags = {TAGS.git_commit: git_commit(), "torch_version": torch.__version__}
    try:
        import torchrec

        tags["torchrec_version"] = torchrec.__version__
    except ImportError:  # pragma: no cover
        pass
    return tags


class Tracker:
    """Thin, explicit wrapper over :class:`mlflow.MlflowClient` (no global MLflow state is touched).

    Args:
        tracking_uri: where runs are stored (see :func:`resolve_tracking_uri`).
        experiment: experiment name; created when missing.
        enabled: log or not; default: only on rank 0.
    """

    def __init__(self, tracking_uri: str, experiment: str, enabled: bool | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.enabled = is_rank_zero() if enabled is None else enabled
        self._client = None
        self._experiment_id: str | None = None

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            self._experiment_id = found.experiment_id if found else self.client.create_experiment(
                self.experiment, artifact_location=artifact_location(self.tracking_uri))
        return self._experiment_id

    @contextlib.contextmanager
    def run(self, name: str, parent: str | None = None, tags: Mapping[str, Any] | None = None) -> Iterator[str | None]:
        """Open a run (nested under ``parent`` when given); it ends FINISHED, or FAILED on an exception."""
        if not self.enabled:
            yield None
            return
        all_tags = {**environment_tags(), **{k: str(v) for k, v in (tags or {}).items()}}
        if parent:
            all_tags[PARENT_TAG] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        run_id = run.info.run_id
        status = "FAILED"
        try:
            yield run_id
            status = "FINISHED"
        finally:
            self.client.set_terminated(run_id, status=status)

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
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

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
    """

    tracking_uri: str | None = None
    experiment: str = "hybrid"
    enabled: bool = True



def make_tracker(cfg: TrackingConfig) -> Tracker:
    """The tracker a stage config asks for (store: :func:`resolve_tracking_uri`)."""
    return Tracker(resolve_tracking_uri(cfg.tracking_uri), cfg.experiment,
                   enabled=None if cfg.enabled else False)


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[:MAX_PARAM_LENGTH - 3] + "..."
