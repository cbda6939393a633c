"""The out-of-core DuckDB engine against the in-memory reference: same feature map, same rows, same order.

Real ML-100K (and ml-1m-partial where ``../shared/data`` has it) through both engines, Taobao-shaped and
generic events files read natively by DuckDB vs by the pandas readers, the readers' clear errors, and the
atomic output of ``run_prepare``.
"""
from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from hybrid.core.errors import HybridInputError
from hybrid.data.duckdb_engine import EngineConfig, quantile_from_counts, run_protocol
from hybrid.data.duckdb_sources import load_source
from hybrid.data.protocols import PreparedData, ProtocolConfig, prepare
from hybrid.data.readers import read_dataset
from hybrid.data.store import load_prepared
from hybrid.jobs.prepare import DataConfig, PrepareConfig, run_prepare
from hybrid.tracking import TrackingConfig

ML1M_PARTIAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-1m-partial"


def _duckdb(tmp_path: Path, dataset: str, path, cfg: ProtocolConfig, **options) -> PreparedData:
    """Run the engine into ``tmp_path/<n>`` and read the directory back as the reference's object."""
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    con = duckdb.connect()
    fm, stats = run_protocol(con, load_source(con, dataset, str(path), **options), cfg, out, row_group_size=997)
    fm.save(out / "feature_map.json")
    prepared = load_prepared(out)
    prepared.stats = stats
    return prepared


def assert_same_prepared(got: PreparedData, expected: PreparedData) -> None:
    assert got.feature_map.to_dict() == expected.feature_map.to_dict()
    for name in PreparedData.TABLES:
        pd.testing.assert_frame_equal(getattr(got, name), getattr(expected, name).reset_index(drop=True),
                                      check_dtype=True, obj=name)
    strip = ("prepare_seconds", "data_hash")
    kept = [(k, v) for k, v in got.stats.items() if k not in strip]
    assert kept == [(k, v) for k, v in expected.stats.items() if k not in strip]  # same keys, order and values


@pytest.mark.parametrize("protocol", ["last-item", "ratings"])
def test_ml100k_identical_to_reference(tmp_path, ml100k, ml100k_dir, protocol):
    cfg = ProtocolConfig(protocol=protocol)
    assert_same_prepared(_duckdb(tmp_path, "movielens-100k", ml100k_dir, cfg), prepare(ml100k, cfg))


@pytest.mark.parametrize("cfg", [
    ProtocolConfig(protocol="last-item", transductive=False, max_history=7, seed=3),
    ProtocolConfig(protocol="last-item", validation_share=0.0, min_count=3),
    ProtocolConfig(protocol="ratings", validation_share=0.0, max_history=5, positive_rating=3.0),
    ProtocolConfig(protocol="ratings", time_cut_quantile=0.6, validation_share=0.25, min_count=4),
], ids=["inductive", "no-valid-min-count", "ratings-no-valid", "ratings-shares"])
def test_ml100k_options_identical_to_reference(tmp_path, ml100k, ml100k_dir, cfg):
    assert_same_prepared(_duckdb(tmp_path, "movielens-100k", ml100k_dir, cfg), prepare(ml100k, cfg))


@pytest.mark.slow
@pytest.mark.skipif(not ML1M_PARTIAL.is_dir(), reason="ml-1m-partial is only in ../shared/data")
@pytest.mark.parametrize("protocol", ["last-item", "ratings"])
def test_ml1m_partial_identical_to_reference(tmp_path, protocol):
    cfg = ProtocolConfig(protocol=protocol)
    assert_same_prepared(_duckdb(tmp_path, "movielens-1m", ML1M_PARTIAL, cfg),
                         prepare(read_dataset("movielens-1m", ML1M_PARTIAL), cfg))


