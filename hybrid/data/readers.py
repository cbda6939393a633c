"""Readers that turn dataset files into the canonical :class:`~hybrid.data.schema.RawDataset`.

Supported sources:

* MovieLens 100K (``u.data``/``u.item``/``u.user``/``u.genre``) and 1M (``ratings*.dat``/``movies.dat``/
  ``users.dat``), both Latin-1 encoded — :func:`read_movielens`;
* RecBole atomic files (``<name>.inter``/``.item``/``.user``) — :func:`read_recbole`;
* Tianchi Taobao ``UserBehavior.csv`` — :func:`read_taobao`;
* a generic CSV/TSV/parquet events table with configurable column names — :func:`read_events_table`;
* a "one line per user" sequence file (RecBole / S3-Rec style: ``user item item ...``, optionally
  ``user item:ts item:ts ...``) — :func:`read_sequences`.

:func:`read_dataset` dispatches on a dataset name. Every reader raises :class:`~hybrid.core.errors.HybridInputError`
with one message naming the file and, where it applies, the 1-based file line number and the column.

Parsing is pandas' (``pd.read_csv`` with ``dtype``); this module only checks the result. Clean files take a
typed fast path; when a value does not fit its dtype the file is re-read as text to say exactly where.

Example:
    >>> ds = read_dataset("ml-100k", "/data/ml-100k")   # doctest: +SKIP
    >>> ds.events.columns.tolist()                     # doctest: +SKIP
    ['user_id', 'item_id', 'timestamp', 'rating']
"""
from __future__ import annotations

import csv
import inspect
import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hybrid.core.errors import HybridInputError
from hybrid.data.schema import (
    EVENT_COLUMNS,
    ITEM_COLUMNS,
    OPTIONAL_EVENT_COLUMNS,
    USER_COLUMNS,
    RawDataset,
    RowOrigin,
)

__all__ = [
    "read_dataset",
    "read_events_table",
    "read_movielens",
    "read_sequences",
    "PositionalTimeWarning",
    "read_recbole",
    "read_taobao",
    "movielens_kind",
    "DATASET_READERS",
]

PathLike = str | Path

# Column kinds. "key": text that must be non-empty (ids, behaviour); "text": free text, empty -> "";
# "timestamp": unix seconds or date-time -> int64; "float": number, never NaN; "int": integer, never NaN.
_FAST_DTYPE = {"key": str, "text": str, "timestamp": "int64", "float": "float64", "int": "int64"}

#: the name of the column one past a delimited file's last (see :func:`_read_delimited`)
_EXTRA_FIELD = "\x00extra field"
_YEAR_IN_TITLE = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$")
_FOUR_DIGITS = re.compile(r"^\d{4}$")
UNKNOWN_YEAR = "unknown"


# --------------------------------------------------------------------------------------------- positions


@dataclass(frozen=True)
class _Where:
    """Names a row of one input file in messages.

    Args:
        path: the file, as shown to the user.
        first_line: the file line number of data row 0 (1 without a header row, 2 with one).
        unit: ``"line"`` for text files, ``"row"`` for parquet (no lines there).
    """

    path: str
    first_line: int = 1
    unit: str = "line"

    def at(self, index: int, label: str) -> str:
        """``"<file>, line 7, column 'timestamp'"`` for data row ``index``."""
        return f"{self.path}, {self.unit} {int(index) + self.first_line}, column {label}"


def _first(mask: pd.Series) -> int | None:
    """Index label of the first True in ``mask``, or None. The index holds data-row positions."""
    values = mask.to_numpy(dtype=bool)
    if not values.any():
        return None
    return mask.index[int(values.argmax())]


def _is_blank(s: pd.Series) -> pd.Series:
    """True where a text cell is missing or only whitespace."""
    return s.isna() | (s.astype(str).str.strip() == "")


# --------------------------------------------------------------------------------------------- conversions


def _to_text(s: pd.Series) -> pd.Series:
    """Any column -> Python ``str`` values (dtype object, per the schema); integral floats lose the ``.0``.

    Args:
        s: a column as pandas read it (text, int, float, ...). NaN must already be handled by the caller.

    Example: ``_to_text(pd.Series([1.0, 2.0]))`` -> ``["1", "2"]`` (parquet stores nullable int ids as float).
    """
    if pd.api.types.is_float_dtype(s.dtype):
        finite = s.notna()
        if (s[finite] % 1 == 0).all():
            out = pd.Series("", index=s.index, dtype=object)
            out[finite] = s[finite].astype("int64").astype(str)
            return out
    return s.astype(str).astype(object)


def _parse_key(s: pd.Series, where: _Where, label: str) -> pd.Series:
    """Required text (an id): every row non-empty; returned as ``str`` (``1`` -> ``"1"``, never ``"1.0"``)."""
    bad = _first(_is_blank(s))
    if bad is not None:
        raise HybridInputError(f"{where.at(bad, label)}: empty value; every row needs one")
    return _to_text(s)


def _parse_text(s: pd.Series, fill: str = "") -> pd.Series:
    """Optional text: missing -> ``fill``."""
    return _to_text(s).where(s.notna(), fill)


def _parse_number(s: pd.Series, where: _Where, label: str) -> pd.Series:
    """Number column -> float64, rejecting NaN/empty cells and text that is not a number."""
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        numbers = s.astype("float64")
    else:
        numbers = pd.to_numeric(s, errors="coerce")
    bad = _first(~np.isfinite(numbers))
    if bad is None:
        return numbers.astype("float64")
    raw = s[bad]
    if pd.isna(raw) or str(raw).strip().lower() in ("", "nan"):
        raise HybridInputError(f"{where.at(bad, label)}: value is empty/NaN; every row needs a number")
    if pd.notna(numbers[bad]):  # +-inf, or text such as "inf" / "-Infinity"
        raise HybridInputError(f"{where.at(bad, label)}: {str(raw)!r} is not a finite number")
    raise HybridInputError(f"{where.at(bad, label)}: cannot parse {raw!r} as a number")


def _parse_int(s: pd.Series, where: _Where, label: str) -> pd.Series:
    """Integer column -> int64 (genre flags)."""
    numbers = _parse_number(s, where, label)
    bad = _first(numbers % 1 != 0)
    if bad is not None:
        raise HybridInputError(f"{where.at(bad, label)}: expected an integer, got {s[bad]!r}")
    return numbers.astype("int64")


