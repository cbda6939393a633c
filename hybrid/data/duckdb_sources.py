"""Raw behaviour data into DuckDB tables, in the canonical schema of :mod:`hybrid.data.schema`.

The out-of-core engine (:mod:`hybrid.data.duckdb_engine`) runs the protocols as SQL over three tables that
this module creates in a DuckDB connection:

- ``raw_events(rn, user_id, item_id, timestamp[, rating][, behavior])`` — ``rn`` is the row's position in
  the file: events at the same second keep file order, as the pandas path's stable sort does;
- ``raw_items(item_id, genres, year)`` — one row per item (``genres`` ``|``-separated), optional;
- ``raw_users(user_id, gender, age, occupation)`` — optional.

Raw ids stay text (``VARCHAR``), as in the pandas readers: the feature map keys vocabularies by raw value.

Taobao ``UserBehavior.csv``, the generic ``events`` table (CSV/TSV/parquet) and ``sequences`` files (one line
per user: read as lines, split with ``string_split`` and unnested, out of core too) are read by DuckDB itself —
in parallel, spilling to disk, never as Python objects — and checked in SQL with the pandas readers' messages
(file, line or row, column). Other sources (MovieLens, RecBole: small, with format quirks the pandas readers
already handle) are read by :func:`hybrid.data.readers.read_dataset` and handed to DuckDB as frames.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import lzma
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from hybrid.core.errors import HybridInputError
from hybrid.data.readers import (
    _ALL_CANONICAL,
    SEQUENCE_LINE_SHIFT,
    TAOBAO_COLUMNS,
    TIMED_ITEM,
    UNKNOWN_YEAR,
    _complete_items,
    _complete_users,
    _label,
    _read_table,
    _require_file,
    _table_format,
    field_count_problem,
    read_dataset,
    sequence_problem,
    sequences_have_timestamps,
)
from hybrid.data.schema import EVENT_COLUMNS, OPTIONAL_EVENT_COLUMNS, RawDataset, RowOrigin
from hybrid.data.sql_checks import ColumnChecks

#: Readers this module implements in SQL; every other dataset goes through the pandas reader.
NATIVE_DATASETS = ("taobao", "events", "sequences")


@dataclass(frozen=True)
class Source:
    """What was loaded: the dataset's name and path (for messages and stats) and which tables exist.

    ``events_file`` names the events file and ``locate(rn)`` one of its rows (``"u.data, line 7"``) from the
    ``rn`` of ``raw_events``, for the checks of :mod:`hybrid.data.validation`; by default they name the source
    and the ``rn + 1``-th event.
    """

    name: str
    source: str
    has_items: bool
    has_users: bool
    event_columns: tuple[str, ...]
    events_file: str = ""
    locate: Callable[[int], str] | None = field(default=None, compare=False, repr=False)

    def file(self) -> str:
        """The events file (or, when the events come from several files, the dataset's path or name)."""
        return self.events_file or self.source or self.name

    def row(self, rn: int) -> str:
        """``"<file>, line N"`` of the event whose ``rn`` is given."""
        return self.locate(int(rn)) if self.locate is not None else f"{self.file()}, event {int(rn) + 1}"


def raw_source(data: RawDataset, present: tuple[str, ...]) -> Source:
    """The :class:`Source` of a dataset read by a pandas reader (``rn`` = its events' position)."""
    origin = data.origin
    return Source(data.name, data.source, data.items is not None, data.users is not None, present,
                  events_file=origin.path if origin else "", locate=origin.at if origin else None)


def quote(name: str) -> str:
    """A SQL identifier for any column name."""
    return '"' + name.replace('"', '""') + '"'


def load_source(con: duckdb.DuckDBPyConnection, dataset: str, path: str, *, columns: dict[str, str] | None = None,
                items_path: str | None = None, users_path: str | None = None, nrows: int | None = None) -> Source:
    """Create ``raw_events`` (and ``raw_items`` / ``raw_users``) in ``con`` for a dataset named as in
    :func:`hybrid.data.readers.read_dataset` (``nrows``: only the first rows, as there)."""
    if dataset == "taobao":
        return load_taobao(con, path, nrows)
    if dataset == "events":
        return load_events_table(con, path, columns or {}, items_path, users_path, nrows)
    if dataset == "sequences":
        if columns:
            raise HybridInputError("dataset 'sequences' does not take option 'columns' (it takes: items_path, "
                                   "users_path, nrows)")
        return load_sequences(con, path, items_path, users_path, nrows)
    options = {"columns": columns or None, "items_path": items_path, "users_path": users_path, "nrows": nrows}
    return load_raw_dataset(con, read_dataset(dataset, path, **{k: v for k, v in options.items() if v is not None}))


# -- from pandas (small sources) ------------------------------------------------------------------------------

def load_raw_dataset(con: duckdb.DuckDBPyConnection, data: RawDataset) -> Source:
    """Hand a :class:`RawDataset` (already read and checked by a pandas reader) to DuckDB."""
    events = data.events.reset_index(drop=True)
    present = tuple(c for c in (*EVENT_COLUMNS, *OPTIONAL_EVENT_COLUMNS) if c in events)
    frame = events[list(present)].assign(rn=np.arange(len(events), dtype=np.int64))
    con.register("_events_frame", frame)
    con.execute(f"CREATE TABLE raw_events AS SELECT rn, {', '.join(map(quote, present))} FROM _events_frame")
    con.unregister("_events_frame")
    load_side_frames(con, data.items, data.users)
    return raw_source(data, present)


def load_side_frames(con: duckdb.DuckDBPyConnection, items: pd.DataFrame | None, users: pd.DataFrame | None) -> None:
    """Create ``raw_items`` / ``raw_users`` from side tables already read and checked (``None``: no table)."""
    if items is not None:
        items = items.drop_duplicates("item_id")
        items = pd.DataFrame({"item_id": items["item_id"], "genres": items["genres"],
                              "year": items["year"] if "year" in items else None})
        con.register("_items_frame", items)
        con.execute("CREATE TABLE raw_items AS SELECT CAST(item_id AS VARCHAR) AS item_id, "
                    "CAST(genres AS VARCHAR) AS genres, CAST(year AS VARCHAR) AS year FROM _items_frame")
        con.unregister("_items_frame")
    if users is not None:
        _load_users_frame(con, users)


def read_side_files(items_path: str | None, users_path: str | None,
                    columns: dict[str, str] | None = None) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The optional item / user side tables of an ``events`` dataset (small: read and checked by pandas)."""
    columns = columns or {}
    explicit = set(columns)
    items = users = None
    if items_path is not None:
        item_file = _require_file(Path(items_path), "items file")
        items = _complete_items(_read_table(item_file, columns, ("item_id",), ("title", "genres", "year"), explicit),
                                item_file)
    if users_path is not None:
        user_file = _require_file(Path(users_path), "users file")
        users = _complete_users(_read_table(user_file, columns, ("user_id",), ("gender", "age", "occupation", "zip"),
                                            explicit), user_file)
    return items, users


def _load_users_frame(con: duckdb.DuckDBPyConnection, users: pd.DataFrame) -> None:
    users = users.drop_duplicates("user_id")
    con.register("_users_frame", users)
    fields = ", ".join(f"CAST({quote(c)} AS VARCHAR) AS {quote(c)}" for c in ("user_id", "gender", "age", "occupation")
                       if c in users)
    con.execute(f"CREATE TABLE raw_users AS SELECT {fields} FROM _users_frame")
    con.unregister("_users_frame")


# -- native readers -------------------------------------------------------------------------------------------

def _read_csv_sql(path: Path, names: list[str], *, sep: str, header: bool, quoting: bool,
                  max_line_size: int | None = None) -> str:
    """A ``read_csv`` call with every column as text: parsing and its errors are ours, with line numbers.
    ``max_line_size``: longest line in bytes (DuckDB's default: 2 MB)."""
    cols = "{" + ", ".join(f"'{n.replace(chr(39), chr(39) * 2)}': 'VARCHAR'" for n in names) + "}"
    quote_opts = "quote='\"', escape='\"'" if quoting else "quote='', escape=''"
    longest = f", max_line_size={int(max_line_size)}" if max_line_size else ""
    return (f"read_csv('{_sql_string(str(path))}', columns={cols}, header={str(header).lower()}, "
            f"delim='{_sql_string(sep)}', {quote_opts}, auto_detect=false, strict_mode=true, nullstr=''{longest})")


def _sql_string(text: str) -> str:
    return text.replace("'", "''")


def _stage_csv(con: duckdb.DuckDBPyConnection, path: Path, names: list[str], *, sep: str, header: bool,
               quoting: bool, nrows: int | None = None, table: str = "staging",
               max_line_size: int | None = None) -> None:
    """Copy the file into table ``staging`` (text columns; ``rowid`` = data row, in file order); ``nrows``:
    only its first data rows (lines), the rest not read at all."""
    if path.stat().st_size == 0:
        raise HybridInputError(f"{path}: file is empty")
    try:
        with _first_lines(con, path, None if nrows is None else nrows + int(header)) as read_from:
            reader = _read_csv_sql(read_from, names, sep=sep, header=header, quoting=quoting,
                                   max_line_size=max_line_size)
            con.execute(f"CREATE TABLE {table} AS SELECT * FROM {reader}")
    except duckdb.Error as exc:
        counted = _FIELD_COUNT.search(str(exc))
        if counted is not None:  # a row with more (or fewer) fields than the header / format
            raise HybridInputError(field_count_problem(path, int(counted[1]), int(counted[3]), int(counted[2]))) from None
        raise HybridInputError(f"{path}: malformed file: {_duckdb_reason(exc)}") from None


_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


@contextmanager
def _first_lines(con: duckdb.DuckDBPyConnection, path: Path, lines: int | None) -> Iterator[Path]:
    """``path``, or with ``lines`` a scratch copy of its first lines (decompressed), so that DuckDB reads no
    further: a row past them, malformed or not, is never seen — as pandas' ``nrows``."""
    if lines is None:
        yield path
        return
    suffix = path.suffix.lower()
    if suffix in (".zip", ".zst"):
        raise HybridInputError(f"{path}: data.nrows takes a plain, .gz, .bz2 or .xz file, not {suffix}")
    database = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
    parent = Path(database[0]).parent if database and database[0] else None  # beside the scratch database
    directory = Path(tempfile.mkdtemp(prefix=".nrows.", dir=parent))
    head = directory / (path.stem if suffix in _OPENERS else path.name)
    try:
        with _OPENERS.get(suffix, open)(path, "rb") as src, open(head, "wb") as dst:
            for _ in range(lines):
                chunk = src.readline()
                if not chunk:
                    break
                dst.write(chunk)
        yield head
    finally:
        shutil.rmtree(directory, ignore_errors=True)


_FIELD_COUNT = re.compile(r"CSV Error on Line: (\d+).*?Expected Number of Columns: (\d+) Found: (\d+)", re.S)


def _duckdb_reason(exc: duckdb.Error) -> str:
    """The first informative line of a DuckDB reader error (its message is several paragraphs)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:3]) if lines else type(exc).__name__
    return text.removeprefix("Invalid Input Error: ").removeprefix("Conversion Error: ")


class DuckDBChecks(ColumnChecks):
    """:class:`~hybrid.data.sql_checks.ColumnChecks` in DuckDB's SQL over view ``staging`` (``rowid``: the
    data row's number, from 0)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, path: Path, first_line: int, unit: str = "line"):
        super().__init__(path, first_line, unit)
        self.con = con

    def q(self, name: str) -> str:
        return quote(name)

    def first(self, condition: str, value: str) -> tuple | None:
        return self.con.execute(f"SELECT rowid, {value} FROM staging WHERE {condition} ORDER BY rowid LIMIT 1").fetchone()

    def line(self, row: int) -> int:
        return int(row)

    def column_type(self, column: str) -> str:
        return str(self.con.execute(f"SELECT {quote(column)} FROM staging LIMIT 0").description[0][1]).upper()

    def to_double(self, expr: str) -> str:
        return f"TRY_CAST({expr} AS DOUBLE)"

    def is_infinite(self, expr: str) -> str:
        return f"isinf({expr})"

    def to_timestamp(self, expr: str) -> str:
        return f"TRY_CAST({expr} AS TIMESTAMPTZ)"

    def epoch(self, timestamp: str) -> str:
        return f"epoch({timestamp})"

    def parses_as_double(self, text: str) -> bool:
        return self.con.execute("SELECT TRY_CAST(? AS DOUBLE)", [text]).fetchone()[0] is not None


def load_taobao(con: duckdb.DuckDBPyConnection, path: str | Path, nrows: int | None = None) -> Source:
    """Tianchi ``UserBehavior.csv`` (no header: user, item, category, behaviour, timestamp), read by DuckDB.

    Same result as :func:`hybrid.data.readers.read_taobao`: the behaviour becomes ``behavior``; an item's
    category is the one of its first row in the file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "UserBehavior.csv"
    _require_file(path, "Taobao behaviour file")
    _stage_csv(con, path, list(TAOBAO_COLUMNS), sep=",", header=False, quoting=False, nrows=nrows)
    check = DuckDBChecks(con, path, first_line=1)
    exprs = {c: check.convert(c, "timestamp" if c == "timestamp" else "user_id", repr(c)) for c in TAOBAO_COLUMNS}
    con.execute(f"""CREATE VIEW raw_events AS SELECT rowid AS rn, {exprs['user_id']} AS user_id,
                    {exprs['item_id']} AS item_id, {exprs['timestamp']} AS timestamp,
                    {exprs['behavior_type']} AS behavior FROM staging""")
    con.execute(f"""CREATE TABLE raw_items AS SELECT item_id, arg_min(category, rn) AS genres,
                    '{UNKNOWN_YEAR}' AS year FROM (SELECT rowid AS rn, {exprs['item_id']} AS item_id,
                    {exprs['category_id']} AS category FROM staging) GROUP BY item_id""")
    return Source("taobao", str(path), True, False, ("user_id", "item_id", "timestamp", "behavior"),
                  events_file=str(path), locate=RowOrigin(str(path)).at)


def _csv_header(path: Path, sep: str) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return next(csv.reader(handle, delimiter=sep), [])
    except UnicodeDecodeError as exc:
        raise HybridInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def load_events_table(con: duckdb.DuckDBPyConnection, path: str | Path, columns: dict[str, str],
                      items_path: str | None = None, users_path: str | None = None,
                      nrows: int | None = None) -> Source:
    """A generic events table (CSV/TSV by suffix, or parquet) read by DuckDB, with the checks and messages of
    :func:`hybrid.data.readers.read_events_table`; its optional item / user side tables (small) are read by
    the pandas reader."""
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
            limit = f" LIMIT {int(nrows)}" if nrows is not None else ""
            con.execute(f"CREATE TABLE staging AS SELECT * FROM read_parquet('{_sql_string(str(path))}'){limit}")
        except duckdb.Error as exc:
            raise HybridInputError(f"{path}: not a readable parquet file ({_duckdb_reason(exc)})") from None
        header = [d[0] for d in con.execute("SELECT * FROM staging LIMIT 0").description]
        check = DuckDBChecks(con, path, first_line=1, unit="row")
    else:
        if path.stat().st_size == 0:
            raise HybridInputError(f"{path}: file is empty")
        header = _csv_header(path, fmt)
        _stage_csv(con, path, header, sep=fmt, header=True, quoting=True, nrows=nrows)
        check = DuckDBChecks(con, path, first_line=2)
    wanted = [*EVENT_COLUMNS, *(c for c in OPTIONAL_EVENT_COLUMNS if columns.get(c, c) in header or c in columns)]
    for canonical in wanted:
        if columns.get(canonical, canonical) not in header:
            raise HybridInputError(f"{path}: missing required column "
                                   f"{_label(columns.get(canonical, canonical), canonical)}; columns present: "
                                   f"{', '.join(map(str, header))}")
    exprs = []
    for canonical in wanted:
        file_column = columns.get(canonical, canonical)
        exprs.append(f"{check.convert(file_column, canonical, _label(file_column, canonical))} AS {quote(canonical)}")
    con.execute(f"CREATE VIEW raw_events AS SELECT rowid AS rn, {', '.join(exprs)} FROM staging")
    load_side_frames(con, *read_side_files(items_path, users_path, columns))
    return Source(path.name.split(".")[0] or "events", str(path), items_path is not None, users_path is not None,
                  tuple(wanted), events_file=str(path), locate=RowOrigin(str(path), check.first_line, check.unit).at)


#: the longest line of a sequence file DuckDB reads (a user's whole history; its default is 2 MB)
SEQUENCE_MAX_LINE_BYTES = 1 << 28


def load_sequences(con: duckdb.DuckDBPyConnection, path: str | Path, items_path: str | None = None,
                   users_path: str | None = None, nrows: int | None = None) -> Source:
    """A "one line per user" sequence file, read by DuckDB, with the format, checks and messages of
    :func:`hybrid.data.readers.read_sequences`: the lines are read as one text column, split into fields
    with ``string_split`` and unnested with their positions, all in SQL (out of core). ``rn`` is
    ``line << 32 | position``; the optional side tables (small) are read by the pandas reader."""
    path = _require_file(Path(path), "sequence file")
    timed = sequences_have_timestamps(path)
    _stage_csv(con, path, ["text"], sep="\x01", header=False, quoting=False, nrows=nrows, table="staging_lines",
               max_line_size=SEQUENCE_MAX_LINE_BYTES)
    con.execute("""CREATE TABLE seq_lines AS SELECT line, t[1] AS user_id, t[2:] AS items FROM (
                     SELECT rowid + 1 AS line, list_filter(string_split(replace(coalesce(text, ''), chr(9), ' '), ' '),
                                                          lambda x: x <> '') AS t FROM staging_lines) s
                   WHERE len(t) > 0""")
    con.execute("DROP TABLE staging_lines")
    con.execute("""CREATE TABLE seq_tokens AS SELECT line, user_id, unnest(items) AS token,
                   generate_subscripts(items, 1) AS pos FROM seq_lines""")
    bad_token = f"{'NOT ' if timed else ''}regexp_full_match(token, '{TIMED_ITEM}')"
    problem = con.execute(f"""
        SELECT line, kind, pos, value, first_line FROM (
            SELECT line, 0 AS kind, 0 AS pos, user_id AS value, first_line FROM (
                SELECT line, user_id, min(line) OVER (PARTITION BY user_id) AS first_line FROM seq_lines) d
            WHERE line > first_line
            UNION ALL SELECT line, 1, 0, user_id, NULL FROM seq_lines WHERE len(items) = 0
            UNION ALL SELECT line, 2, pos, token, NULL FROM seq_tokens WHERE {bad_token}) p
        ORDER BY line, kind, pos LIMIT 1""").fetchone()
    if problem is not None:
        line, kind, pos, value, first_line = problem
        raise HybridInputError(sequence_problem(path, int(line), int(kind), int(pos), value, timed,
                                                None if first_line is None else int(first_line)))
    item, when = (("regexp_extract(token, '{0}', 1)".format(TIMED_ITEM),
                   "CAST(regexp_extract(token, '{0}', 2) AS BIGINT)".format(TIMED_ITEM)) if timed
                  else ("token", "CAST(pos AS BIGINT)"))
    con.execute(f"""CREATE VIEW raw_events AS SELECT (CAST(line AS BIGINT) << {SEQUENCE_LINE_SHIFT}) + pos AS rn,
                    user_id, {item} AS item_id, {when} AS timestamp FROM seq_tokens""")
    load_side_frames(con, *read_side_files(items_path, users_path))
    mask = (1 << SEQUENCE_LINE_SHIFT) - 1
    return Source(path.name.split(".")[0] or "sequences", str(path), items_path is not None, users_path is not None,
                  ("user_id", "item_id", "timestamp"), events_file=str(path),
                  locate=lambda rn: f"{path}, line {int(rn) >> SEQUENCE_LINE_SHIFT}, item {int(rn) & mask}")
