"""Column tables: what the batch converters read, memory-mapped from a prepared directory or wrapped in memory.

Parquet is compressed, so it cannot be mapped into memory. Each fixed-width column of a prepared directory's
tables is therefore written once more, uncompressed, as a ``.npy`` file under ``<dir>/columns/<table>/``
(a list column as ``<name>.offsets.npy`` + ``<name>.values.npy``), streamed one parquet row group at a time
so writing it needs no more memory than a row group. ``hybrid data prepare`` writes them inside its atomic
output directory; a directory prepared before they existed gets them on first open.

:func:`open_tables` maps them with ``np.load(mmap_mode="r")``: the pages belong to the OS page cache, so
every rank of a ``torchrun`` job and every DataLoader worker share one copy, only the pages a batch touches
are read, and a process's memory does not grow with the number of events. The same :class:`ColumnTable`
wraps an in-memory DataFrame (:meth:`ColumnTable.from_frame`, zero-copy for numeric columns), so the
converters have one interface for both paths.

Example:
    >>> import pandas as pd
    >>> table = ColumnTable.from_frame(pd.DataFrame({"item_id": [3, 4, 5], "genres": [[1], [], [2, 3]]}), "demo")
    >>> len(table), "item_id" in table, table["item_id"][1:].tolist()
    (3, True, [4, 5])
    >>> offsets, values = table.list_column("genres")
    >>> offsets.tolist(), values.tolist()
    ([0, 1, 1, 3], [1, 2, 3])
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from hybrid.core.errors import HybridInputError

COLUMNS_DIR = "columns"
MANIFEST = "manifest.json"
#: bump when the file layout changes: an older cache is then rebuilt, not misread
LAYOUT_VERSION = 2


class ColumnTable:
    """A read-only table of 1-D numpy columns (memory-mapped or in memory) and list columns.

    Args:
        name: the table's name (used in error messages).
        num_rows: its length.
        columns: fixed-width columns, each ``[num_rows]``.
        lists: list columns, each ``(offsets [num_rows + 1], values [offsets[-1]])``.
    """

    def __init__(self, name: str, num_rows: int, columns: Mapping[str, np.ndarray],
                 lists: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        self.name, self.num_rows = name, int(num_rows)
        self.columns = dict(columns)
        self.lists = dict(lists or {})

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, name: str) -> ColumnTable:
        """Wrap a DataFrame: numeric columns as their numpy arrays, list columns as Arrow offsets / values;
        other columns (raw id strings) are left out — no converter reads them."""
        columns, lists = {}, {}
        for column in frame.columns:
            series = frame[column]
            if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
                columns[column] = series.to_numpy()
            elif _is_list(series):
                lists[column] = _list_arrays(pa.array(series))
        return cls(name, len(frame), columns, lists)

    def __len__(self) -> int:
        return self.num_rows

    def __contains__(self, name: object) -> bool:
        return name in self.columns or name in self.lists

    @property
    def names(self) -> list[str]:
        return [*self.columns, *self.lists]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.columns:
            kind = " (a list column: use list_column)" if name in self.lists else ""
            raise HybridInputError(f"{self.name}: no column {name!r}{kind} (has: {', '.join(self.names)})")
        return self.columns[name]

    def list_column(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(offsets, values)`` of a list column: row ``i`` is ``values[offsets[i]:offsets[i + 1]]``."""
        if name not in self.lists:
            raise HybridInputError(f"{self.name}: no list column {name!r} (has: {', '.join(self.names)})")
        return self.lists[name]


def as_table(table: pd.DataFrame | ColumnTable, name: str) -> ColumnTable:
    """``table`` as a :class:`ColumnTable` (a DataFrame is wrapped without copying its numeric columns)."""
    return table if isinstance(table, ColumnTable) else ColumnTable.from_frame(table, name)


def _is_list(series: pd.Series) -> bool:
    if isinstance(series.dtype, pd.ArrowDtype):
        return pa.types.is_list(series.dtype.pyarrow_dtype) or pa.types.is_large_list(series.dtype.pyarrow_dtype)
    return series.dtype == object and len(series) > 0 and isinstance(series.iloc[0], (list, np.ndarray))