def _parse_timestamp(s: pd.Series, where: _Where, label: str) -> pd.Series:
    """Timestamp column -> int64 unix seconds.

    Numbers are taken as unix seconds (fractions floored). Text that is not a number is parsed as a date-time
    (format inferred from the first row; naive times are taken as UTC). The first row decides which of the
    two the column holds, so a stray ``"abc"`` among numbers is reported at its own line.

    Example: ``"1998-04-22 23:10:38"`` -> ``893286638``; ``"893286638"`` -> ``893286638``.
    """
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        times = s if getattr(s.dtype, "tz", None) is not None else s.dt.tz_localize("UTC")
        bad = _first(times.isna())
        if bad is not None:
            raise HybridInputError(f"{where.at(bad, label)}: timestamp is empty (NaT)")
        return ((times - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).astype("int64")
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        bad = _first(s.isna())
        if bad is not None:
            raise HybridInputError(f"{where.at(bad, label)}: timestamp is empty/NaN")
        if not pd.api.types.is_float_dtype(s.dtype):
            return s.astype("int64")
        bad = _first(~_fits_seconds(s))
        if bad is not None:
            raise HybridInputError(f"{where.at(bad, label)}: {float(s[bad])!r} {TIMESTAMP_RANGE_PROBLEM}")
        return np.floor(s).astype("int64")

    blank = _first(_is_blank(s))
    if blank is not None:
        raise HybridInputError(f"{where.at(blank, label)}: timestamp is empty")
    numbers = pd.to_numeric(s, errors="coerce")
    first_raw = s.iloc[0] if len(s) else ""
    if len(s) == 0 or not pd.isna(numbers.iloc[0]):
        bad = _first(numbers.isna() | np.isinf(numbers))  # "nan", "inf": not a point in time
        if bad is not None:
            raise HybridInputError(
                f"{where.at(bad, label)}: cannot parse {s[bad]!r} as a timestamp "
                f"(expected unix seconds, like {first_raw!r} in the first row)"
            )
        bad = _first(~_fits_seconds(numbers))
        if bad is not None:
            raise HybridInputError(f"{where.at(bad, label)}: {s[bad]!r} {TIMESTAMP_RANGE_PROBLEM}")
        return np.floor(numbers).astype("int64")
    with warnings.catch_warnings():
        # "Could not infer format": pandas then parses element by element, which is what we want here.
        warnings.simplefilter("ignore", UserWarning)
        times = pd.to_datetime(s, errors="coerce", utc=True)
        if times.isna().any():
            # The format is inferred from the first row; ISO 8601 variants (date only, with offset) may mix.
            iso = pd.to_datetime(s, errors="coerce", utc=True, format="ISO8601")
            times = iso if not iso.isna().any() else times
    bad = _first(times.isna())
    if bad is not None:
        raise HybridInputError(
            f"{where.at(bad, label)}: cannot parse {s[bad]!r} as a timestamp "
            f"(expected a date-time like {first_raw!r} in the first row, or unix seconds)"
        )
    return ((times - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).astype("int64")


#: the largest magnitude of a numeric timestamp: unix seconds are stored as int64
MAX_TIMESTAMP = 1e18
TIMESTAMP_RANGE_PROBLEM = "is out of range for a timestamp (unix seconds, at most 1e18 in magnitude)"


def _fits_seconds(numbers: pd.Series) -> pd.Series:
    """True where a finite number of seconds fits the int64 timestamps (``inf`` and ``1e30`` do not)."""
    return numbers.abs() <= MAX_TIMESTAMP


def _convert(s: pd.Series, kind: str, where: _Where, label: str) -> pd.Series:
    """Check and convert one column according to its kind (see ``_FAST_DTYPE``)."""
    if kind == "key":
        return _parse_key(s, where, label)
    if kind == "text":
        return _parse_text(s)
    if kind == "timestamp":
        return _parse_timestamp(s, where, label)
    if kind == "float":
        return _parse_number(s, where, label)
    if kind == "int":
        return _parse_int(s, where, label)
    raise AssertionError(f"unknown column kind {kind!r}")


def _label(file_column: str, canonical: str) -> str:
    """``'ts' (timestamp)`` when the file's name differs from the canonical one, else ``'timestamp'``."""
    return repr(file_column) if file_column == canonical else f"{file_column!r} ({canonical})"


# --------------------------------------------------------------------------------------------- files


def _require_file(path: Path, what: str) -> Path:
    """Raise a HybridInputError naming ``path`` unless it is an existing file."""
    if not path.is_file():
        state = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise HybridInputError(f"{what} {path} {state}")
    return path


def _require_dir(path: PathLike, what: str) -> Path:
    """Raise a HybridInputError naming ``path`` unless it is an existing directory."""
    path = Path(path)
    if not path.is_dir():
        state = "is a file, not a directory" if path.is_file() else "does not exist"
        raise HybridInputError(f"{what} {path} {state}")
    return path


_FIELD_COUNT = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")


def field_count_problem(path: Path | str, line: int, found: int | str, expected: int) -> str:
    """The one message of a row with more (or fewer) fields than the file's header or format."""
    return f"{path}: malformed file: line {line} has {found} fields, expected {expected}"


def _pandas_read_csv(source, path: Path, fields: int | None = None, **kwargs) -> pd.DataFrame:
    """``pd.read_csv`` with malformed-file errors (wrong field count, ...) turned into HybridInputError.

    ``fields``: the number of fields a row should have, when ``kwargs`` name one more column (the sentinel of
    :func:`_read_delimited`) — pandas' count then includes that column."""
    try:
        with warnings.catch_warnings():
            # index_col=False: a first row with too many fields would be cut with only this warning
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(source, **kwargs)
    except pd.errors.ParserWarning as exc:
        raise HybridInputError(f"{path}: malformed file: the first data row has more than "
                               f"{fields if fields is not None else 'the expected'} fields") from exc
    except pd.errors.ParserError as exc:
        # pandas' message already gives the line: "Expected 4 fields in line 7, saw 5".
        detail = str(exc).strip().removeprefix("Error tokenizing data. C error: ")
        counted = _FIELD_COUNT.search(detail)
        if counted is not None and fields is not None:
            raise HybridInputError(field_count_problem(path, int(counted[2]), int(counted[3]), fields)) from exc
        raise HybridInputError(f"{path}: malformed file: {detail}") from exc
    except pd.errors.EmptyDataError as exc:
        raise HybridInputError(f"{path}: file is empty") from exc


def _read_delimited(
    path: Path,
    kinds: dict[str, str],
    *,
    sep: str,
    names: list[str] | None = None,
    labels: dict[str, str] | None = None,
    encoding: str = "latin-1",
    quoting: int = csv.QUOTE_NONE,
    data: bytes | None = None,
    nrows: int | None = None,
) -> pd.DataFrame:
    """Read a delimited text file and check/convert the columns in ``kinds``.

    Args:
        path: the file (also used in messages).
        kinds: file column -> kind (``key``/``text``/``timestamp``/``float``/``int``); the result has these
            columns in this order.
        sep: field separator.
        names: all column names for a file without a header row; None when the first line is the header
            (then only the ``kinds`` columns are read and must exist — the caller checks the header).
        labels: file column -> how to name it in messages (default: the quoted name).
        encoding: text encoding (MovieLens is Latin-1).
        quoting: csv quoting; MovieLens titles contain bare ``"``, so QUOTE_NONE by default.
        data: the file's bytes, already transformed (``::`` -> tab for MovieLens 1M); default: read ``path``.
        nrows: read at most this many data rows.

    Example:
        >>> _read_delimited(Path("u.data"), {"u": "key", "i": "key", "r": "float", "t": "timestamp"},
        ...                 sep="\\t", names=["u", "i", "r", "t"])  # doctest: +SKIP
    """
    labels = labels or {}

    def source():
        return io.BytesIO(data) if data is not None else path

    header = None
    if not names:
        header = [str(c) for c in _pandas_read_csv(source(), path, sep=sep, nrows=0, encoding=encoding,
                                                   quoting=quoting).columns]
    columns = list(names or header)
    common = dict(
        sep=sep,
        header=None,
        skiprows=None if names else 1,
        # Every column and one more (the sentinel): a row with one field too many fills it, one with more
        # is pandas' ParserError — rows with extra fields are refused, never cut to the expected ones (which
        # usecols does silently) nor taken as an index column (what pandas does when the first row is longer).
        names=[*columns, _EXTRA_FIELD],
        index_col=False,
        encoding=encoding,
        quoting=quoting,
        keep_default_na=False,  # an id or title "NA"/"null" is a value, not a missing one
        na_values=[""],
        skip_blank_lines=False,  # keeps data-row index == file line - first_line, for messages
        nrows=nrows,
    )

    fast_dtypes = {c: str for c in (*columns, _EXTRA_FIELD)} | {c: _FAST_DTYPE[k] for c, k in kinds.items()}
    try:
        with warnings.catch_warnings():  # "inf" / "1e30" in an int64 column: a cast warning, then garbage
            warnings.simplefilter("error", RuntimeWarning)
            frame = _pandas_read_csv(source(), path, len(columns), dtype=fast_dtypes, **common)
    except HybridInputError:
        raise
    except (ValueError, OverflowError, RuntimeWarning):
        # Some value does not fit its dtype (NaN in an int column, "abc" as a timestamp, ...): re-read as
        # text so that the checks below can name the line and the value. Not UnicodeDecodeError: callers
        # decide about encodings.
        frame = _pandas_read_csv(source(), path, len(columns), dtype=str, **common)
    first_line = 1 if names else 2
    extra = _first(frame[_EXTRA_FIELD].notna())
    if extra is not None:
        raise HybridInputError(field_count_problem(path, int(extra) + first_line, len(columns) + 1, len(columns)))
    frame = frame[list(kinds)]
    frame = frame.dropna(how="all")  # blank lines; the index still counts them, so line numbers stay right
    where = _Where(str(path), first_line=first_line)
    out = {col: _convert(frame[col], kind, where, labels.get(col, repr(col))) for col, kind in kinds.items()}
    return pd.DataFrame(out).reset_index(drop=True)


def _object_text(frame: pd.DataFrame) -> pd.DataFrame:
    """Text columns as dtype object holding ``str``, as the schema says (pandas 3 would infer ``str``)."""
    return frame.astype({c: object for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c].dtype)})


