"""Out-of-core preparation: both benchmark protocols as SQL on DuckDB, written straight to parquet.

The output is the prepared directory of :mod:`hybrid.data.store` with the same feature map, the same rows in
the same order and the same column types as the in-memory reference implementation
(:mod:`hybrid.data.protocols`, tested to agree on real ML-100K and on Taobao-shaped data), but the events
never become Python objects: DuckDB reads them (:mod:`hybrid.data.duckdb_sources`), sorts, joins and
aggregates within ``memory_limit`` — spilling to disk beyond it, on all cores — and writes the tables as
parquet with row groups of ``row_group_size`` rows, what a streaming reader takes at a time. Only what the
embedding tables need comes back to Python: the vocabularies (one token per table row), the distribution of
split times (one count per distinct second) and, in ``last-item``, one sampled negative per user.

The protocol's steps are defined once, for this engine and for Spark (:mod:`hybrid.data.spark_engine`),
in :mod:`hybrid.data.sql_protocol`; :class:`DuckDBBackend` runs them: tables in a scratch database, the
prepared tables written with ``COPY ... TO parquet``.

Example:
    >>> import tempfile, duckdb
    >>> from hybrid.data.duckdb_sources import load_source
    >>> from hybrid.data.protocols import ProtocolConfig
    >>> with tempfile.TemporaryDirectory() as out:
    ...     con = duckdb.connect()
    ...     source = load_source(con, "movielens-100k", str(ml100k_dir))
    ...     fm, stats = run_protocol(con, source, ProtocolConfig(protocol="ratings"), Path(out))
    >>> stats["ctr_train"]["samples"], fm.vocab_sizes()["item_id"]
    (69327, 1575)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from hybrid.core.feature_map import FeatureMap
from hybrid.data import sql_protocol
from hybrid.data.duckdb_sources import Source
from hybrid.data.protocols import ProtocolConfig
from hybrid.data.sql_protocol import Backend, quantile_from_counts

__all__ = ["ENGINES", "EngineConfig", "DuckDBBackend", "connect", "quantile_from_counts", "run_protocol"]

ENGINES = ("duckdb", "pandas", "spark")


@dataclass
class EngineConfig:
    """How ``hybrid data prepare`` computes a protocol.

    Args:
        name: ``duckdb`` (out of core on one machine; the default), ``pandas`` (in memory; the reference
            implementation, fine up to a few million events) or ``spark`` (a Spark cluster, or local mode:
            :mod:`hybrid.data.spark_engine`; needs ``pip install 'hybrid-ctr[spark]'`` and Java 17).
        memory_limit: DuckDB's memory limit (``"4GB"``); what does not fit spills to ``temp_directory``.
        threads: DuckDB worker threads (0: one per core).
        temp_directory: where DuckDB keeps its scratch database and spills, or where Spark's executors write
            the tables' part-files before the driver compacts them (default: a hidden directory beside the
            output, removed afterwards). It needs free disk of a few times the input's size; for Spark on a
            cluster it must be a shared path that the executors write and the driver reads.
        row_group_size: rows per parquet row group of the written tables.
        spark_master: ``spark`` only: the master URL (``local[*]``, ``spark://host:7077``, ``yarn``,
            ``k8s://...``); empty: the one ``spark-submit --master`` or ``spark-defaults.conf`` sets.

    Example:
        >>> EngineConfig(name="spark", spark_master="local[2]").spark_master
        'local[2]'
    """

    name: str = "duckdb"
    memory_limit: str = "4GB"
    threads: int = 0
    temp_directory: str | None = None
    row_group_size: int = 1_000_000
    spark_master: str = "local[*]"

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise ValueError(f"engine.name must be one of {', '.join(ENGINES)}, got {self.name!r}")
        if self.row_group_size < 1:
            raise ValueError(f"engine.row_group_size must be >= 1, got {self.row_group_size}")


def connect(engine: EngineConfig, scratch: Path) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection whose database and spill files live in ``scratch`` (which the caller removes)."""
    scratch.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(scratch / "prepare.duckdb"))
    con.execute("SET memory_limit = ?", [engine.memory_limit])
    con.execute("SET temp_directory = ?", [str(scratch / "spill")])
    if engine.threads:
        con.execute(f"SET threads = {int(engine.threads)}")
    con.execute("SET preserve_insertion_order = true")  # file order = rowid; ORDER BY survives into COPY
    con.execute("SET TimeZone = 'UTC'")  # naive date-times are UTC, as in the pandas readers
    return con


class DuckDBBackend(Backend):
    """The protocol steps on a DuckDB connection (DuckDB's dialect is :class:`Backend`'s own).

    Args:
        con: a connection holding the ``raw_*`` tables (:func:`hybrid.data.duckdb_sources.load_source`).
        out: the directory the prepared tables are written to.
        row_group_size: rows per parquet row group.

    Example:
        >>> db = DuckDBBackend(duckdb.connect(), Path("."), 1000)
        >>> db.table("t", "SELECT * FROM range(3) r(x)"); db.fetch("SELECT x FROM t ORDER BY x DESC")["x"].tolist()
        [2, 1, 0]
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, out: Path, row_group_size: int = 1_000_000):
        self.con, self.out, self.row_group_size = con, out, row_group_size

    def table(self, name: str, sql: str) -> None:
        self.con.execute(f"CREATE TABLE {name} AS {sql}")

    def view(self, name: str, sql: str) -> None:
        self.con.execute(f"CREATE VIEW {name} AS {sql}")

    def fetch(self, sql: str) -> dict[str, np.ndarray]:
        return self.con.execute(sql).fetchnumpy()

    def row(self, sql: str) -> tuple:
        return self.con.execute(sql).fetchone()

    def columns(self, relation: str) -> list[str]:
        return [d[0] for d in self.con.execute(f"SELECT * FROM {relation} LIMIT 0").description]

    def register(self, name: str, columns: dict[str, np.ndarray]) -> None:
        self.con.register(name, pd.DataFrame(columns))

    def _path(self, table: str) -> str:
        return str(self.out / f"{table}.parquet").replace("'", "''")

    def write(self, table: str, sql: str) -> None:
        # COPY keeps the query's ORDER BY (preserve_insertion_order, set by connect)
        self.con.execute(f"COPY ({sql}) TO '{self._path(table)}' (FORMAT parquet, ROW_GROUP_SIZE {self.row_group_size})")

    def written(self, table: str) -> str:
        return f"read_parquet('{self._path(table)}')"


def run_protocol(con: duckdb.DuckDBPyConnection, source: Source, cfg: ProtocolConfig, out: Path,
                 row_group_size: int = 1_000_000, duplicates: str | None = None) -> tuple[FeatureMap, dict]:
    """Apply ``cfg``'s protocol to the ``raw_*`` tables in ``con``; write the tables of
    :attr:`PreparedData.TABLES` as parquet into ``out``. Returns the feature map and the stats (the same
    keys and values as :func:`hybrid.data.protocols.prepare`'s). ``duplicates`` (``error`` / ``drop``; ``None``:
    unchecked): what duplicate events get (:func:`hybrid.data.validation.deduplicate`)."""
    return sql_protocol.run(DuckDBBackend(con, out, row_group_size), source, cfg, duplicates)