def _list_arrays(array: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    array = array.cast(pa.large_list(pa.int64()))
    offsets = array.offsets.to_numpy().astype(np.int64)
    return offsets - offsets[0], array.flatten().to_numpy()


# -- the on-disk cache ---------------------------------------------------------------------------------------

def _fixed_width(field: pa.Field) -> bool:
    return pa.types.is_integer(field.type) or pa.types.is_floating(field.type)


def _list_of_ints(field: pa.Field) -> bool:
    return (pa.types.is_list(field.type) or pa.types.is_large_list(field.type)) and \
        pa.types.is_integer(field.type.value_type)


class _NpyWriter:
    """Appends to a ``.npy`` file of ``n`` values with plain writes: the pages written are not mapped into
    the process (a memory-mapped writer would hold every written page in its resident set)."""

    def __init__(self, path: Path, dtype: np.dtype, n: int) -> None:
        self.path, self.dtype, self.n, self.written = path, np.dtype(dtype), n, 0
        self.file = open(path, "wb")
        np.lib.format.write_array_header_1_0(self.file, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                          "fortran_order": False, "shape": (n,)})

    def append(self, values: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(values.astype(self.dtype, copy=False)).tobytes())
        self.written += len(values)

    def close(self, check: bool = True) -> None:
        self.file.close()
        if check and self.written != self.n:  # the metadata promised another length: never keep such a file
            raise HybridInputError(f"{self.path}: wrote {self.written} values, expected {self.n}")


def _cache_dtype(file: pq.ParquetFile, index: int, field: pa.Field) -> np.dtype:
    """The column's dtype in the cache: 64-bit integers whose values all fit in int32 (ids, positions and
    second timestamps, as the row groups' statistics prove) are stored as int32 — half the pages the
    loaders map and touch. Anything unproven keeps its parquet width."""
    dtype = np.dtype(field.type.to_pandas_dtype())
    if dtype != np.int64:
        return dtype
    narrow = np.iinfo(np.int32)
    for group in range(file.num_row_groups):
        chunk = file.metadata.row_group(group).column(index)
        stats = chunk.statistics if chunk.path_in_schema == field.name else None
        if stats is None or not stats.has_min_max or stats.min < narrow.min or stats.max > narrow.max:
            return dtype
    return np.dtype(np.int32)


def write_table_columns(parquet: Path, out: Path) -> dict:
    """Stream ``parquet``'s fixed-width and integer-list columns into ``out/<column>.npy`` files.

    One row group at a time, appended with plain writes, so memory stays at one row group whatever the
    table's size. Returns the table's entry of the cache manifest (rows, column kinds and dtypes).
    """
    file = pq.ParquetFile(parquet)
    schema = file.schema_arrow
    n = file.metadata.num_rows
    fixed = [f for f in schema if _fixed_width(f)]
    lists = [f for f in schema if _list_of_ints(f)]
    out.mkdir(parents=True, exist_ok=True)
    leaves = {file.schema.column(j).path: j for j in range(file.metadata.num_columns)}  # parquet's numbering
    dtypes = {f.name: _cache_dtype(file, leaves[f.name], f) for f in fixed}
    writers = {f.name: _NpyWriter(out / f"{f.name}.npy", dtypes[f.name], n) for f in fixed}
    for f in lists:  # two passes: the value count first (a list column's length is not in the metadata)
        total = sum(_list_arrays(file.read_row_group(g, columns=[f.name]).column(f.name))[0][-1]
                    for g in range(file.num_row_groups))
        writers[f"{f.name}.offsets"] = _NpyWriter(out / f"{f.name}.offsets.npy", np.int64, n + 1)
        writers[f"{f.name}.offsets"].append(np.zeros(1, dtype=np.int64))
        writers[f"{f.name}.values"] = _NpyWriter(out / f"{f.name}.values.npy", np.int64, int(total))
    filled = {f.name: 0 for f in lists}
    complete = False
    try:
        for group in range(file.num_row_groups):
            batch = file.read_row_group(group, columns=[f.name for f in (*fixed, *lists)])
            for f in fixed:
                column = batch.column(f.name)
                if column.null_count:
                    raise HybridInputError(f"{parquet}: column {f.name!r} has {column.null_count} missing values "
                                           f"(row group {group}); a prepared table has none — prepare it again")
                writers[f.name].append(column.to_numpy())
            for f in lists:
                starts, values = _list_arrays(batch.column(f.name))
                writers[f"{f.name}.offsets"].append(starts[1:] + filled[f.name])
                writers[f"{f.name}.values"].append(values)
                filled[f.name] += len(values)
        complete = True
    finally:  # after a failure the files are incomplete by design (the caller removes the temporary dir)
        for writer in writers.values():
            writer.close(check=complete)
    return {"rows": n, "columns": {name: str(dtype) for name, dtype in dtypes.items()},
            "lists": [f.name for f in lists]}