def _check_unique(frame: pd.DataFrame, column: str, path: Path | str) -> None:
    """Side tables are keyed by id: a repeated id would make the join ambiguous."""
    dup = frame[column].duplicated()
    if dup.any():
        value = frame.loc[dup.to_numpy().argmax(), column]
        raise HybridInputError(f"{path}: duplicate {column} {value!r}; each {column} must appear once")


def _split_title_year(titles: pd.Series) -> tuple[pd.Series, pd.Series]:
    """``"Toy Story (1995)"`` -> (``"Toy Story"``, ``"1995"``); no trailing year -> (title, ``"unknown"``).

    The year is removed from the title so that MovieLens files and RecBole's (which store them apart) give
    the same items table.
    """
    parts = titles.str.extract(_YEAR_IN_TITLE)
    has_year = parts["year"].notna()
    title = parts["title"].where(has_year, titles.str.strip()).astype(object)
    year = parts["year"].where(has_year, UNKNOWN_YEAR).astype(object)
    return title, year


def _normalise_year(years: pd.Series) -> pd.Series:
    """Anything that is not four digits (RecBole ships ``"unkonwn"``) -> ``"unknown"``."""
    years = years.astype(str).str.strip()
    return years.where(years.str.match(_FOUR_DIGITS), UNKNOWN_YEAR).astype(object)


# --------------------------------------------------------------------------------------------- MovieLens


