"""The pandas readers' column checks as SQL, written once for every engine that reads raw files itself.

An engine's reader stages the file as view ``staging`` (one row per data row, with a row number increasing in
file order) and asks :class:`ColumnChecks` for each canonical column: the check runs, and either one
:class:`~hybrid.core.errors.HybridInputError` names ``file, line N, column 'c'`` and the problem, or the SQL
expression that converts the column comes back. The few spellings the dialects differ in (quoting, the text
type, casts that yield null instead of failing, timestamps to epoch seconds, how a row is found and numbered)
are the hooks a subclass fills in: :class:`hybrid.data.duckdb_sources.DuckDBChecks`,
:class:`hybrid.data.spark_engine.SparkChecks`.
"""
from __future__ import annotations

from pathlib import Path

from hybrid.core.errors import HybridInputError
from hybrid.data.readers import _CANONICAL_KIND, MAX_TIMESTAMP, TIMESTAMP_RANGE_PROBLEM


class ColumnChecks:
    """Checks and conversions of one staged file's columns.

    Args:
        path: the file (named in every message).
        first_line: the line (or row) number of the first data row.
        unit: ``line`` (text files) or ``row`` (parquet).
    """

    TEXT = "VARCHAR"  # the dialect's name of the text type, as it casts to and reports it

    def __init__(self, path: Path, first_line: int, unit: str = "line") -> None:
        self.path, self.first_line, self.unit = path, first_line, unit

    # -- the dialect's hooks ---------------------------------------------------------------------------------

    def q(self, name: str) -> str:
        """A quoted identifier."""
        raise NotImplementedError

    def first(self, condition: str, value: str) -> tuple | None:
        """``(row number, value)`` of the first staged row meeting ``condition``, or ``None``."""
        raise NotImplementedError

    def line(self, row: int) -> int:
        """How many data rows come before staged row ``row`` (its line is that plus ``first_line``)."""
        raise NotImplementedError

    def column_type(self, column: str) -> str:
        """The staged column's type, upper case (``DOUBLE``, ``TIMESTAMP``, the text type...)."""
        raise NotImplementedError

    def to_double(self, expr: str) -> str:
        """``expr`` as a double, null where it does not parse."""
        raise NotImplementedError

    def is_infinite(self, expr: str) -> str:
        raise NotImplementedError

    def to_timestamp(self, expr: str) -> str:
        """``expr`` as a point in time (naive = UTC), null where it does not parse."""
        raise NotImplementedError

    def epoch(self, timestamp: str) -> str:
        """Seconds since 1970 (a double) of a timestamp expression."""
        raise NotImplementedError

    def parses_as_double(self, text: str) -> bool:
        raise NotImplementedError

    # -- the checks --------------------------------------------------------------------------------------

    def where(self, row: int, label: str) -> str:
        return f"{self.path}, {self.unit} {self.line(row) + self.first_line}, column {label}"

    def key(self, column: str, label: str) -> str:
        """Required text: non-empty; numbers become text (an integral float loses its ``.0``)."""
        c, kind = self.q(column), self.column_type(column)
        bad = self.first(f"{c} IS NULL OR trim(CAST({c} AS {self.TEXT})) = ''", c)
        if bad is not None:
            raise HybridInputError(f"{self.where(bad[0], label)}: empty value; every row needs one")
        if kind in ("DOUBLE", "FLOAT") or kind.startswith("DECIMAL"):
            return (f"CASE WHEN {c} = floor({c}) THEN CAST(CAST({c} AS BIGINT) AS {self.TEXT}) "
                    f"ELSE CAST({c} AS {self.TEXT}) END")
        return f"CAST({c} AS {self.TEXT})"

    def number(self, column: str, label: str) -> str:
        """A finite float64: empty, NaN, infinite and non-numeric cells are errors."""
        c = self.q(column)
        value = self.to_double(c)
        bad = self.first(f"{value} IS NULL OR isnan({value}) OR {self.is_infinite(value)}", f"CAST({c} AS {self.TEXT})")
        if bad is not None:
            raw = bad[1]
            if raw is None or raw.strip().lower() in ("", "nan"):
                raise HybridInputError(f"{self.where(bad[0], label)}: value is empty/NaN; every row needs a number")
            if raw.strip().lower().lstrip("+-") in ("inf", "infinity"):
                raise HybridInputError(f"{self.where(bad[0], label)}: {raw!r} is not a finite number")
            raise HybridInputError(f"{self.where(bad[0], label)}: cannot parse {raw!r} as a number")
        return value

    def timestamp(self, column: str, label: str) -> str:
        """Unix seconds (fractions floored) or, when the first row is not a number, a date-time (naive = UTC)."""
        c, kind = self.q(column), self.column_type(column)
        if kind.startswith("TIMESTAMP") or kind == "DATE":
            bad = self.first(f"{c} IS NULL", c)
            if bad is not None:
                raise HybridInputError(f"{self.where(bad[0], label)}: timestamp is empty (NaT)")
            return f"CAST(floor({self.epoch(self.to_timestamp(c))}) AS BIGINT)"
        if kind != self.TEXT:
            bad = self.first(f"{c} IS NULL OR isnan(CAST({c} AS DOUBLE))", c)
            if bad is not None:
                raise HybridInputError(f"{self.where(bad[0], label)}: timestamp is empty/NaN")
            bad = self.first(f"abs(CAST({c} AS DOUBLE)) > {MAX_TIMESTAMP!r}", f"CAST({c} AS DOUBLE)")
            if bad is not None:  # inf, 1e30: no int64 second
                raise HybridInputError(f"{self.where(bad[0], label)}: {float(bad[1])!r} {TIMESTAMP_RANGE_PROBLEM}")
            return f"CAST(floor(CAST({c} AS DOUBLE)) AS BIGINT)"
        blank = self.first(f"{c} IS NULL OR trim({c}) = ''", c)
        if blank is not None:
            raise HybridInputError(f"{self.where(blank[0], label)}: timestamp is empty")
        first = self.first("true", c)
        first_raw = first[1] if first else ""
        if self.parses_as_double(first_raw):
            numeric = self.to_double(c)
            bad = self.first(f"{numeric} IS NULL OR isnan({numeric}) OR {self.is_infinite(numeric)}", c)
            if bad is not None:  # "nan" and "inf" parse as doubles, but are no point in time
                raise HybridInputError(f"{self.where(bad[0], label)}: cannot parse {bad[1]!r} as a timestamp "
                                       f"(expected unix seconds, like {first_raw!r} in the first row)")
            bad = self.first(f"abs({numeric}) > {MAX_TIMESTAMP!r}", c)
            if bad is not None:
                raise HybridInputError(f"{self.where(bad[0], label)}: {bad[1]!r} {TIMESTAMP_RANGE_PROBLEM}")
            return f"CAST(floor({numeric}) AS BIGINT)"
        parsed = self.to_timestamp(c)
        bad = self.first(f"{parsed} IS NULL", c)
        if bad is not None:
            raise HybridInputError(f"{self.where(bad[0], label)}: cannot parse {bad[1]!r} as a timestamp "
                                   f"(expected a date-time like {first_raw!r} in the first row, or unix seconds)")
        return f"CAST(floor({self.epoch(parsed)}) AS BIGINT)"

    def convert(self, column: str, canonical: str, label: str) -> str:
        """The checked conversion of ``column`` into canonical column ``canonical`` (``label`` names it)."""
        kind = _CANONICAL_KIND[canonical]
        if kind == "key":
            return self.key(column, label)
        if kind == "timestamp":
            return self.timestamp(column, label)
        if kind == "float":
            return self.number(column, label)
        return f"CAST({self.q(column)} AS {self.TEXT})"
