"""The memory-mapped column cache: same values as the parquet tables, same batches as the in-memory path,
rebuilt when missing or stale, and mapped rather than copied into the process."""
from __future__ import annotations

import json
import mmap
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hybrid.core.errors import HybridInputError
from hybrid.data.batching import CTRBatchConverter, SequenceBatchConverter
from hybrid.data.columns import COLUMNS_DIR, ColumnTable, open_tables, write_table_columns
from hybrid.data.protocols import PreparedData
from hybrid.data.store import load_prepared, open_prepared
from hybrid.jobs.pretrain import training_item_counts


@pytest.fixture
def ratings_copy(prepared_ratings_dir, tmp_path):
    """A private copy of the prepared ML-100K ratings directory (tests here change its cache)."""
    return shutil.copytree(prepared_ratings_dir, tmp_path / "ratings")


def _maps_a_file(array: np.ndarray) -> bool:
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    return isinstance(base, mmap.mmap)


def test_mapped_tables_hold_the_parquet_values_without_copying_them(prepared_ratings_dir):
    frames, mapped = load_prepared(prepared_ratings_dir), open_prepared(prepared_ratings_dir)
    for name in PreparedData.TABLES:
        frame, table = getattr(frames, name), getattr(mapped, name)
        assert len(table) == len(frame), name
        numeric = [c for c in frame.columns if c not in ("raw_user_id", "genres")]
        assert sorted(table.columns) == sorted(numeric), name
        for column in numeric:
            # same dtype, or int64 narrowed to int32 where the parquet statistics prove the values fit
            wide, mapped_dtype = frame[column].to_numpy().dtype, table[column].dtype
            assert mapped_dtype == wide or (wide == np.int64 and mapped_dtype == np.int32), (name, column)
            np.testing.assert_array_equal(table[column], frame[column].to_numpy(), err_msg=f"{name}.{column}")
            assert _maps_a_file(table[column]), f"{name}.{column} was copied into memory"
        if "genres" in frame:
            offsets, values = table.list_column("genres")
            assert [values[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])] == \
                [list(g) for g in frame["genres"]]
    assert mapped.events["item_id"].dtype == np.int32 and mapped.events["timestamp"].dtype == np.int32   # narrowed


def _batches_equal(a, b) -> None:
    for field in ("labels", "timestamps", "hist_timestamps", "user_index", "lengths"):
        if hasattr(a, field):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
    ka, kb = (a.sparse, b.sparse) if hasattr(a, "sparse") else (a.features, b.features)
    assert ka.keys() == kb.keys()
    assert torch.equal(ka.values(), kb.values()) and torch.equal(ka.lengths(), kb.lengths())


@pytest.mark.parametrize("split", ["ctr_train", "ctr_test"])
def test_ctr_batches_from_the_mapped_tables_equal_the_in_memory_ones(prepared_ratings_dir, split):
    indices = np.random.default_rng(0).integers(0, 9000, 300).tolist()  # both splits have more rows
    args = dict(split=split, max_history=20, task_names=("click", "rating5"))
    in_memory = CTRBatchConverter(load_prepared(prepared_ratings_dir), **args)
    mapped = CTRBatchConverter(open_prepared(prepared_ratings_dir), **args)
    assert in_memory.fields == mapped.fields and "genres" in mapped.fields and "gender" in mapped.fields
    np.testing.assert_array_equal(in_memory.history_lengths(), mapped.history_lengths())
    _batches_equal(in_memory.__getitems__(indices), mapped.__getitems__(indices))


def test_sequence_batches_from_the_mapped_tables_equal_the_in_memory_ones(prepared_last_item_dir):
    for split in ("pretrain_train", "pretrain_eval"):
        a = SequenceBatchConverter(load_prepared(prepared_last_item_dir), split, max_len=30)
        b = SequenceBatchConverter(open_prepared(prepared_last_item_dir), split, max_len=30)
        indices = list(range(0, len(a), 3))
        _batches_equal(a.__getitems__(indices), b.__getitems__(indices))
        assert a.num_eval_targets == b.num_eval_targets


def test_a_missing_or_stale_cache_is_rebuilt(ratings_copy):
    reference = open_prepared(ratings_copy).ctr_train["item_id"].copy()
    shutil.rmtree(ratings_copy / COLUMNS_DIR)
    np.testing.assert_array_equal(open_prepared(ratings_copy).ctr_train["item_id"], reference)
    assert (ratings_copy / COLUMNS_DIR / "manifest.json").is_file()

    # a cache written for other tables (another data hash) is not read: the values come from the parquet
    manifest_file = ratings_copy / COLUMNS_DIR / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    np.lib.format.open_memmap(ratings_copy / COLUMNS_DIR / "ctr_train" / "item_id.npy", mode="r+")[:] = -1
    manifest["data_hash"] = "something-else"
    manifest_file.write_text(json.dumps(manifest))
    np.testing.assert_array_equal(open_prepared(ratings_copy).ctr_train["item_id"], reference)
    assert json.loads(manifest_file.read_text())["data_hash"] != "something-else"