def read_movielens(path: PathLike) -> RawDataset:
    """Read MovieLens 100K or 1M from a directory, detecting which from the files present.

    * ML-100K: ``u.data`` (``user\\titem\\trating\\tts``), ``u.item`` (``id|title|release date|video release
      date|IMDb URL|<genre flags>``, flag order from ``u.genre``) and ``u.user`` (``id|age|gender|occupation
      |zip``); ``u.item``/``u.user`` are optional.
    * ML-1M: ``ratings.dat``, or else every ``ratings*.dat`` (e.g. ``ratings_users_0001-2999.dat``, read in
      name order), ``movies.dat`` (``MovieID::Title::Genres``) and ``users.dat``
      (``UserID::Gender::Age::Occupation::Zip-code``); movies/users optional.
    * RecBole atomic files ``ml-100k.inter`` / ``ml-1m.inter`` (+ ``.item``/``.user``), see
      :func:`read_recbole`.

    Titles lose their trailing ``(1995)``, which goes to ``year``.

    Args:
        path: the dataset directory.

    Returns:
        RawDataset named ``movielens-100k`` or ``movielens-1m``.

    Example:
        >>> ds = read_movielens("../shared/data/ml-100k")  # doctest: +SKIP
        >>> len(ds.events), ds.items.loc[0, "title"], ds.items.loc[0, "year"]  # doctest: +SKIP
        (100000, 'Toy Story', '1995')
    """
    directory = _require_dir(path, "MovieLens directory")
    if (directory / "u.data").exists():
        return _read_ml100k(directory)
    if (directory / "ratings.dat").exists() or any(directory.glob("ratings*.dat")):
        return _read_ml1m(directory)
    for atomic, name in (("ml-100k", "movielens-100k"), ("ml-1m", "movielens-1m")):
        if (directory / f"{atomic}.inter").exists():
            dataset = read_recbole(directory, atomic)
            dataset.name = name
            return dataset
    raise HybridInputError(
        f"{directory}: no MovieLens ratings found; expected u.data (ML-100K), ratings.dat or ratings*.dat "
        f"(ML-1M), or RecBole ml-100k.inter / ml-1m.inter"
    )


def movielens_kind(path: PathLike) -> str:
    """Which MovieLens a directory holds, without reading it: ``movielens-100k`` or ``movielens-1m``.

    Args:
        path: a directory accepted by :func:`read_movielens`.

    Example:
        >>> movielens_kind("../shared/data/ml-1m-partial")  # doctest: +SKIP
        'movielens-1m'
    """
    directory = _require_dir(path, "MovieLens directory")
    if (directory / "u.data").exists() or (directory / "ml-100k.inter").exists():
        return "movielens-100k"
    if (
        (directory / "ratings.dat").exists()
        or any(directory.glob("ratings*.dat"))
        or (directory / "ml-1m.inter").exists()
    ):
        return "movielens-1m"
    raise HybridInputError(f"{directory}: no MovieLens ratings found (u.data, ratings*.dat, ml-100k.inter)")


_RATING_KINDS = {"user_id": "key", "item_id": "key", "rating": "float", "timestamp": "timestamp"}


def _read_ml100k(directory: Path) -> RawDataset:
    """ML-100K from its original files (see :func:`read_movielens`)."""
    ratings_path = _require_file(directory / "u.data", "MovieLens ratings file")
    names = ["user_id", "item_id", "rating", "timestamp"]
    events = _read_delimited(ratings_path, _RATING_KINDS, sep="\t", names=names)
    events = events[["user_id", "item_id", "timestamp", "rating"]]

    items = None
    if (directory / "u.item").exists():
        genres = _read_ml100k_genres(_require_file(directory / "u.genre", "MovieLens genre list (for u.item)"))
        items = _read_ml100k_items(directory / "u.item", genres)

    users = None
    if (directory / "u.user").exists():
        user_names = ["user_id", "age", "gender", "occupation", "zip"]
        kinds = {"user_id": "key", "gender": "text", "age": "text", "occupation": "text", "zip": "text"}
        users = _read_delimited(directory / "u.user", kinds, sep="|", names=user_names)
        _check_unique(users, "user_id", directory / "u.user")
    return RawDataset("movielens-100k", events, items, users, source=str(directory), origin=RowOrigin(str(ratings_path)))


def _read_ml100k_genres(path: Path) -> list[str]:
    """``u.genre`` (``name|index``) -> genre names in flag order."""
    table = _read_delimited(path, {"name": "key", "index": "int"}, sep="|", names=["name", "index"])
    return table.sort_values("index")["name"].tolist()


def _read_ml100k_items(path: Path, genres: list[str]) -> pd.DataFrame:
    """``u.item`` -> items; the 0/1 genre flags become ``Action|Comedy`` in ``u.genre`` order."""
    flag_columns = [f"genre:{g}" for g in genres]  # prefixed: a genre could be called "title"
    names = ["item_id", "title", "release_date", "video_release_date", "imdb_url", *flag_columns]
    kinds = {"item_id": "key", "title": "text"} | {c: "int" for c in flag_columns}
    labels = {c: f"{c!r} (genre flag {i + 1} of {len(genres)})" for i, c in enumerate(flag_columns)}
    table = _read_delimited(path, kinds, sep="|", names=names, labels=labels)
    flags = table[flag_columns].to_numpy() != 0
    genre_names = np.array(genres, dtype=object)
    genre_text = ["|".join(genre_names[row]) for row in flags]
    title, year = _split_title_year(table["title"])
    items = pd.DataFrame(
        {"item_id": table["item_id"], "title": title, "genres": pd.Series(genre_text, dtype=object), "year": year}
    )
    _check_unique(items, "item_id", path)
    return items


def _read_double_colon(path: Path, names: list[str], kinds: dict[str, str]) -> pd.DataFrame:
    """A ML-1M ``::``-separated file. ``::`` becomes a tab so pandas' fast C parser can read it."""
    data = path.read_bytes().replace(b"::", b"\t")
    return _read_delimited(path, kinds, sep="\t", names=names, data=data)


def _read_ml1m(directory: Path) -> RawDataset:
    """ML-1M from its original files (see :func:`read_movielens`)."""
    # ratings.dat wins: ratings*.dat next to it are likely slices of it and would double the events.
    ratings_files = (
        [directory / "ratings.dat"] if (directory / "ratings.dat").exists() else sorted(directory.glob("ratings*.dat"))
    )
    names = ["user_id", "item_id", "rating", "timestamp"]
    parts = [_read_double_colon(p, names, _RATING_KINDS) for p in ratings_files]
    events = pd.concat(parts, ignore_index=True)[["user_id", "item_id", "timestamp", "rating"]]

    items = None
    if (directory / "movies.dat").exists():
        table = _read_double_colon(
            directory / "movies.dat",
            ["item_id", "title", "genres"],
            {"item_id": "key", "title": "text", "genres": "text"},
        )
        title, year = _split_title_year(table["title"])
        items = pd.DataFrame({"item_id": table["item_id"], "title": title, "genres": table["genres"], "year": year})
        _check_unique(items, "item_id", directory / "movies.dat")

    users = None
    if (directory / "users.dat").exists():
        user_names = ["user_id", "gender", "age", "occupation", "zip"]
        kinds = {"user_id": "key", "gender": "text", "age": "text", "occupation": "text", "zip": "text"}
        users = _read_double_colon(directory / "users.dat", user_names, kinds)
        _check_unique(users, "user_id", directory / "users.dat")
    origin = RowOrigin(str(ratings_files[0])) if len(ratings_files) == 1 else None
    return RawDataset("movielens-1m", events, items, users, source=str(directory), origin=origin)


