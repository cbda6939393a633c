"""The skeleton every training stage shares (``hybrid pretrain``, ``hybrid finetune``).

A stage checks everything it can before it writes anything, then runs inside :func:`training_stage`:

1. :func:`refuse_existing` — a finished (or, for pretraining, resumable) ``out`` is never overwritten;
2. :func:`training_stage` — checks the tracking store (reachable, writable), joins or starts the process group
   (``torchrun``), ends the one it started, and refuses a global batch size the processes cannot split evenly;
3. :meth:`Stage.write_inputs` / :meth:`Stage.write_json` — files under ``out``, written by rank 0 only;
4. :meth:`Stage.track` — the stage's MLflow run (rank 0 logs, other ranks get no-op calls).

Errors need no translation here: every bad-input error of the library is a
:class:`~hybrid.core.errors.HybridInputError`, which the CLI prints as one line (exit 2).

Example:
    >>> import pandas as pd
    >>> tracking = TrackingConfig(experiment="demo")           # default store: ./mlflow.db
    >>> feature_map = FeatureMap.fit({"item_id": pd.Series(["a", "b"])})
    >>> refuse_existing(out_dir / "checkpoints", "choose another out")       # None: nothing to overwrite
    >>> with training_stage(out_dir, batch_size=64) as stage:                 # 1 process here; torchrun: N
    ...     stage.write_inputs(tracking, feature_map)                         # the resolved config, the ids
    ...     with stage.track(tracking, "demo-run", tags={"stage": "demo"}) as (tracker, run):
    ...         tracker.log_metrics(run, {"eval/auc": 0.8}, step=100)
    ...     stage.write_json("result.json", {"auc": 0.8})
    >>> sorted(p.name for p in out_dir.iterdir())
    ['config.yaml', 'feature_map.json', 'result.json']
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybrid.config import to_yaml
from hybrid.core.checkpoint import latest_checkpoint
from hybrid.core.errors import CollectiveTimeout, HybridInputError
from hybrid.core.feature_map import FeatureMap
from hybrid.core.training import DistributedContext, init_distributed
from hybrid.tracking import FALLBACK_NAME, Tracker, TrackingConfig, make_tracker

#: ``resume=PREVIOUS`` / ``--resume=previous``: continue from the newest checkpoint that verifies when the one
#: ``LATEST`` names is corrupt or incomplete
PREVIOUS = "previous"


def check_resume_value(resume: object) -> None:
    """``resume`` is ``False``, ``True`` or :data:`PREVIOUS` (one line otherwise)."""
    if resume not in (False, True, PREVIOUS):
        raise HybridInputError(f"resume: expected true, false or {PREVIOUS!r}, got {resume!r}")


def refuse_existing(root: str | Path, advice: str, *, allow: bool = False) -> Path | None:
    """The newest complete checkpoint under ``root``; refused (one line naming it) unless ``allow``.

    Args:
        root: a checkpoint root (``<out>/checkpoints``, ``<out>/checkpoints/best``).
        advice: what the user can do instead, e.g. ``"pass --resume to continue it or choose another out"``.
        allow: return the checkpoint instead of refusing (``--resume``).

    Raises:
        HybridInputError: ``root`` already holds a checkpoint and ``allow`` is false.
    """
    root = Path(root)
    last = latest_checkpoint(root)
    if last is not None and not allow:
        raise HybridInputError(f"{root}: already holds a checkpoint ({last.name}); {advice}")
    return last


@dataclass
class Stage:
    """One running stage: its output directory and its place in the process group.

    Args:
        out: the stage's output directory (created by the first write).
        ctx: rank, world size and device (:func:`~hybrid.core.training.init_distributed`).
    """

    out: Path
    ctx: DistributedContext

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes the output files and logs to MLflow; the other ranks only train."""
        return self.ctx.rank == 0

    def write_text(self, name: str, text: str) -> None:
        """Write ``out/name`` (rank 0 only)."""
        if self.is_writer:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / name).write_text(text)

    def write_json(self, name: str, data: Any) -> None:
        """Write ``data`` as indented JSON to ``out/name`` (rank 0 only)."""
        self.write_text(name, json.dumps(data, indent=2, default=str))

    def write_inputs(self, cfg: Any, feature_map: FeatureMap) -> None:
        """What the stage ran with: ``config.yaml`` (the resolved config) and ``feature_map.json``."""
        self.write_text("config.yaml", to_yaml(cfg))
        if self.is_writer:
            feature_map.save(self.out / "feature_map.json")

    @contextlib.contextmanager
    def track(self, tracking: TrackingConfig, name: str, *, parent: str | None = None,
              tags: Mapping[str, Any] | None = None, resume: str | None = None) -> Iterator[tuple[Tracker, str | None]]:
        """The stage's MLflow run (nested under ``parent``); ends FAILED if the body raises.

        The run is named ``tracking.run_name`` when set (the quickstart and ``hybrid sweep`` name each stage),
        else ``name``. ``resume``: the run id a resumed stage's checkpoint recorded — that run continues
        (:meth:`~hybrid.tracking.Tracker.run`). Calls the store does not take go to
        ``<out>/mlflow_fallback.jsonl``. Yields ``(tracker, run_id)``; ``run_id`` is ``None`` where nothing is
        logged (other ranks, tracking disabled) and every tracker call is then a no-op.
        """
        tracker = make_tracker(tracking, fallback=self.out / FALLBACK_NAME)
        with tracker.run(tracking.run_name or name, parent=parent, resume=resume,
                         tags={**(tags or {}), "world_size": self.ctx.world_size}) as run:
            yield tracker, run


