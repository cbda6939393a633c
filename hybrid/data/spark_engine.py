"""Preparation past one machine: both protocols on Spark, from the same definition as the DuckDB engine.

The protocol's steps are the SQL of :mod:`hybrid.data.sql_protocol`; :class:`SparkBackend` runs them on a
``SparkSession`` in Spark SQL's spelling (backtick identifiers, ``array(...)``, ``explode`` /
``posexplode``, ``element_at``, ``split`` + ``filter``, a sorted ``collect_list`` for ordered lists). The
output is the prepared directory of :mod:`hybrid.data.store`, the same feature map, tables (rows, order,
column types) and stats as :mod:`hybrid.data.duckdb_engine` writes (tested on real ML-100K).

Where things run:

- **executors**: reading the events (CSV/parquet), every join, window and aggregate, and writing each
  prepared table as sorted parquet part-files into the scratch directory (``scratch/tables/<table>``);
- **driver** (this process): the small results the protocol needs in Python — the vocabularies, the
  per-second counts of split times, one positive id per user for the sampled negative — collected as Arrow
  batches, never as Python objects per row; the sampled negatives go back through a parquet file in the
  scratch directory; and the compaction of each
  table's part-files, in partition order (= the query's ``ORDER BY``), into one parquet file of the output,
  streamed row group by row group with pyarrow (memory: about one row group).

So the scratch directory must be one path that the executors can write and the driver can read (local
disk in ``local[*]`` mode; on a cluster, a shared file system mounted at the same path everywhere), and
the output a path the driver can write. MovieLens and RecBole sources are read by the pandas readers on the
driver (they are small) and handed to Spark through the scratch directory; Taobao and generic ``events``
files are read by Spark itself, with the pandas readers' checks and messages (file, line or row, column).

Example (a session in local mode; ``tests/test_spark_engine.py`` runs this on ML-100K):
    >>> from hybrid.data.protocols import ProtocolConfig
    >>> spark = spark_session(EngineConfig(name="spark", spark_master="local[2]"))  # doctest: +SKIP
    >>> db = SparkBackend(spark, Path("scratch"))  # doctest: +SKIP
    >>> source = load_source(db, "movielens-100k", str(ml100k_dir))  # doctest: +SKIP
    >>> fm, stats = run_protocol(db, source, ProtocolConfig(protocol="ratings"), Path("prepared"))  # doctest: +SKIP
    >>> stats["ctr_train"]["samples"]  # doctest: +SKIP
    69327
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hybrid.core.errors import HybridInputError
from hybrid.core.feature_map import FeatureMap
from hybrid.data import sql_protocol
from hybrid.data.duckdb_engine import EngineConfig
from hybrid.data.duckdb_sources import Source, _csv_header, raw_source
from hybrid.data.protocols import ProtocolConfig
from hybrid.data.readers import (
    _ALL_CANONICAL,
    TAOBAO_COLUMNS,
    UNKNOWN_YEAR,
    _complete_items,
    _complete_users,
    _label,
    _read_table,
    _require_file,
    _table_format,
    read_dataset,
)
from hybrid.data.schema import EVENT_COLUMNS, OPTIONAL_EVENT_COLUMNS, RawDataset
from hybrid.data.sql_checks import ColumnChecks
from hybrid.data.sql_protocol import Backend

INSTALL_HINT = "engine.name 'spark' needs pyspark and a Java runtime: pip install 'hybrid-ctr[spark]'"


def _pyspark():
    try:
        import pyspark
        from pyspark.sql import SparkSession
    except ImportError:
        raise HybridInputError(f"pyspark is not installed; {INSTALL_HINT}") from None
    return pyspark, SparkSession


def spark_session(engine: EngineConfig):
    """The session ``hybrid data prepare`` runs on: ``engine.spark_master`` (``local[*]`` by default; empty:
    the master that ``spark-submit`` or ``spark-defaults.conf`` gives), times in UTC as in the readers.

    An already active session (a notebook's, a test's) is reused as it is.

    Args:
        engine: the ``engine`` section of the prepare config.

    Example:
        >>> spark = spark_session(EngineConfig(name="spark", spark_master="spark://head:7077"))  # doctest: +SKIP
    """
    _, SparkSession = _pyspark()
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    builder = SparkSession.builder.appName("hybrid-data-prepare")
    if engine.spark_master:
        builder = builder.master(engine.spark_master)
    # naive date-times are UTC (as in the pandas readers); casts behave as in DuckDB's TRY_CAST (null on
    # failure), which Spark 4 would otherwise turn into errors (ANSI mode)
    builder = builder.config("spark.sql.session.timeZone", "UTC").config("spark.sql.ansi.enabled", "false")
    try:
        return builder.getOrCreate()
    except Exception as exc:  # no Java, or a master that cannot be reached
        raise HybridInputError(f"cannot start Spark ({str(exc).splitlines()[0]}); {INSTALL_HINT}") from None


class SparkBackend(Backend):
    """The protocol steps on a SparkSession (Spark SQL's spelling of the dialect-specific functions).

    Args:
        spark: the session.
        scratch: a directory the executors write and the driver reads (part-files, small results); the
            caller removes it.
        row_group_size: rows per parquet row group of the compacted tables.

    Example:
        >>> db = SparkBackend(spark, Path("scratch"))  # doctest: +SKIP
        >>> db.table("t", "SELECT id AS x FROM range(3)"); db.fetch("SELECT x FROM t ORDER BY x DESC")["x"]  # doctest: +SKIP
        array([2, 1, 0])
    """

    text = "STRING"

    def __init__(self, spark, scratch: Path, row_group_size: int = 1_000_000):
        self.spark, self.scratch, self.row_group_size = spark, Path(scratch), row_group_size
        self.out: Path | None = None
        self._views: list[str] = []
        self._cached: list = []
        self._parts: dict[str, Path] = {}
        self._counter = itertools.count()

    # -- spelling ------------------------------------------------------------------------------------------
    def q(self, name: str) -> str:
        return "`" + name.replace("`", "``") + "`"

    def list_of(self, *items: str) -> str:
        return f"array({', '.join(items)})"

    def bigint_list(self, *values: int) -> str:
        return f"array({', '.join(f'CAST({int(v)} AS BIGINT)' for v in values)})"

    def first(self, items: str) -> str:
        return f"element_at({items}, 1)"

    def size(self, items: str) -> str:
        return f"size({items})"

    def split_nonempty(self, text: str, sep: str) -> str:
        # split takes a regular expression: the separator as a character class is the literal character
        return f"filter(split({text}, '[{sep}]'), x -> x <> '')"

    def unnest(self, items: str) -> str:
        return f"explode({items})"

    def unnest_indexed(self, items: str, value: str, index: str) -> str:
        return f"posexplode({items}) AS ({index}, {value})"

    def ordered_list(self, value: str, key: str) -> str:
        # no ordered aggregate in Spark SQL: collect (key, value) pairs, sort them, keep the values
        return f"transform(array_sort(collect_list(struct({key} AS k, {value} AS v))), p -> p.v)"

    # -- execution ---------------------------------------------------------------------------------------------
    def _name(self, name: str, frame) -> None:
        frame.createOrReplaceTempView(name)
        self._views.append(name)

    def table(self, name: str, sql: str) -> None:
        from pyspark import StorageLevel

        # cached (spilling to executors' disks), so a table read by several later steps is computed once
        frame = self.spark.sql(sql).persist(StorageLevel.MEMORY_AND_DISK)
        self._cached.append(frame)
        self._name(name, frame)

    def view(self, name: str, sql: str) -> None:
        self._name(name, self.spark.sql(sql))

    def _scratch_dir(self, kind: str) -> Path:
        return self.scratch / kind / f"{next(self._counter):04d}"

    def fetch(self, sql: str) -> dict[str, np.ndarray]:
        frame = self.spark.sql(sql)
        # Arrow batches straight from the executors, no Python object per row (toArrow from Spark 4; before
        # it, the same call under the name toPandas uses)
        if hasattr(frame, "toArrow"):
            table = frame.toArrow()
        else:
            batches = frame._collect_as_arrow()
            table = pa.Table.from_batches(batches) if batches else _empty_arrow(frame.schema)
        return {name: table.column(name).to_numpy(zero_copy_only=False) for name in frame.columns}

    def row(self, sql: str) -> tuple:
        return tuple(self.spark.sql(sql).first())

    def columns(self, relation: str) -> list[str]:
        return list(self.spark.table(relation).columns)

    def register(self, name: str, columns: dict[str, np.ndarray] | pa.Table) -> None:
        table = columns if isinstance(columns, pa.Table) else pa.table(columns)
        directory = self._scratch_dir("driver")
        directory.mkdir(parents=True)
        pq.write_table(table, directory / "part-00000.parquet")
        self._name(name, self.spark.read.parquet(str(directory)))

    def write(self, table: str, sql: str) -> None:
        if self.out is None:
            raise RuntimeError("SparkBackend.out is not set (run_protocol sets it)")
        directory = self.scratch / "tables" / table
        frame = self.spark.sql(sql)
        frame.write.mode("overwrite").parquet(str(directory))  # sorted: part i holds the i-th range
        self._parts[table] = directory
        _compact(_part_files(directory), self.out / f"{table}.parquet", frame.schema, self.row_group_size)

    def written(self, table: str) -> str:
        return f"parquet.{self.q(str(self._parts[table]))}"

    def close(self) -> None:
        """Drop this run's views and cached tables (the session stays usable for another run)."""
        for frame in self._cached:
            frame.unpersist()
        for name in self._views:
            self.spark.catalog.dropTempView(name)
        self._views, self._cached = [], []


def _part_files(directory: Path) -> list[Path]:
    """A Spark output's data files in partition order (their names carry the zero-padded partition id)."""
    return sorted(p for p in Path(directory).iterdir() if p.name.startswith("part-") and p.suffix == ".parquet")


def _empty_arrow(schema) -> pa.Table:
    from pyspark.sql.pandas.types import to_arrow_schema

    return to_arrow_schema(schema).empty_table()


def _nullable(schema: pa.Schema) -> pa.Schema:
    """``schema`` with list elements nullable, as DuckDB writes them (pandas sees element nullability in a
    list column's dtype), and without Spark's row metadata."""
    def field(f: pa.Field) -> pa.Field:
        if pa.types.is_list(f.type):
            return f.with_type(pa.list_(field(f.type.value_field).with_nullable(True)))
        return f
    return pa.schema([field(f) for f in schema])


def _compact(parts: list[Path], target: Path, spark_schema, row_group_size: int) -> None:
    """Concatenate part-files into one parquet file, streamed: at most one row group in memory."""
    schema = None
    buffered: list[pa.RecordBatch] = []
    rows = 0
    writer = None
    try:
        for part in parts:
            file = pq.ParquetFile(part)
            if schema is None:
                schema = _nullable(file.schema_arrow)
                writer = pq.ParquetWriter(target, schema)
            for batch in file.iter_batches(batch_size=min(row_group_size, 65536)):
                buffered.append(batch.cast(schema))
                rows += batch.num_rows
                while rows >= row_group_size:
                    chunk = pa.Table.from_batches(buffered, schema=schema)
                    writer.write_table(chunk.slice(0, row_group_size), row_group_size=row_group_size)
                    rest = chunk.slice(row_group_size)
                    buffered, rows = rest.to_batches(), rest.num_rows
        if writer is None:  # no part-file at all: an empty table with the query's columns
            schema = _empty_arrow(spark_schema).schema
            writer = pq.ParquetWriter(target, schema)
        if rows:
            writer.write_table(pa.Table.from_batches(buffered, schema=schema), row_group_size=row_group_size)
        elif writer is not None and not parts:
            writer.write_table(schema.empty_table())
    finally:
        if writer is not None:
            writer.close()


def run_protocol(db: SparkBackend, source: Source, cfg: ProtocolConfig, out: Path,
                 duplicates: str | None = None) -> tuple[FeatureMap, dict]:
    """Apply ``cfg``'s protocol to the ``raw_*`` views of ``db``; write the tables of
    :attr:`hybrid.data.protocols.PreparedData.TABLES` as parquet into ``out`` (a path the driver writes).
    Returns the feature map and the stats, as :func:`hybrid.data.duckdb_engine.run_protocol` (``duplicates``
    too)."""
    db.out = Path(out)
    try:
        return sql_protocol.run(db, source, cfg, duplicates)
    except Exception as exc:
        _reraise_input_error(exc, source.source or source.name)
        raise


def _reraise_input_error(exc: Exception, where: str) -> None:
    """A reader failure found while Spark runs a step (a malformed CSV row in FAILFAST mode) as an input error."""
    text = str(exc)
    if "Malformed" in text or "malformed" in text:
        reason = next((line.strip() for line in text.splitlines() if "alformed" in line), text.splitlines()[0])
        raise HybridInputError(f"{where}: malformed file: {reason}") from None


# -- sources ------------------------------------------------------------------------------------------------------

#: readers implemented in Spark itself; every other dataset goes through the pandas reader on the driver
NATIVE_DATASETS = ("taobao", "events")


def load_source(db: SparkBackend, dataset: str, path: str, *, columns: dict[str, str] | None = None,
                items_path: str | None = None, users_path: str | None = None, nrows: int | None = None) -> Source:
    """Create the views ``raw_events`` (and ``raw_items`` / ``raw_users``) in ``db``, as
    :func:`hybrid.data.duckdb_sources.load_source` creates its tables.

    Args:
        db: the backend.
        dataset, path, columns, items_path, users_path: as in :func:`hybrid.data.readers.read_dataset`.

    Example:
        >>> source = load_source(db, "events", "log.parquet", columns={"user_id": "uid"})  # doctest: +SKIP

    ``nrows`` (``data.nrows``, a quick look) is refused: Spark reads a file in parallel parts, with no first
    rows; a ``sequences`` file is read by the pandas reader on the driver.
    """
    if nrows is not None:
        raise HybridInputError("data.nrows is not supported on engine.name: spark (which reads a file in parallel "
                               "parts); take a quick look with engine.name: duckdb or pandas")
    if dataset == "taobao":
        return _load_taobao(db, path)
    if dataset == "events":
        return _load_events_table(db, path, columns or {}, items_path, users_path)
    options = {"columns": columns or None, "items_path": items_path, "users_path": users_path}
    return _load_raw_dataset(db, read_dataset(dataset, path, **{k: v for k, v in options.items() if v is not None}))


def _text(values) -> pa.Array:
    """A column as Arrow text (what DuckDB's ``CAST(... AS VARCHAR)`` of the frame gives for text and ints)."""
    array = pa.array(values, from_pandas=True)
    return array if pa.types.is_string(array.type) else array.cast(pa.string())


def _load_raw_dataset(db: SparkBackend, data: RawDataset) -> Source:
    """The frames of a pandas reader as views (same columns and types as ``load_raw_dataset``'s tables)."""
    events = data.events.reset_index(drop=True)
    present = tuple(c for c in (*EVENT_COLUMNS, *OPTIONAL_EVENT_COLUMNS) if c in events)
    table = pa.Table.from_pandas(events[list(present)], preserve_index=False)
    db.register("raw_events", table.add_column(0, "rn", pa.array(np.arange(len(events), dtype=np.int64))))
    if data.items is not None:
        items = data.items.drop_duplicates("item_id")
        year = items["year"] if "year" in items else [None] * len(items)
        db.register("raw_items", pa.table({"item_id": _text(items["item_id"]), "genres": _text(items["genres"]),
                                           "year": _text(year)}))
    if data.users is not None:
        _register_users(db, data.users)
    return raw_source(data, present)


def _register_users(db: SparkBackend, users) -> None:
    users = users.drop_duplicates("user_id")
    db.register("raw_users", pa.table({c: _text(users[c]) for c in ("user_id", "gender", "age", "occupation")
                                       if c in users}))


class SparkChecks(ColumnChecks):
    """:class:`~hybrid.data.sql_checks.ColumnChecks` in Spark SQL over view ``staging`` (``rn``: increasing
    in file order, not contiguous); ANSI mode is off, so a cast that does not parse gives null."""

    TEXT = "STRING"

    def __init__(self, db: SparkBackend, path: Path, first_line: int, unit: str = "line"):
        super().__init__(path, first_line, unit)
        self.db = db
        self.types = {f.name: f.dataType.simpleString().upper() for f in db.spark.table("staging").schema.fields}

    def q(self, name: str) -> str:
        return self.db.q(name)

    def first(self, condition: str, value: str) -> tuple | None:
        rows = self.db.spark.sql(f"SELECT rn, {value} AS v FROM staging WHERE {condition} ORDER BY rn LIMIT 1").collect()
        return tuple(rows[0]) if rows else None

    def line(self, row: int) -> int:
        return int(self.db.scalar(f"SELECT count(*) FROM staging WHERE rn < {int(row)}"))

    def column_type(self, column: str) -> str:
        return self.types[column]

    def to_double(self, expr: str) -> str:
        return f"CAST({expr} AS DOUBLE)"

    def is_infinite(self, expr: str) -> str:
        return f"abs({expr}) = CAST('Infinity' AS DOUBLE)"

    def to_timestamp(self, expr: str) -> str:
        return f"CAST({expr} AS TIMESTAMP)"

    def epoch(self, timestamp: str) -> str:
        return f"CAST({timestamp} AS DOUBLE)"

    def parses_as_double(self, text: str) -> bool:
        return self.db.scalar(f"SELECT CAST({_literal(text)} AS DOUBLE)") is not None


def _literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _stage(db: SparkBackend, path: Path, reader) -> None:
    """View ``staging``: the file's rows with ``rn`` (increasing in file order), cached; a malformed row fails
    here, named with the file."""
    from pyspark.sql.functions import monotonically_increasing_id

    try:
        db._name("staging_raw", reader().withColumn("rn", monotonically_increasing_id()))
        db.table("staging", "SELECT * FROM staging_raw")
        db.scalar("SELECT count(*) FROM staging")  # reads the whole file once: FAILFAST errors surface now
    except HybridInputError:
        raise
    except Exception as exc:
        _reraise_input_error(exc, str(path))
        raise HybridInputError(f"{path}: not a readable file ({str(exc).splitlines()[0]})") from None


def _csv_reader(db: SparkBackend, path: Path, names: list[str], *, sep: str, header: bool, quoting: bool):
    from pyspark.sql.types import StringType, StructField, StructType

    schema = StructType([StructField(n, StringType()) for n in names])
    options = {"sep": sep, "header": str(header).lower(), "mode": "FAILFAST", "nullValue": "", "encoding": "UTF-8",
               # quoting off = no quote character at all, as the DuckDB reader's quote=''
               "quote": '"' if quoting else "\u0000", "escape": '"' if quoting else "\u0000"}
    return lambda: db.spark.read.options(**options).schema(schema).csv(str(path))


def _load_taobao(db: SparkBackend, path: str | Path) -> Source:
    """Tianchi ``UserBehavior.csv`` read by Spark: the result of :func:`hybrid.data.readers.read_taobao`."""
    path = Path(path)
    if path.is_dir():
        path = path / "UserBehavior.csv"
    _require_file(path, "Taobao behaviour file")
    if path.stat().st_size == 0:
        raise HybridInputError(f"{path}: file is empty")
    _stage(db, path, _csv_reader(db, path, list(TAOBAO_COLUMNS), sep=",", header=False, quoting=False))
    check = SparkChecks(db, path, first_line=1)
    exprs = {c: check.convert(c, "timestamp" if c == "timestamp" else "user_id", repr(c)) for c in TAOBAO_COLUMNS}
    db.view("raw_events", f"""SELECT rn, {exprs['user_id']} AS user_id, {exprs['item_id']} AS item_id,
                   {exprs['timestamp']} AS timestamp, {exprs['behavior_type']} AS behavior FROM staging""")
    # an item's category is the one of its first row in the file
    db.table("raw_items", f"""SELECT item_id, min_by(category, rn) AS genres, '{UNKNOWN_YEAR}' AS year
                   FROM (SELECT rn, {exprs['item_id']} AS item_id, {exprs['category_id']} AS category FROM staging) s
                   GROUP BY item_id""")
    return Source("taobao", str(path), True, False, ("user_id", "item_id", "timestamp", "behavior"),
                  events_file=str(path), locate=_locate(check, path))


def _load_events_table(db: SparkBackend, path: str | Path, columns: dict[str, str], items_path: str | None,
                       users_path: str | None) -> Source:
    """A generic events table (CSV/TSV/parquet) read by Spark, with the checks and messages of
    :func:`hybrid.data.readers.read_events_table`; its small side tables go through the pandas reader."""
    for canonical, file_column in columns.items():
        if canonical not in _ALL_CANONICAL:
            raise HybridInputError(f"unknown canonical column {canonical!r} in columns; expected one of "
                                   f"{', '.join(_ALL_CANONICAL)}")
        if not isinstance(file_column, str) or not file_column:
            raise HybridInputError(f"columns[{canonical!r}] must be a non-empty column name, got {file_column!r}")
    path = _require_file(Path(path), "events file")
    fmt = _table_format(path)
    if fmt == "parquet":
        try:
            header = pq.read_schema(path).names
        except (OSError, pa.ArrowException) as exc:
            raise HybridInputError(f"{path}: not a readable parquet file ({exc})") from None
        reader, first_line, unit = (lambda: db.spark.read.parquet(str(path))), 1, "row"
    else:
        if path.stat().st_size == 0:
            raise HybridInputError(f"{path}: file is empty")
        header = _csv_header(path, fmt)
        reader, first_line, unit = _csv_reader(db, path, header, sep=fmt, header=True, quoting=True), 2, "line"
    wanted = [*EVENT_COLUMNS, *(c for c in OPTIONAL_EVENT_COLUMNS if columns.get(c, c) in header or c in columns)]
    for canonical in wanted:  # before Spark reads a row: a missing column is found from the header alone
        if columns.get(canonical, canonical) not in header:
            raise HybridInputError(f"{path}: missing required column "
                                   f"{_label(columns.get(canonical, canonical), canonical)}; columns present: "
                                   f"{', '.join(map(str, header))}")
    _stage(db, path, reader)
    check = SparkChecks(db, path, first_line=first_line, unit=unit)
    exprs = [f"{check.convert(columns.get(c, c), c, _label(columns.get(c, c), c))} AS {db.q(c)}" for c in wanted]
    db.view("raw_events", f"SELECT rn, {', '.join(exprs)} FROM staging")
    explicit = set(columns)
    if items_path is not None:
        item_file = _require_file(Path(items_path), "items file")
        items = _complete_items(_read_table(item_file, columns, ("item_id",), ("title", "genres", "year"), explicit),
                                item_file)
        db.register("raw_items", pa.table({"item_id": _text(items["item_id"]), "genres": _text(items["genres"]),
                                           "year": _text(items["year"])}))
    if users_path is not None:
        user_file = _require_file(Path(users_path), "users file")
        table = _read_table(user_file, columns, ("user_id",), ("gender", "age", "occupation", "zip"), explicit)
        _register_users(db, _complete_users(table, user_file))
    return Source(path.name.split(".")[0] or "events", str(path), items_path is not None, users_path is not None,
                  tuple(wanted), events_file=str(path), locate=_locate(check, path))


def _locate(check: SparkChecks, path: Path):
    """``rn`` (Spark's increasing, not contiguous ids) → ``"<file>, line N"``."""
    return lambda rn: f"{path}, {check.unit} {check.line(rn) + check.first_line}"