def write_columns(directory: str | os.PathLike, tables: tuple[str, ...], data_hash: str) -> Path:
    """Write the column cache of the prepared ``directory``'s ``tables`` to ``<directory>/columns``.

    Written under a temporary name and renamed into place: a concurrent writer (another rank opening the same
    directory) either wins the rename or finds a complete cache.
    """
    directory = Path(directory)
    target = directory / COLUMNS_DIR
    tmp = Path(tempfile.mkdtemp(prefix=f".{COLUMNS_DIR}.", dir=directory))
    try:
        manifest = {"layout": LAYOUT_VERSION, "data_hash": data_hash,
                    "tables": {t: write_table_columns(directory / f"{t}.parquet", tmp / t) for t in tables}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if target.exists() and _valid_manifest(target, data_hash) is None:
            shutil.rmtree(target, ignore_errors=True)  # stale: from other tables
        try:
            os.rename(tmp, target)
        except OSError:
            if _valid_manifest(target, data_hash) is None:  # lost the race to a writer of something else
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _valid_manifest(target: Path, data_hash: str) -> dict | None:
    try:
        manifest = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("layout") != LAYOUT_VERSION or manifest.get("data_hash") != data_hash:
        return None
    return manifest


def open_tables(directory: str | os.PathLike, tables: tuple[str, ...], data_hash: str) -> dict[str, ColumnTable]:
    """Memory-map the column cache of a prepared ``directory`` (writing it first if it is missing or stale).

    Args:
        directory: a prepared data directory.
        tables: the table names to open.
        data_hash: the directory's data hash (``stats.json``): a cache written for other tables is rebuilt.
    """
    directory = Path(directory)
    target = directory / COLUMNS_DIR
    manifest = _valid_manifest(target, data_hash)
    if manifest is None or any(t not in manifest["tables"] for t in tables):
        try:
            write_columns(directory, tables, data_hash)
        except PermissionError as exc:
            raise HybridInputError(f"{directory}: cannot write its column cache ({exc.strerror}); prepare the data "
                                   "again with `hybrid data prepare`, which writes it, or make the directory "
                                   "writable") from None
        manifest = _valid_manifest(target, data_hash)
    opened = {}
    for name in tables:
        entry, folder = manifest["tables"][name], target / name
        columns = {c: _map(folder / f"{c}.npy", entry["rows"]) for c in entry["columns"]}
        lists = {}
        for c in entry["lists"]:
            offsets = _map(folder / f"{c}.offsets.npy", entry["rows"] + 1)
            lists[c] = (offsets, _map(folder / f"{c}.values.npy", int(offsets[-1])))
        opened[name] = ColumnTable(name, entry["rows"], columns, lists)
    return opened


def _map(path: Path, rows: int) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise HybridInputError(f"{path}: unreadable column file ({exc}); delete {path.parent.parent} and "
                               "open the data again to rebuild it") from None
    if array.shape != (rows,):
        raise HybridInputError(f"{path}: {array.shape[0]} rows, the manifest says {rows}; delete "
                               f"{path.parent.parent} and open the data again to rebuild it")
    return np.asarray(array)  # a plain ndarray view of the mapping: gathers from it are ordinary arrays