def _taobao_file(path: Path, events: int = 6000, seed: int = 0) -> Path:
    """Taobao-shaped rows with the hard cases: ties in time within a user, one-event users, an item whose
    category changes (the first one counts), users and items not in id order, rows not grouped by user."""
    rng = np.random.default_rng(seed)
    users = rng.integers(1, 400, size=events) * 7919
    items = (rng.zipf(1.3, size=events) % 900) * 31 + 5
    categories = items % 17 + 100
    flip = rng.random(events) < 0.01
    categories[flip] += 1
    behaviour = rng.choice(["pv", "cart", "fav", "buy"], p=[0.895, 0.055, 0.029, 0.021], size=events)
    times = 1511539200 + rng.integers(0, 3000, size=events) * 200  # coarse: many same-second events
    lines = [f"{u},{i},{c},{b},{t}" for u, i, c, b, t in zip(users, items, categories, behaviour, times)]
    lines += ["999999991,5,100,pv,1511539200"]  # a one-event user
    path.write_text("\n".join(lines) + "\n")
    return path


def test_taobao_native_reader_identical_to_pandas_path(tmp_path):
    path = _taobao_file(tmp_path / "UserBehavior.csv")
    for cfg in (ProtocolConfig(protocol="last-item", max_history=20), ProtocolConfig(protocol="last-item", seed=5,
                                                                                      transductive=False)):
        assert_same_prepared(_duckdb(tmp_path, "taobao", path, cfg), prepare(read_dataset("taobao", path), cfg))
    with pytest.raises(HybridInputError, match="protocol 'ratings' needs a 'rating' column"):
        _duckdb(tmp_path, "taobao", path, ProtocolConfig(protocol="ratings"))


def test_events_native_reader_identical_to_pandas_path(tmp_path, ml100k):
    """A generic CSV (renamed columns, date-time timestamps, half ratings) and its parquet twin, with side tables."""
    events = ml100k.events.iloc[:20000].copy()
    events["rating"] = events["rating"] - 0.5 * (events.index % 3 == 0)
    frame = pd.DataFrame({"uid": events["user_id"], "iid": events["item_id"],
                          "when": pd.to_datetime(events["timestamp"], unit="s").dt.strftime("%Y-%m-%d %H:%M:%S"),
                          "score": events["rating"]})
    frame.to_csv(tmp_path / "log.csv", index=False)
    frame.assign(when=events["timestamp"].to_numpy(), uid=events["user_id"].astype(int).to_numpy()).to_parquet(
        tmp_path / "log.parquet", index=False)
    ml100k.items.rename(columns={"item_id": "iid"}).to_csv(tmp_path / "items.csv", index=False)
    ml100k.users.rename(columns={"user_id": "uid"}).to_csv(tmp_path / "users.csv", index=False)
    options = dict(columns={"user_id": "uid", "item_id": "iid", "timestamp": "when", "rating": "score"},
                   items_path=str(tmp_path / "items.csv"), users_path=str(tmp_path / "users.csv"))
    for name in ("log.csv", "log.parquet"):
        for protocol in ("ratings", "last-item"):
            cfg = ProtocolConfig(protocol=protocol)
            expected = prepare(read_dataset("events", tmp_path / name, **options), cfg)
            assert_same_prepared(_duckdb(tmp_path, "events", tmp_path / name, cfg, **options), expected)


BAD_EVENTS = {
    "empty id": ("user_id,item_id,timestamp\n1,10,100\n,11,200\n", "line 3, column 'user_id': empty value"),
    "bad timestamp": ("user_id,item_id,timestamp\n1,10,100\n1,11,abc\n",
                      "line 3, column 'timestamp': cannot parse 'abc' as a timestamp"),
    "bad date": ("user_id,item_id,timestamp\n1,10,2020-01-02\n1,11,nope\n",
                 "line 3, column 'timestamp': cannot parse 'nope' as a timestamp"),
    "NaN rating": ("user_id,item_id,timestamp,rating\n1,10,100,4\n1,11,200,nan\n",
                   "line 3, column 'rating': value is empty/NaN"),
    "text rating": ("user_id,item_id,timestamp,rating\n1,10,100,4\n1,11,200,good\n",
                    "line 3, column 'rating': cannot parse 'good' as a number"),
    "infinite rating": ("user_id,item_id,timestamp,rating\n1,10,100,4\n1,11,200,inf\n",
                        "line 3, column 'rating': 'inf' is not a finite number"),
    "missing column": ("user_id,item_id\n1,10\n", "missing required column 'timestamp'; columns present: user_id, item_id"),
    "empty file": ("", "file is empty"),
    "extra field": ("user_id,item_id,timestamp\n1,10,100\n1,11,200,7\n", "malformed file"),
}


