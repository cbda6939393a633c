"""The data stage: read a dataset, apply a protocol, write the prepared directory, log it to MLflow.

``hybrid data prepare`` and the quickstart both call :func:`run_prepare`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hybrid.config import to_dict, to_yaml
from hybrid.data.protocols import PreparedData, ProtocolConfig, prepare
from hybrid.data.readers import read_dataset
from hybrid.data.schema import RawDataset
from hybrid.data.store import save_prepared
from hybrid.tracking import Tracker, TrackingConfig, make_tracker


@dataclass
class DataConfig:
    """Where the raw data is and how to read it.

    Args:
        dataset: reader name: ``movielens-100k``, ``movielens-1m``, ``recbole``, ``taobao`` or ``events``.
        path: directory (MovieLens, RecBole) or file (Taobao CSV, events CSV/parquet).
        columns: ``events`` only: canonical column → column in the file (``{"user_id": "uid"}``).
        items_path, users_path: ``events`` only: optional item / user side tables.
    """

    dataset: str = "movielens-100k"
    path: str = ""
    columns: dict[str, str] = field(default_factory=dict)
    items_path: str | None = None
    users_path: str | None = None

    def read(self) -> RawDataset:
        """Read with the reader named by ``dataset``; reader-specific options only when set."""
        options = {"columns": self.columns or None, "items_path": self.items_path, "users_path": self.users_path}
        return read_dataset(self.dataset, self.path, **{k: v for k, v in options.items() if v is not None})


@dataclass
class PrepareConfig:
    """``hybrid data prepare``: data + protocol → ``out``."""

    data: DataConfig = field(default_factory=DataConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    out: str = "runs/prepared"
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def run_prepare(cfg: PrepareConfig, tracker: Tracker | None = None, parent_run: str | None = None) -> PreparedData:
    """Read, prepare, save atomically, log params / statistics / data hash. Returns the prepared data."""
    tracker = tracker or make_tracker(cfg.tracking)
    data = cfg.data.read()
    with tracker.run(f"prepare-{cfg.protocol.protocol}", parent=parent_run,
                     tags={"stage": "prepare", "protocol": cfg.protocol.protocol, "dataset": data.name}) as run:
        tracker.log_params(run, to_dict(cfg))
        prepared = prepare(data, cfg.protocol)
        save_prepared(prepared, cfg.out, config_yaml=to_yaml(cfg))
        tracker.set_tags(run, {"data_hash": prepared.stats["data_hash"]})
        tracker.log_metrics(run, _numeric(prepared.stats), step=0)
        tracker.log_json(run, prepared.stats, "stats.json")
    return prepared


def _numeric(stats: dict, prefix: str = "data/") -> dict[str, float]:
    """The numeric leaves of the stats tree, as metric names like ``data/ctr_train/samples``."""
    out = {}
    for key, value in stats.items():
        if isinstance(value, dict):
            out.update(_numeric(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out