# --------------------------------------------------------------------------------------------- RecBole

# RecBole field name (``name`` of ``name:type``) -> canonical column. Other fields are left out.
_RECBOLE_EVENT_FIELDS = {
    "user_id": "user_id",
    "item_id": "item_id",
    "timestamp": "timestamp",
    "rating": "rating",
    "behavior": "behavior",
    "behavior_type": "behavior",
}
_RECBOLE_ITEM_FIELDS = {
    "item_id": "item_id",
    "movie_title": "title",
    "title": "title",
    "release_year": "year",
    "year": "year",
    "class": "genres",
    "genre": "genres",
    "genres": "genres",
    "categories": "genres",
}
_RECBOLE_USER_FIELDS = {
    "user_id": "user_id",
    "age": "age",
    "gender": "gender",
    "occupation": "occupation",
    "zip_code": "zip",
    "zip": "zip",
}
_CANONICAL_KIND = {
    "user_id": "key",
    "item_id": "key",
    "timestamp": "timestamp",
    "rating": "float",
    "behavior": "key",
    "title": "text",
    "genres": "text",
    "year": "text",
    "gender": "text",
    "age": "text",
    "occupation": "text",
    "zip": "text",
}


def read_recbole(path: PathLike, name: str | None = None) -> RawDataset:
    """Read RecBole atomic files ``<name>.inter`` (+ optional ``<name>.item``, ``<name>.user``).

    Headers are ``field:type`` (``user_id:token``, ``rating:float``, ``class:token_seq``); the type suffix is
    dropped and known fields are mapped to canonical columns (``movie_title`` -> ``title``, ``release_year``
    -> ``year``, ``class``/``genre`` -> ``genres`` with spaces turned into ``|``, ``zip_code`` -> ``zip``).
    Other fields are left out. Files are read as UTF-8 (RecBole's encoding), Latin-1 if that fails.

    Args:
        path: the directory holding the atomic files, or the ``.inter`` file itself.
        name: the atomic name (``ml-100k``); default: the one ``*.inter`` file in the directory.

    Returns:
        RawDataset named ``name``.

    Example:
        >>> ds = read_recbole("out/ml-100k")  # doctest: +SKIP
        >>> ds.items.loc[0, ["title", "year", "genres"]].tolist()  # doctest: +SKIP
        ['Toy Story', '1995', "Animation|Children's|Comedy"]
    """
    path = Path(path)
    if path.suffix == ".inter" and path.is_file():
        directory, name = path.parent, name or path.stem
    else:
        directory = _require_dir(path, "RecBole dataset directory")
    if name is None:
        inters = sorted(directory.glob("*.inter"))
        if len(inters) != 1:
            found = ", ".join(p.name for p in inters) or "none"
            raise HybridInputError(
                f"{directory}: expected exactly one RecBole *.inter file (found: {found}); pass the dataset name"
            )
        name = inters[0].stem

    inter_path = _require_file(directory / f"{name}.inter", "RecBole interaction file")
    events = _read_atomic(inter_path, _RECBOLE_EVENT_FIELDS, required=EVENT_COLUMNS)
    events = events[[c for c in (*EVENT_COLUMNS, *OPTIONAL_EVENT_COLUMNS) if c in events.columns]]

    items = None
    item_path = directory / f"{name}.item"
    if item_path.exists():
        table = _read_atomic(item_path, _RECBOLE_ITEM_FIELDS, required=("item_id",))
        items = _complete_items(table, item_path, seq_genres=True)

    users = None
    user_path = directory / f"{name}.user"
    if user_path.exists():
        table = _read_atomic(user_path, _RECBOLE_USER_FIELDS, required=("user_id",))
        users = _complete_users(table, user_path)
    return RawDataset(name, events, items, users, source=str(directory), origin=RowOrigin(str(inter_path), 2))


def _read_atomic(path: Path, fields: dict[str, str], required: tuple[str, ...]) -> pd.DataFrame:
    """One RecBole atomic file -> a frame with canonical column names (only the mapped fields)."""
    try:
        return _read_atomic_encoded(path, fields, required, "utf-8")
    except UnicodeDecodeError:
        return _read_atomic_encoded(path, fields, required, "latin-1")


def _read_atomic_encoded(path: Path, fields: dict[str, str], required: tuple[str, ...], encoding: str) -> pd.DataFrame:
    """:func:`_read_atomic` with a given encoding."""
    header = _pandas_read_csv(path, path, sep="\t", nrows=0, encoding=encoding, quoting=csv.QUOTE_NONE).columns
    selected: dict[str, str] = {}  # file column -> canonical
    for column in header:
        canonical = fields.get(str(column).split(":", 1)[0].strip())
        if canonical is not None and canonical not in selected.values():
            selected[column] = canonical
    missing = [c for c in required if c not in selected.values()]
    if missing:
        raise HybridInputError(
            f"{path}: missing required column {missing[0]!r} (header fields: {', '.join(map(str, header))})"
        )
    kinds = {column: _CANONICAL_KIND[canonical] for column, canonical in selected.items()}
    labels = {column: _label(column, canonical) for column, canonical in selected.items()}
    frame = _read_delimited(path, kinds, sep="\t", labels=labels, encoding=encoding)
    return frame.rename(columns=selected)