def _is_collective_failure(err: BaseException) -> bool:
    """A gloo / nccl error of a collective: a timeout or a peer that closed its connection."""
    import torch.distributed as dist

    text = str(err).lower()
    return isinstance(err, dist.DistBackendError) or any(
        word in text for word in ("timed out", "connection closed by peer", "connection reset", "gloo", "nccl"))


@contextlib.contextmanager
def training_stage(out: str | Path, batch_size: int, tracking: TrackingConfig | None = None,
                   collective_timeout_s: float | None = None, single_process_group: bool = False) -> Iterator[Stage]:
    """Run a training stage in the process group ``torchrun`` describes (or as one process).

    With ``tracking``, its store is checked first, before the process group or any work
    (:func:`~hybrid.tracking.check_tracking`, on the rank that logs): an unreachable server or a read-only SQLite
    store is one line (:class:`~hybrid.core.errors.TrackingError`) in seconds.

    A process group this call starts is destroyed when the stage ends, successfully or not; one that was
    already running (a caller's, a test's) is left alone.

    Args:
        out: the stage's output directory.
        batch_size: the global batch size, split evenly over the processes.
        tracking: the stage's tracking settings (checked first).
        collective_timeout_s: seconds a collective waits for the other ranks (``train.collective_timeout_s``);
            past it the waiting rank fails with one line (:class:`CollectiveTimeout`, exit 2) instead of hanging.
        single_process_group: one process (no ``torchrun``) still gets a 1-rank process group, so its tables
            can be sharded (``train.shard_tables``).

    Raises:
        HybridInputError: ``batch_size`` is not divisible by the number of processes.
        TrackingError: the tracking store cannot be logged to.
    """
    import torch.distributed as dist

    if tracking is not None:
        make_tracker(tracking).check()

    had_group = dist.is_initialized()
    options = {"timeout_s": collective_timeout_s} if collective_timeout_s else {}
    if single_process_group:
        options["single_process_group"] = True
    ctx = init_distributed(**options)
    own_group = dist.is_initialized() and not had_group
    try:
        if batch_size % ctx.world_size:
            raise HybridInputError(f"train.batch_size ({batch_size}) must be divisible by the "
                                   f"{ctx.world_size} processes")
        yield Stage(Path(out), ctx)
    except RuntimeError as err:  # gloo / nccl: a peer lost or past the collective timeout
        if ctx.is_distributed and _is_collective_failure(err):
            first = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            raise CollectiveTimeout(f"rank {ctx.rank} of {ctx.world_size}: a collective failed or timed out after "
                                    f"{collective_timeout_s or 'the default'} s (another rank died or hangs; "
                                    f"train.collective_timeout_s sets the wait): {first}") from err
        raise
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()
