"""Save and load :class:`~hybrid.data.protocols.PreparedData` as a directory.

Layout: one parquet file per table, ``feature_map.json``, ``stats.json``, the resolved ``config.yaml`` and
``columns/`` (the tables' columns uncompressed, for memory-mapping: :mod:`hybrid.data.columns`).
A directory is written under a temporary name and renamed into place when complete, so a failed run never
leaves a half-written dataset (and an existing one is replaced only by a complete new one).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from hybrid.core.errors import HybridInputError
from hybrid.core.feature_map import FeatureMap
from hybrid.data.columns import open_tables, write_columns
from hybrid.data.protocols import PreparedData

FEATURE_MAP_FILE = "feature_map.json"
STATS_FILE = "stats.json"



def hash_files(paths: Iterable[str | os.PathLike]) -> str:
    """sha256 (first 16 hex digits) over the names and bytes of ``paths``, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _arrow_lists(arrow_type: pa.DataType):
    return pd.ArrowDtype(arrow_type) if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) else None


@contextmanager
def atomic_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``out_dir`` that replaces it only when the block completes.

    A failure inside the block removes the temporary directory and leaves any earlier ``out_dir`` as it was.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_metadata(directory: Path, feature_map: FeatureMap, stats: dict, config_yaml: str | None) -> None:
    """Beside the tables: ``feature_map.json``, ``stats.json`` (with the data hash), ``config.yaml``, and the
    memory-mapped column cache the loaders read (:mod:`hybrid.data.columns`)."""
    feature_map.save(directory / FEATURE_MAP_FILE)
    stats["data_hash"] = data_hash(directory)
    (directory / STATS_FILE).write_text(json.dumps(stats, indent=2, default=str))
    if config_yaml is not None:
        (directory / "config.yaml").write_text(config_yaml)
    write_columns(directory, PreparedData.TABLES, stats["data_hash"])


def save_prepared(prepared: PreparedData, out_dir: str | os.PathLike, config_yaml: str | None = None) -> Path:
    """Write ``prepared`` to ``out_dir`` atomically; returns the directory."""
    with atomic_directory(out_dir) as tmp:
        for name in PreparedData.TABLES:
            getattr(prepared, name).to_parquet(tmp / f"{name}.parquet", index=False)
        write_metadata(tmp, prepared.feature_map, prepared.stats, config_yaml)
    return Path(out_dir)


def data_hash(path: str | os.PathLike) -> str:
    """A short hash of a prepared directory's tables and feature map (what every later stage tags)."""
    path = Path(path)
    return hash_files([path / f"{name}.parquet" for name in PreparedData.TABLES] + [path / FEATURE_MAP_FILE])


def _checked(path: str | os.PathLike) -> tuple[Path, dict]:
    """The prepared directory ``path`` with every table present, and its stats."""
    path = Path(path)
    if not path.is_dir():
        raise HybridInputError(f"{path}: prepared data directory not found (run `hybrid data prepare` first)")
    for name in PreparedData.TABLES:
        file = path / f"{name}.parquet"
        if not file.is_file():
            hint = (" (prepared by an older version, before the validation split: run `hybrid data prepare` again)"
                    if name == "ctr_valid" else "")
            raise HybridInputError(f"{file}: missing from the prepared data directory{hint}")
    stats_file = path / STATS_FILE
    return path, (json.loads(stats_file.read_text()) if stats_file.is_file() else {})


def load_prepared(path: str | os.PathLike) -> PreparedData:
    """Read a directory written by :func:`save_prepared` (or ``hybrid data prepare``) into memory, as
    DataFrames (for analysis and small data; the training jobs use :func:`open_prepared`)."""
    path, stats = _checked(path)
    # List columns stay Arrow-backed: no per-row Python lists on the way to the batch converter.
    tables = {name: pq.read_table(path / f"{name}.parquet").to_pandas(types_mapper=_arrow_lists)
              for name in PreparedData.TABLES}
    return PreparedData(feature_map=FeatureMap.load(path / FEATURE_MAP_FILE), stats=stats, **tables)


def open_prepared(path: str | os.PathLike) -> PreparedData:
    """A prepared directory with its tables memory-mapped (:class:`~hybrid.data.columns.ColumnTable`): what
    the training jobs read. Nothing is copied into the process; ranks and loader workers share the pages."""
    path, stats = _checked(path)
    tables = open_tables(path, PreparedData.TABLES, stats.get("data_hash") or data_hash(path))
    return PreparedData(feature_map=FeatureMap.load(path / FEATURE_MAP_FILE), stats=stats, **tables)