def _complete_items(table: pd.DataFrame, path: Path | str, seq_genres: bool = False) -> pd.DataFrame:
    """Fill the canonical item columns a source lacks; ``seq_genres``: genres are space-separated tokens."""
    n = len(table)
    title = table["title"] if "title" in table else pd.Series([""] * n, dtype=object)
    genres = table["genres"] if "genres" in table else pd.Series([""] * n, dtype=object)
    if seq_genres:
        genres = genres.str.split().str.join("|").astype(object)
    if "year" in table:
        year = _normalise_year(table["year"])
    else:
        title, year = _split_title_year(title)
    items = pd.DataFrame(
        {"item_id": table["item_id"], "title": title.to_numpy(), "genres": genres.to_numpy(), "year": year.to_numpy()}
    )
    _check_unique(items, "item_id", path)
    return _object_text(items[list(ITEM_COLUMNS)])


def _complete_users(table: pd.DataFrame, path: Path | str) -> pd.DataFrame:
    """Fill the canonical user columns a source lacks with ``""``."""
    users = table.copy()
    for column in USER_COLUMNS:
        if column not in users:
            users[column] = pd.Series([""] * len(users), dtype=object, index=users.index)
    _check_unique(users, "user_id", path)
    return _object_text(users[list(USER_COLUMNS)])


# --------------------------------------------------------------------------------------------- Taobao

TAOBAO_COLUMNS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")


def read_taobao(path: PathLike, nrows: int | None = None) -> RawDataset:
    """Read Tianchi Taobao ``UserBehavior.csv`` (no header: user, item, category, behaviour, timestamp).

    Events keep the behaviour (``pv``/``cart``/``fav``/``buy``) in ``behavior``; the items table is built from
    (item, category): ``genres`` = the category id, ``title`` = ``""``, ``year`` = ``"unknown"`` (an item seen
    with several categories keeps the first). There is no users table.

    Args:
        path: ``UserBehavior.csv``, or a directory holding it.
        nrows: read only the first ``nrows`` rows (the full file has ~100M).

    Example:
        >>> ds = read_taobao("UserBehavior.csv", nrows=1_000_000)  # doctest: +SKIP
        >>> ds.events.columns.tolist()  # doctest: +SKIP
        ['user_id', 'item_id', 'timestamp', 'behavior']
    """
    path = Path(path)
    if path.is_dir():
        path = path / "UserBehavior.csv"
    _require_file(path, "Taobao behaviour file")
    kinds = {c: "key" for c in TAOBAO_COLUMNS} | {"timestamp": "timestamp"}
    table = _read_delimited(path, kinds, sep=",", names=list(TAOBAO_COLUMNS), encoding="utf-8", nrows=nrows)
    events = pd.DataFrame(
        {
            "user_id": table["user_id"],
            "item_id": table["item_id"],
            "timestamp": table["timestamp"],
            "behavior": table["behavior_type"],
        }
    )
    first = table.drop_duplicates("item_id")
    items = pd.DataFrame(
        {
            "item_id": first["item_id"].to_numpy(),
            "title": "",
            "genres": first["category_id"].to_numpy(),
            "year": UNKNOWN_YEAR,
        }
    )
    return RawDataset("taobao", _object_text(events), _object_text(items), None, source=str(path),
                      origin=RowOrigin(str(path)))


# --------------------------------------------------------------------------------------------- generic

_TEXT_SEPARATORS = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".txt": "\t"}
_PARQUET_SUFFIXES = (".parquet", ".pq")
_ALL_CANONICAL = tuple(dict.fromkeys((*EVENT_COLUMNS, *OPTIONAL_EVENT_COLUMNS, *ITEM_COLUMNS, *USER_COLUMNS)))


def _table_format(path: Path) -> str:
    """``"parquet"`` or the text separator, from the suffix (``.csv.gz`` counts as ``.csv``)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst", ".zip"):
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""
    if suffix in _PARQUET_SUFFIXES:
        return "parquet"
    if suffix in _TEXT_SEPARATORS:
        return _TEXT_SEPARATORS[suffix]
    raise HybridInputError(
        f"{path}: unsupported file type {suffix or '(no suffix)'!r}; expected .csv, .tsv or .parquet"
    )


def _read_table(
    path: Path,
    columns: dict[str, str],
    required: tuple[str, ...],
    optional: tuple[str, ...],
    explicit: set[str],
    nrows: int | None = None,
) -> pd.DataFrame:
    """A CSV/TSV/parquet table -> frame with canonical columns (``nrows``: only the first data rows).

    Args:
        path: the file.
        columns: canonical -> file column (identity for names not given).
        required: canonical columns that must be present.
        optional: canonical columns taken when present; those in ``explicit`` (named by the user) must be.
        explicit: canonical names the user mapped.
    """
    fmt = _table_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq  # only parquet needs it

        try:
            header = list(pq.read_schema(path).names)
        except Exception as exc:  # pyarrow raises several types for a non-parquet file
            raise HybridInputError(f"{path}: not a readable parquet file ({exc})") from exc
    else:
        header = list(_pandas_read_csv(path, path, sep=fmt, nrows=0).columns)

    wanted = [*required, *(c for c in optional if columns.get(c, c) in header or c in explicit)]
    for canonical in wanted:
        if columns.get(canonical, canonical) not in header:
            raise HybridInputError(
                f"{path}: missing required column {_label(columns.get(canonical, canonical), canonical)}; "
                f"columns present: {', '.join(map(str, header))}"
            )
    selected = {columns.get(c, c): c for c in wanted}  # file column -> canonical
    labels = {f: _label(f, c) for f, c in selected.items()}
    kinds = {f: _CANONICAL_KIND[c] for f, c in selected.items()}
    if fmt == "parquet":
        frame = _read_parquet(path, list(selected), nrows)
        where = _Where(str(path), first_line=1, unit="row")
        frame = pd.DataFrame({f: _convert(frame[f], kinds[f], where, labels[f]) for f in selected})
    else:
        try:
            frame = _read_delimited(
                path, kinds, sep=fmt, labels=labels, encoding="utf-8", quoting=csv.QUOTE_MINIMAL, nrows=nrows
            )
        except UnicodeDecodeError as exc:
            raise HybridInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return frame.rename(columns=selected)


def _read_parquet(path: Path, columns: list[str], nrows: int | None) -> pd.DataFrame:
    """A parquet file's ``columns``; with ``nrows``, only its first rows (read a batch at a time, not all)."""
    if nrows is None:
        return pd.read_parquet(path, columns=columns)
    import pyarrow as pa
    import pyarrow.parquet as pq

    batches, kept = [], 0
    handle = pq.ParquetFile(path)
    for batch in handle.iter_batches(batch_size=min(nrows, 65536), columns=columns):
        batches.append(batch.slice(0, nrows - kept))
        kept += batches[-1].num_rows
        if kept >= nrows:
            break
    schema = pa.schema([handle.schema_arrow.field(c) for c in columns])
    return pa.Table.from_batches(batches, schema=schema).to_pandas()