def test_a_truncated_column_file_is_named(ratings_copy):
    open_prepared(ratings_copy)
    column = ratings_copy / COLUMNS_DIR / "events" / "item_id.npy"
    with open(column, "r+b") as handle:
        handle.truncate(column.stat().st_size // 2)
    with pytest.raises(HybridInputError, match=r"events/item_id\.npy: unreadable column file"):
        open_prepared(ratings_copy)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_a_read_only_directory_without_a_cache_says_what_to_do(ratings_copy):
    shutil.rmtree(ratings_copy / COLUMNS_DIR)
    ratings_copy.chmod(0o555)
    try:
        with pytest.raises(HybridInputError, match="cannot write its column cache"):
            open_prepared(ratings_copy)
    finally:
        ratings_copy.chmod(0o755)


def test_streaming_over_small_row_groups_keeps_rows_and_lists(tmp_path):
    rng = np.random.default_rng(1)
    genres = [rng.integers(0, 9, size=rng.integers(0, 4)).tolist() for _ in range(1000)]
    frame = pd.DataFrame({"a": rng.integers(0, 10**12, 1000), "b": rng.random(1000).astype(np.float32),
                          "genres": genres, "name": [str(i) for i in range(1000)]})
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "t.parquet", row_group_size=77)
    entry = write_table_columns(tmp_path / "t.parquet", tmp_path / "cols")
    assert entry == {"rows": 1000, "columns": {"a": "int64", "b": "float32"}, "lists": ["genres"]}
    np.testing.assert_array_equal(np.load(tmp_path / "cols" / "a.npy"), frame["a"].to_numpy())
    np.testing.assert_array_equal(np.load(tmp_path / "cols" / "b.npy"), frame["b"].to_numpy())
    offsets, values = np.load(tmp_path / "cols" / "genres.offsets.npy"), np.load(tmp_path / "cols" / "genres.values.npy")
    assert [values[s:e].tolist() for s, e in zip(offsets[:-1], offsets[1:])] == genres


def test_missing_values_in_a_prepared_column_are_refused(tmp_path):
    pq.write_table(pa.table({"a": pa.array([1, None, 3], pa.int64())}), tmp_path / "t.parquet")
    with pytest.raises(HybridInputError, match=r"t\.parquet: column 'a' has 1 missing values"):
        write_table_columns(tmp_path / "t.parquet", tmp_path / "cols")


def test_a_second_writer_finds_the_complete_cache(ratings_copy):
    from hybrid.data.columns import write_columns

    first = open_prepared(ratings_copy).events["item_id"].copy()
    data_hash = json.loads((ratings_copy / "stats.json").read_text())["data_hash"]
    write_columns(ratings_copy, PreparedData.TABLES, data_hash)  # as a second rank would, racing the first
    tables = open_tables(ratings_copy, ("events",), data_hash)
    np.testing.assert_array_equal(tables["events"]["item_id"], first)
    assert not [p for p in ratings_copy.iterdir() if p.name.startswith(f".{COLUMNS_DIR}.")]  # no temp left


def test_table_errors_name_the_table_and_its_columns():
    table = ColumnTable.from_frame(pd.DataFrame({"x": [1], "g": [[1, 2]]}), "ctr_train")
    with pytest.raises(HybridInputError, match=r"ctr_train: no column 'y' \(has: x, g\)"):
        table["y"]
    with pytest.raises(HybridInputError, match="a list column: use list_column"):
        table["g"]


def test_item_counts_in_chunks_equal_the_direct_count(prepared_last_item, prepared_ratings):
    for prepared in (prepared_last_item, prepared_ratings):
        windows, items = prepared.pretrain_train, prepared.events["item_id"].to_numpy()
        direct = np.zeros(prepared.feature_map.vocab_sizes()["item_id"], dtype=np.int64)
        for start, end in zip(windows["start"], windows["end"]):
            np.add.at(direct, items[start:end], 1)
        np.testing.assert_array_equal(training_item_counts(prepared, chunk=997), direct)
        np.testing.assert_array_equal(training_item_counts(prepared), direct)
