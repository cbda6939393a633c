"""The data stage: read a dataset, apply a protocol, write the prepared directory, log it to MLflow.

``hybrid data prepare`` and the quickstart both call :func:`run_prepare`. The protocol runs out of core on
DuckDB by default (``engine.name: duckdb``, :mod:`hybrid.data.duckdb_engine`), on Spark past one machine
(``engine.name: spark``, :mod:`hybrid.data.spark_engine`, the same SQL) or in memory on pandas
(``engine.name: pandas``, :mod:`hybrid.data.protocols`, the reference); all write the same directory.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hybrid.config import to_dict, to_yaml
from hybrid.core.errors import HybridInputError
from hybrid.core.feature_map import FeatureMap
from hybrid.data.duckdb_engine import EngineConfig
from hybrid.data.protocols import ProtocolConfig, prepare
from hybrid.data.readers import PositionalTimeWarning, positional_time_message, read_dataset, sequences_have_timestamps
from hybrid.data.schema import RawDataset
from hybrid.data.store import atomic_directory, save_prepared, write_metadata
from hybrid.data.validation import Duplicates, check_samples, deduplicate_frame, with_dropped
from hybrid.tracking import Tracker, TrackingConfig, make_tracker


@dataclass
class DataConfig:
    """Where the raw data is and how to read it.

    Args:
        dataset: reader name: ``movielens-100k``, ``movielens-1m``, ``recbole``, ``taobao``, ``events`` or
            ``sequences`` (one line per user: ``user item item ...`` or ``user item:ts item:ts ...``,
            :func:`hybrid.data.readers.read_sequences`).
        path: directory (MovieLens, RecBole) or file (Taobao CSV, events CSV/parquet, sequence file).
        name: the dataset's name in ``stats.json`` (``dataset``), the feature map and MLflow (the run's
            ``dataset`` tag, its dataset inputs ``<name>/<protocol>``); default: the reader's own — the file's
            stem for ``events`` and ``sequences`` (``clicks`` for ``clicks.parquet``), ``movielens-1m``, ...
        nrows: read only the first ``nrows`` rows, for a quick look at a large file: data rows (lines) of a
            ``taobao`` or ``events`` file, lines (users) of a ``sequences`` file, read no further; the first
            events of the others (read whole). Recorded in ``stats.json`` (``nrows``).
        columns: ``events`` only: canonical column → column in the file (``{"user_id": "uid"}``).
        items_path, users_path: ``events`` and ``sequences`` only: optional item / user side tables.
        duplicates: what events that repeat an earlier one in every field (user, item, timestamp, rating /
            behaviour) get: ``error`` (the default) refuses the data, naming the first such row; ``drop`` keeps
            the first of each and counts the others in ``stats.json`` (``duplicates_dropped``).
    """

    dataset: str = "movielens-100k"
    path: str = ""
    name: str | None = None
    nrows: int | None = None
    columns: dict[str, str] = field(default_factory=dict)
    items_path: str | None = None
    users_path: str | None = None
    duplicates: Duplicates = "error"

    def __post_init__(self) -> None:
        if self.nrows is not None and (isinstance(self.nrows, bool) or not isinstance(self.nrows, int)
                                       or self.nrows < 1):
            raise ValueError(f"data.nrows must be a whole number >= 1 (or unset: every row), got {self.nrows!r}")
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip() or "/" in self.name):
            raise ValueError(f"data.name must be a non-empty name without '/', got {self.name!r}")

    def options(self) -> dict:
        """The reader-specific options that are set."""
        options = {"columns": self.columns or None, "items_path": self.items_path, "users_path": self.users_path,
                   "nrows": self.nrows}
        return {k: v for k, v in options.items() if v is not None}

    def read(self) -> RawDataset:
        """Read into memory with the reader named by ``dataset`` (the pandas engine's input), named ``name``."""
        data = read_dataset(self.dataset, self.path, **self.options())
        return dataclasses.replace(data, name=self.name) if self.name else data


@dataclass
class PrepareConfig:
    """``hybrid data prepare``: data + protocol → ``out``."""

    data: DataConfig = field(default_factory=DataConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    out: str = "runs/prepared"
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class PreparedSummary:
    """What :func:`run_prepare` wrote: the directory (read it with :func:`hybrid.data.store.load_prepared`),
    its feature map and its statistics."""

    path: Path
    feature_map: FeatureMap
    stats: dict


def run_prepare(cfg: PrepareConfig, tracker: Tracker | None = None, parent_run: str | None = None) -> PreparedSummary:
    """Read, check, prepare, save atomically, log params / statistics / data hash.

    Input errors — in the files, duplicate events, a split the protocol leaves empty
    (:mod:`hybrid.data.validation`) — are raised before the MLflow run starts; the output directory appears
    only when complete, and an earlier one is replaced only then.
    """
    tracker = tracker or make_tracker(cfg.tracking)
    out = Path(cfg.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HybridInputError(f"{out.parent}: cannot create the output's directory ({exc.strerror})") from None
    if cfg.engine.name == "pandas":
        data, dropped = deduplicate_frame(cfg.data.read(), cfg.data.duplicates)
        _warn_positional_time(cfg)
        prepared = prepare(data, cfg.protocol)
        prepared.stats = _with_nrows(with_dropped(prepared.stats, dropped), cfg.data.nrows)
        check_samples(prepared.stats, data.origin.path if data.origin else (data.source or data.name), cfg.protocol)
        _report_dropped(dropped)
        with _prepare_run(tracker, cfg, data.name, parent_run) as run:
            save_prepared(prepared, out, config_yaml=to_yaml(cfg))
            summary = PreparedSummary(out, prepared.feature_map, prepared.stats)
            _log_summary(tracker, run, summary)
        return summary

    scratch_parent = Path(cfg.engine.temp_directory) if cfg.engine.temp_directory else out.parent
    try:  # before any work: an unwritable place is found now, not after the protocol
        scratch_parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.scratch.", dir=scratch_parent))
    except OSError as exc:
        raise HybridInputError(f"{scratch_parent}: cannot write the scratch directory there ({exc.strerror})") from None
    try:
        with _engine(cfg.engine, scratch) as (load_source, run_protocol):
            source = load_source(cfg.data.dataset, cfg.data.path, **cfg.data.options())
            if cfg.data.name:
                source = dataclasses.replace(source, name=cfg.data.name)
            _warn_positional_time(cfg)
            with atomic_directory(out) as tmp:  # a failure inside leaves no output and any earlier one intact
                feature_map, stats = run_protocol(source, cfg.protocol, tmp, cfg.data.duplicates)
                stats = _with_nrows(stats, cfg.data.nrows)
                check_samples(stats, source.file(), cfg.protocol)
                _report_dropped(stats["duplicates_dropped"])
                with _prepare_run(tracker, cfg, source.name, parent_run) as run:
                    write_metadata(tmp, feature_map, stats, to_yaml(cfg))
                    summary = PreparedSummary(out, feature_map, stats)
                    _log_summary(tracker, run, summary)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return summary


@contextmanager
def _engine(engine: EngineConfig, scratch: Path) -> Iterator[tuple[Callable, Callable]]:
    """``(load_source(dataset, path, **options), run_protocol(source, protocol, out, duplicates))`` of the out-of-core
    engine named by ``engine.name`` (DuckDB or Spark), its scratch files in ``scratch``."""
    if engine.name == "spark":
        from hybrid.data import spark_engine  # pyspark only for this engine (a clear error when missing)

        spark = spark_engine.spark_session(engine)
        db = spark_engine.SparkBackend(spark, scratch, engine.row_group_size)
        try:
            yield (lambda *args, **kw: spark_engine.load_source(db, *args, **kw),
                   lambda source, protocol, out, duplicates: spark_engine.run_protocol(db, source, protocol, out,
                                                                                       duplicates))
        finally:
            db.close()
        return
    from hybrid.data.duckdb_engine import connect, run_protocol  # duckdb only for this engine
    from hybrid.data.duckdb_sources import load_source

    con = connect(engine, scratch)
    try:
        yield (lambda *args, **kw: load_source(con, *args, **kw),
               lambda source, protocol, out, duplicates: run_protocol(con, source, protocol, out, engine.row_group_size,
                                                                      duplicates))
    finally:
        con.close()


@contextmanager
def _prepare_run(tracker: Tracker, cfg: PrepareConfig, dataset: str, parent_run: str | None) -> Iterator[str | None]:
    """The stage's MLflow run, its params logged on entry."""
    with tracker.run(f"prepare-{cfg.protocol.protocol}", parent=parent_run,
                     tags={"stage": "prepare", "protocol": cfg.protocol.protocol, "dataset": dataset,
                           "engine": cfg.engine.name}) as run:
        tracker.log_params(run, to_dict(cfg))
        yield run


def _warn_positional_time(cfg: PrepareConfig) -> None:
    """A sequence file without timestamps: say once what the protocol's time split becomes."""
    if cfg.data.dataset == "sequences" and not sequences_have_timestamps(cfg.data.path):
        warnings.warn(positional_time_message(cfg.data.path, cfg.protocol.protocol), PositionalTimeWarning,
                      stacklevel=3)


def _with_nrows(stats: dict, nrows: int | None) -> dict:
    """``stats`` with ``nrows`` after ``source`` when ``data.nrows`` cut the input short."""
    if nrows is None:
        return stats
    out = {}
    for key, value in stats.items():
        out[key] = value
        if key == "source":
            out["nrows"] = int(nrows)
    return out


def _report_dropped(dropped: int) -> None:
    """``data.duplicates: drop`` says what it dropped (the count is ``duplicates_dropped`` in ``stats.json``)."""
    if dropped:
        print(f"dropped {dropped} duplicate event {'row' if dropped == 1 else 'rows'} (data.duplicates: drop)")


def _log_summary(tracker: Tracker, run, summary: PreparedSummary) -> None:
    tracker.set_tags(run, {"data_hash": summary.stats["data_hash"]})
    tracker.log_metrics(run, _numeric(summary.stats), step=0)
    tracker.log_json(run, summary.stats, "stats.json")
    tracker.log_prepared_data(run, summary.path, summary.stats)  # the directory written, as a dataset (output)


def _numeric(stats: dict, prefix: str = "data/") -> dict[str, float]:
    """The numeric leaves of the stats tree, as metric names like ``data/ctr_train/samples``."""
    out = {}
    for key, value in stats.items():
        if isinstance(value, dict):
            out.update(_numeric(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out