def read_events_table(
    path: PathLike,
    columns: dict[str, str] | None = None,
    items_path: PathLike | None = None,
    users_path: PathLike | None = None,
    nrows: int | None = None,
) -> RawDataset:
    """Read a generic events table (CSV/TSV by suffix, or parquet) with optional item/user side tables.

    The events file needs ``user_id``, ``item_id``, ``timestamp``; ``rating`` and ``behavior`` are taken when
    present. Timestamps may be unix seconds or date-time strings (naive ones read as UTC). ``columns`` maps
    canonical names to the file's names and applies to all three files; a canonical name you map must exist.

    Args:
        path: the events file (``.csv``, ``.tsv``, ``.parquet``; ``.csv.gz`` etc. work too).
        columns: canonical -> file column, e.g. ``{"user_id": "uid", "timestamp": "ts"}``.
        items_path: optional items table (``item_id`` + any of ``title``, ``genres``, ``year``).
        users_path: optional users table (``user_id`` + any of ``gender``, ``age``, ``occupation``, ``zip``).
        nrows: read only the first ``nrows`` data rows of the events file (a quick look at a large one).

    Returns:
        RawDataset named after the file's stem (``clicks`` for ``clicks.parquet``; ``data.name`` renames it).

    Example:
        >>> ds = read_events_table("clicks.parquet", columns={"user_id": "uid", "item_id": "iid",
        ...                                                  "timestamp": "ts", "rating": "score"})  # doctest: +SKIP
    """
    columns = dict(columns or {})
    for canonical, file_column in columns.items():
        if canonical not in _ALL_CANONICAL:
            raise HybridInputError(
                f"unknown canonical column {canonical!r} in columns; expected one of {', '.join(_ALL_CANONICAL)}"
            )
        if not isinstance(file_column, str) or not file_column:
            raise HybridInputError(f"columns[{canonical!r}] must be a non-empty column name, got {file_column!r}")
    explicit = set(columns)

    events_path = _require_file(Path(path), "events file")
    events = _read_table(events_path, columns, EVENT_COLUMNS, OPTIONAL_EVENT_COLUMNS, explicit, nrows)

    items = None
    if items_path is not None:
        item_file = _require_file(Path(items_path), "items file")
        table = _read_table(item_file, columns, ("item_id",), ("title", "genres", "year"), explicit)
        items = _complete_items(table, item_file)

    users = None
    if users_path is not None:
        user_file = _require_file(Path(users_path), "users file")
        table = _read_table(user_file, columns, ("user_id",), ("gender", "age", "occupation", "zip"), explicit)
        users = _complete_users(table, user_file)
    name = events_path.name.split(".")[0] or "events"
    parquet = _table_format(events_path) == "parquet"
    origin = RowOrigin(str(events_path), 1, "row") if parquet else RowOrigin(str(events_path), 2)
    return RawDataset(name, events, items, users, source=str(events_path), origin=origin)


# --------------------------------------------------------------------------------------------- sequences

#: an item with its time in a timestamped sequence file: ``<item>:<unix seconds>`` (split at the last ``:``)
TIMED_ITEM = r"^(.+):([0-9]{1,18})$"
_TIMED_ITEM = re.compile(TIMED_ITEM)
_SEQUENCE_SPLIT = re.compile(r"[ \t]+")
#: the event ``rn`` of a sequence file: ``line << 32 | position`` (increasing in file order)
SEQUENCE_LINE_SHIFT = 32


class PositionalTimeWarning(UserWarning):
    """A sequence file without timestamps: event times are positions in the line, so a time split is not one."""


def sequence_tokens(line: str) -> list[str]:
    """The fields of one sequence-file line: separated by runs of spaces and tabs."""
    return [t for t in _SEQUENCE_SPLIT.split(line.rstrip("\r\n")) if t]


def sequences_have_timestamps(path: PathLike) -> bool:
    """Whether a sequence file's items carry timestamps (``item:ts``): its first line's first item decides."""
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                tokens = sequence_tokens(line)
                if tokens:
                    return len(tokens) > 1 and _TIMED_ITEM.match(tokens[1]) is not None
    except UnicodeDecodeError as exc:
        raise HybridInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return False


def sequence_problem(path: PathLike, line: int, kind: int, position: int, value: str, timed: bool,
                     first_line: int | None = None) -> str:
    """The message of a bad sequence-file line (both engines): ``kind`` 0 a user with a second line (its first:
    ``first_line``), 1 a user with no items, 2 an item that does not fit the file's format (``position``: 1-based
    among the line's items)."""
    if kind == 0:
        return (f"{path}, line {line}: user {value!r} already has a line (line {first_line}); a sequence file has "
                "one line per user")
    if kind == 1:
        return f"{path}, line {line}: user {value!r} has no items; each line is 'user item item ...'"
    if timed:
        return (f"{path}, line {line}, item {position}: {value!r} is not item:timestamp (unix seconds); the file's "
                "first item has a timestamp, so every item needs one")
    return (f"{path}, line {line}, item {position}: {value!r} looks like item:timestamp, but the file's first item "
            "has none; write every item as item:timestamp, or none")


def positional_time_message(path: PathLike, protocol: str) -> str:
    """What :class:`PositionalTimeWarning` says."""
    split = ("splits users by the time of their last event, so here by history length: the users with the "
             "longest histories become the test users" if protocol == "last-item" else
             "cuts at a time quantile, so here at a position in every history")
    return (f"{path}: no timestamps in the sequence file (items are not item:timestamp): each event's time is its "
            f"position in its line, and the {protocol} protocol {split}")


class SequenceOrigin:
    """Names event ``i`` of a sequence file in messages: ``"<file>, line 3, item 2"``."""

    def __init__(self, path: str, lines: np.ndarray, positions: np.ndarray):
        self.path, self.lines, self.positions = path, lines, positions

    def at(self, row: int) -> str:
        return f"{self.path}, line {int(self.lines[int(row)])}, item {int(self.positions[int(row)])}"