@pytest.mark.parametrize("case", list(BAD_EVENTS))
def test_native_reader_errors_name_file_line_and_column(tmp_path, case):
    text, message = BAD_EVENTS[case]
    path = tmp_path / "events.csv"
    path.write_text(text)
    with pytest.raises(HybridInputError) as caught:
        load_source(duckdb.connect(), "events", str(path))
    assert str(path) in str(caught.value) and message in str(caught.value), str(caught.value)


def test_native_reader_rejects_non_utf8_and_names_taobao_lines(tmp_path):
    path = tmp_path / "events.csv"
    path.write_bytes(b"user_id,item_id,timestamp\n1,caf\xe9,100\n")
    with pytest.raises(HybridInputError, match="events.csv.*(UTF-8|unicode)"):
        load_source(duckdb.connect(), "events", str(path))
    taobao = tmp_path / "UserBehavior.csv"
    taobao.write_text("1,2,3,pv,1511544070\n1,2,3,,1511544071\n")
    with pytest.raises(HybridInputError, match=r"UserBehavior.csv, line 2, column 'behavior_type': empty value"):
        load_source(duckdb.connect(), "taobao", str(taobao))
    with pytest.raises(HybridInputError, match="Taobao behaviour file .* does not exist"):
        load_source(duckdb.connect(), "taobao", str(tmp_path / "none.csv"))


def test_quantile_from_counts_is_numpys_linear_quantile_bit_for_bit():
    rng = np.random.default_rng(0)
    for trial in range(300):
        values = np.unique(rng.integers(0, 10 ** rng.integers(1, 10), size=rng.integers(1, 50)))
        counts = rng.integers(1, 20, size=len(values))
        q = [0.0, 1.0, 0.5, 0.7, 0.8, 0.6][trial % 6] if trial < 12 else float(rng.random())
        assert quantile_from_counts(values, counts, q) == np.quantile(np.repeat(values, counts), q)


def test_run_prepare_is_atomic_and_leaves_no_scratch(tmp_path, ml100k_dir):
    tracking = TrackingConfig(enabled=False)
    out = tmp_path / "prepared"
    good = PrepareConfig(data=DataConfig(dataset="movielens-100k", path=str(ml100k_dir)),
                         protocol=ProtocolConfig(protocol="ratings"), out=str(out), tracking=tracking,
                         engine=EngineConfig(memory_limit="1GB", threads=1))
    summary = run_prepare(good)
    assert summary.path == out and load_prepared(out).feature_map == summary.feature_map
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad_file = tmp_path / "events.csv"
    bad_file.write_text("user_id,item_id,timestamp,rating\n1,10,100,4\n1,11,200,\n")
    bad = PrepareConfig(data=DataConfig(dataset="events", path=str(bad_file)), out=str(out), tracking=tracking,
                        protocol=ProtocolConfig(protocol="ratings"))
    with pytest.raises(HybridInputError, match="line 3"):
        run_prepare(bad)
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.csv", "prepared"]  # no scratch, no temp output
    # the pandas engine writes the same tables
    reference = run_prepare(PrepareConfig(**{**good.__dict__, "out": str(tmp_path / "ref"),
                                             "engine": EngineConfig(name="pandas")}))
    assert reference.path == tmp_path / "ref"
    assert_same_prepared(load_prepared(out), load_prepared(tmp_path / "ref"))


def test_run_prepare_refuses_an_unwritable_output_before_any_work(tmp_path, ml100k_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = PrepareConfig(data=DataConfig(dataset="movielens-100k", path=str(ml100k_dir)), out=str(blocker / "prepared"),
                        tracking=TrackingConfig(enabled=False))
    with pytest.raises(HybridInputError, match="a-file: cannot create the output's directory"):
        run_prepare(cfg)
    scratch_blocked = PrepareConfig(data=cfg.data, out=str(tmp_path / "prepared"), tracking=cfg.tracking,
                                    engine=EngineConfig(temp_directory=str(blocker / "scratch")))
    with pytest.raises(HybridInputError, match="cannot write the scratch directory"):
        run_prepare(scratch_blocked)
    assert not (tmp_path / "prepared").exists()
