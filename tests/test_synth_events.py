"""bench/synth_events.py: Taobao-shaped synthetic events -- format, distributions, determinism, atomic writes."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hybrid.data.readers import read_taobao

REPO = Path(__file__).resolve().parents[1]
EVENTS = 20_000


def _load():
    spec = importlib.util.spec_from_file_location("synth_events", REPO / "bench" / "synth_events.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


synth = _load()


def _read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, header=None, names=list(synth.COLUMNS))


@pytest.fixture(scope="module")
def csv_file(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("csv") / "ub.csv"
    return path, synth.generate(path, EVENTS, seed=0)


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("parquet") / "ub.parquet"
    return path, synth.generate(path, EVENTS, seed=0)


def test_csv_shape_and_values(csv_file):
    path, summary = csv_file
    first = path.read_text().splitlines()[0]
    assert len(first.split(",")) == 5 and first.split(",")[0].isdigit()     # no header, no quotes
    df = _read_csv(path)
    assert len(df) == EVENTS == summary["events"]
    assert summary["bytes"] == path.stat().st_size
    for column in ("user_id", "item_id", "category_id", "timestamp"):
        assert df[column].dtype == "int64" and (df[column] > 0).all()
    assert set(df["behavior_type"]) <= set(synth.BEHAVIORS)
    shares = df["behavior_type"].value_counts(normalize=True)
    assert shares["pv"] > 0.85 and shares.idxmax() == "pv" and shares["buy"] > 0.01
    assert df["timestamp"].between(1511539200, 1512316799).all()
    assert df["user_id"].nunique() == summary["users"]
    assert df["item_id"].max() <= summary["items"] and df["category_id"].max() <= summary["categories"]


def test_users_contiguous_and_time_sorted(csv_file):
    df = _read_csv(csv_file[0])
    changes = (df["user_id"] != df["user_id"].shift()).sum()
    assert changes == df["user_id"].nunique()                               # each user one contiguous run
    same_user = df["user_id"] == df["user_id"].shift()
    assert (df["timestamp"].diff()[same_user] >= 0).all()


def test_one_category_per_item_and_skew(csv_file):
    df = _read_csv(csv_file[0])
    assert (df.groupby("item_id")["category_id"].nunique() == 1).all()
    counts = df["item_id"].value_counts()
    top = max(1, csv_file[1]["items"] // 100)
    assert counts.iloc[:top].sum() / EVENTS > 0.10                         # uniform would be ~1%
    per_user = df["user_id"].value_counts()
    assert per_user.max() > 3 * per_user.median()                          # lognormal activity
    assert df.groupby("category_id").size().max() / EVENTS > 0.03          # categories skewed too


def test_readable_by_read_taobao(csv_file):
    ds = read_taobao(csv_file[0])
    assert len(ds.events) == EVENTS


def test_parquet_schema_and_same_rows_as_csv(parquet_file, csv_file):
    path, summary = parquet_file
    table = pq.read_table(path)
    assert table.schema.names == list(synth.COLUMNS) and summary["format"] == "parquet"
    assert [table.schema.field(c).type for c in synth.COLUMNS] == [pa.int64()] * 3 + [pa.string(), pa.int64()]
    pd.testing.assert_frame_equal(table.to_pandas(), _read_csv(csv_file[0]), check_dtype=False)


def test_deterministic_and_independent_of_chunks(tmp_path, monkeypatch, csv_file):
    again = tmp_path / "again.csv"
    synth.generate(again, EVENTS, seed=0, chunk_events=7)
    assert again.read_bytes() == csv_file[0].read_bytes()
    other = tmp_path / "other.csv"
    synth.generate(other, EVENTS, seed=1)
    assert other.read_bytes() != csv_file[0].read_bytes()
    # several blocks: chunking them differently gives the same bytes
    monkeypatch.setattr(synth, "BLOCK_EVENTS", 1024)
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    synth.generate(a, EVENTS, seed=3, chunk_events=1)
    synth.generate(b, EVENTS, seed=3, chunk_events=5000)
    assert a.read_bytes() == b.read_bytes()
    df = _read_csv(a)
    assert len(df) == EVENTS and (df["user_id"] != df["user_id"].shift()).sum() == df["user_id"].nunique()


def test_explicit_sizes(tmp_path):
    path = tmp_path / "one_each.csv"
    summary = synth.generate(path, 500, users=500, items=50, categories=5, seed=0)
    df = _read_csv(path)
    assert len(df) == 500 and df["user_id"].nunique() == 500 and summary["max_user_events"] == 1
    assert df["item_id"].max() <= 50 and df["category_id"].max() <= 5
    with pytest.raises(ValueError, match="users must be between"):
        synth.generate(tmp_path / "x.csv", 10, users=11)
    with pytest.raises(ValueError, match="suffix"):
        synth.generate(tmp_path / "x.txt", 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one_each.csv"]


def test_default_sizes_scale_like_the_real_file():
    users, items, categories = synth.default_sizes(100_150_807)
    assert abs(users - 987_994) / 987_994 < 0.02 and abs(items - 4_162_024) / 4_162_024 < 0.01
    assert categories == 9439
    assert synth.default_sizes(20_000)[2] >= 50


def test_bad_directory_and_failed_write_leave_nothing(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        synth.generate(tmp_path / "missing" / "ub.csv", 1000)
    assert list(tmp_path.iterdir()) == []

    def broken(world, block, seed):
        if block == 2:
            raise RuntimeError("disk on fire")
        return real(world, block, seed)

    real = synth.make_block
    monkeypatch.setattr(synth, "BLOCK_EVENTS", 1024)
    monkeypatch.setattr(synth, "make_block", broken)
    for name in ("ub.csv", "ub.parquet"):
        with pytest.raises(RuntimeError, match="disk on fire"):
            synth.generate(tmp_path / name, EVENTS, chunk_events=1)
    assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli.parquet"
    assert synth.main(["--events", "3000", "--out", str(out), "--users", "40", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["users"] == 40 and pq.read_metadata(out).num_rows == 3000
    assert np.unique(pq.read_table(out, columns=["user_id"]).column(0).to_numpy()).size == 40
    assert synth.main(["--events", "10", "--out", str(tmp_path / "nope" / "x.csv"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