def read_sequences(path: PathLike, items_path: PathLike | None = None, users_path: PathLike | None = None,
                   nrows: int | None = None) -> RawDataset:
    """Read a "one line per user" sequence file (RecBole / S3-Rec style), UTF-8, no header.

    Each line is ``user item item ...`` (fields separated by spaces or tabs), in time order; or, with
    timestamps, ``user item:ts item:ts ...`` (unix seconds after the item's last ``:``). The first line's
    first item decides which for the whole file. Without timestamps an event's ``timestamp`` is its position
    in the line (1, 2, ...), so a time split becomes a split by history length (``hybrid data prepare`` warns,
    :class:`PositionalTimeWarning`). Blank lines are skipped; a user on two lines, a user with no items and an
    item that does not fit the file's format are refused (one line naming the file, line and item).

    Args:
        path: the sequence file.
        items_path, users_path: optional item / user side tables, as for :func:`read_events_table`.
        nrows: read only the first ``nrows`` lines (users).

    Returns:
        RawDataset named after the file's stem; events ``user_id``, ``item_id``, ``timestamp``.

    Example:
        >>> ds = read_sequences("Beauty.txt", nrows=1000)  # doctest: +SKIP
    """
    path = _require_file(Path(path), "sequence file")
    if path.stat().st_size == 0:
        raise HybridInputError(f"{path}: file is empty")
    timed = sequences_have_timestamps(path)
    users, items, times, lines, positions = [], [], [], [], []
    first_line: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if nrows is not None and number > nrows:
                    break
                tokens = sequence_tokens(line)
                if not tokens:
                    continue
                user = tokens[0]
                if user in first_line:
                    raise HybridInputError(sequence_problem(path, number, 0, 0, user, timed, first_line[user]))
                first_line[user] = number
                if len(tokens) == 1:
                    raise HybridInputError(sequence_problem(path, number, 1, 0, user, timed))
                for position, token in enumerate(tokens[1:], 1):
                    match = _TIMED_ITEM.match(token)
                    if (match is None) == timed:
                        raise HybridInputError(sequence_problem(path, number, 2, position, token, timed))
                    items.append(match[1] if timed else token)
                    times.append(int(match[2]) if timed else position)
                users.extend([user] * (len(tokens) - 1))
                lines.extend([number] * (len(tokens) - 1))
                positions.extend(range(1, len(tokens)))
    except UnicodeDecodeError as exc:
        raise HybridInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    events = pd.DataFrame({"user_id": pd.Series(users, dtype=object), "item_id": pd.Series(items, dtype=object),
                           "timestamp": np.asarray(times, dtype=np.int64)})
    items_table = users_table = None
    if items_path is not None:
        item_file = _require_file(Path(items_path), "items file")
        items_table = _complete_items(_read_table(item_file, {}, ("item_id",), ("title", "genres", "year"), set()),
                                      item_file)
    if users_path is not None:
        user_file = _require_file(Path(users_path), "users file")
        users_table = _complete_users(_read_table(user_file, {}, ("user_id",), ("gender", "age", "occupation", "zip"),
                                                  set()), user_file)
    origin = SequenceOrigin(str(path), np.asarray(lines, dtype=np.int64), np.asarray(positions, dtype=np.int64))
    return RawDataset(path.name.split(".")[0] or "sequences", events, items_table, users_table, source=str(path),
                      origin=origin)  # type: ignore[arg-type]  # an origin naming line and item


# --------------------------------------------------------------------------------------------- dispatch


def _read_movielens_as(expected: str) -> Callable[[PathLike], RawDataset]:
    """A MovieLens reader that insists on one release, so ``ml-1m`` on a 100K folder is an error."""

    def read(path: PathLike) -> RawDataset:
        found = movielens_kind(path)
        if found != expected:
            raise HybridInputError(f"{path}: holds {found}, not {expected}")
        return read_movielens(path)

    read.__doc__ = f"Read {expected} (see read_movielens)."
    read.__signature__ = inspect.signature(read_movielens)  # type: ignore[attr-defined]
    return read


DATASET_READERS: dict[str, Callable[..., RawDataset]] = {
    "movielens-100k": _read_movielens_as("movielens-100k"),
    "ml-100k": _read_movielens_as("movielens-100k"),
    "movielens-1m": _read_movielens_as("movielens-1m"),
    "ml-1m": _read_movielens_as("movielens-1m"),
    "recbole": read_recbole,
    "taobao": read_taobao,
    "events": read_events_table,
    "sequences": read_sequences,
}


def read_dataset(name: str, path: PathLike, **opts) -> RawDataset:
    """Read a dataset by name: ``movielens-100k``/``ml-100k``, ``movielens-1m``/``ml-1m``, ``recbole``,
    ``taobao``, ``events``, ``sequences``.

    Args:
        name: the reader to use (see :data:`DATASET_READERS`).
        path: what that reader takes (a directory for MovieLens/RecBole, a file for taobao/events).
        **opts: that reader's own options (``columns=``, ``items_path=`` for events; ``name=`` for recbole;
            ``nrows=`` for every dataset: the first rows of a file — lines of ``taobao``, ``events`` and
            ``sequences`` files, read no further; the first events of the others, read whole). An option set to
            None means "default" and is dropped, so callers can pass
            ``columns=cfg.columns or None`` whatever the reader; any other option the reader does not take is
            an error, not ignored.

    Example:
        >>> read_dataset("events", "log.csv", columns={"user_id": "uid"})  # doctest: +SKIP
    """
    reader = DATASET_READERS.get(name)
    if reader is None:
        raise HybridInputError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_READERS)}")
    opts = {key: value for key, value in opts.items() if value is not None}
    accepted = [p for p in inspect.signature(reader).parameters if p != "path"]
    nrows = opts.pop("nrows", None) if "nrows" not in accepted else None
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        takes = ", ".join(dict.fromkeys([*accepted, "nrows"]))
        raise HybridInputError(f"dataset {name!r} does not take option {unknown[0]!r} (it takes: {takes})")
    data = reader(path, **opts)
    if nrows is not None:  # a reader that reads its files whole: keep the first events
        data = RawDataset(data.name, data.events.iloc[:nrows].reset_index(drop=True), data.items, data.users,
                          data.source, data.origin)
    return data
