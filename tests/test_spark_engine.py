"""The Spark engine against the DuckDB engine: the same protocol SQL gives the same prepared directory.

Real ML-100K through both engines, both protocols (feature map, every table with its dtypes and row order,
the stats); ``hybrid data prepare``'s job path on Spark over a generic events CSV that Spark reads itself
(atomic output, metadata, memory-mapped columns); the native events reader's errors. One local
SparkSession (``local[2]``) serves the module.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from hybrid.core.errors import HybridInputError
from hybrid.data.duckdb_engine import EngineConfig
from hybrid.data.duckdb_engine import run_protocol as run_duckdb
from hybrid.data.duckdb_sources import load_source as load_duckdb
from hybrid.data.protocols import PreparedData, ProtocolConfig
from hybrid.data.store import load_prepared, open_prepared
from hybrid.jobs.prepare import DataConfig, PrepareConfig, run_prepare
from hybrid.tracking import TrackingConfig

pytest.importorskip("pyspark", reason="the spark extra is not installed (pip install 'hybrid-ctr[spark]')")
if shutil.which("java") is None:
    pytest.skip("no Java runtime (.ci/run installs openjdk-17-jre-headless)", allow_module_level=True)

from test_duckdb_engine import assert_same_prepared  # noqa: E402

from hybrid.data import spark_engine  # noqa: E402


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    from pyspark.sql import SparkSession

    warehouse = tmp_path_factory.mktemp("spark-warehouse")  # Spark makes one at start, in the cwd by default
    session = (SparkSession.builder.master("local[2]").appName("hybrid-tests")
               .config("spark.sql.warehouse.dir", str(warehouse))
               .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "4")
               .config("spark.sql.session.timeZone", "UTC").config("spark.sql.ansi.enabled", "false")
               .config("spark.driver.memory", "1g").getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def _read(out: Path, fm, stats) -> PreparedData:
    fm.save(out / "feature_map.json")
    prepared = load_prepared(out)
    prepared.stats = stats
    return prepared


def _both(tmp_path: Path, spark, dataset: str, path, cfg: ProtocolConfig, **options) -> tuple[PreparedData, PreparedData]:
    """(Spark's, DuckDB's) prepared data for the same input and protocol; small row groups on both, so the
    compaction of Spark's part-files crosses row-group boundaries."""
    spark_out, duck_out = tmp_path / "spark", tmp_path / "duckdb"
    spark_out.mkdir()
    duck_out.mkdir()
    db = spark_engine.SparkBackend(spark, tmp_path / "scratch", row_group_size=997)
    try:
        source = spark_engine.load_source(db, dataset, str(path), **options)
        got = _read(spark_out, *spark_engine.run_protocol(db, source, cfg, spark_out))
    finally:
        db.close()
    con = duckdb.connect()
    expected = _read(duck_out, *run_duckdb(con, load_duckdb(con, dataset, str(path), **options), cfg, duck_out, 997))
    return got, expected


@pytest.mark.parametrize("protocol", ["ratings", "last-item"])
def test_ml100k_spark_identical_to_duckdb(tmp_path, spark, ml100k_dir, protocol):
    got, expected = _both(tmp_path, spark, "movielens-100k", ml100k_dir, ProtocolConfig(protocol=protocol))
    assert_same_prepared(got, expected)
    # several row groups per table, as DuckDB writes them: the compacted file streams like DuckDB's
    import pyarrow.parquet as pq
    assert pq.ParquetFile(tmp_path / "spark" / "events.parquet").metadata.num_row_groups == 100_000 // 997 + 1
    assert got.stats["events"] == 100_000 and len(got.events) == 100_000


def test_run_prepare_on_spark_writes_the_prepared_directory(tmp_path, spark, ml100k):
    """The job path on a generic events CSV (read by Spark itself; date-time timestamps, renamed columns):
    ``engine.name: spark`` reuses the active session and writes what DuckDB writes, atomically, with the
    metadata and memory-mapped columns, and no scratch left behind; an input error keeps the earlier output."""
    events = ml100k.events.iloc[:5000]
    frame = pd.DataFrame({"uid": events["user_id"], "iid": events["item_id"], "score": events["rating"],
                          "when": pd.to_datetime(events["timestamp"], unit="s").dt.strftime("%Y-%m-%d %H:%M:%S")})
    frame.to_csv(tmp_path / "log.csv", index=False)
    out = tmp_path / "prepared"
    data = DataConfig(dataset="events", path=str(tmp_path / "log.csv"),
                      columns={"user_id": "uid", "item_id": "iid", "timestamp": "when", "rating": "score"})
    cfg = PrepareConfig(data=data, protocol=ProtocolConfig(protocol="last-item", max_history=7, seed=3),
                        engine=EngineConfig(name="spark"), out=str(out), tracking=TrackingConfig(enabled=False))
    summary = run_prepare(cfg)
    reference = run_prepare(PrepareConfig(**{**cfg.__dict__, "out": str(tmp_path / "ref"),
                                             "engine": EngineConfig(name="duckdb")}))
    assert_same_prepared(load_prepared(out), load_prepared(reference.path))
    assert summary.stats["data_hash"] == load_prepared(out).stats["data_hash"]
    assert len(open_prepared(out).ctr_train) == len(load_prepared(out).ctr_train) > 0
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = tmp_path / "events.csv"
    bad.write_text("user_id,item_id\n1,10\n")
    with pytest.raises(HybridInputError, match="missing required column"):
        run_prepare(PrepareConfig(**{**cfg.__dict__, "data": DataConfig(dataset="events", path=str(bad))}))
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.csv", "log.csv", "prepared", "ref"]


BAD_EVENTS = {
    "missing column": ("user_id,item_id\n1,10\n", "missing required column 'timestamp'; columns present: user_id, item_id"),
    "empty id": ("user_id,item_id,timestamp\n1,10,100\n2,12,150\n,11,200\n", "line 4, column 'user_id': empty value"),
    "text rating": ("user_id,item_id,timestamp,rating\n1,10,100,4\n1,11,200,good\n",
                    "line 3, column 'rating': cannot parse 'good' as a number"),
    "extra field": ("user_id,item_id,timestamp\n1,10,100\n1,11,200,7\n", "malformed file"),
}


@pytest.mark.parametrize("case", list(BAD_EVENTS))
def test_native_reader_errors_name_the_file_line_and_column(tmp_path, spark, case):
    text, message = BAD_EVENTS[case]
    path = tmp_path / "events.csv"
    path.write_text(text)
    db = spark_engine.SparkBackend(spark, tmp_path / "scratch")
    try:
        with pytest.raises(HybridInputError) as caught:
            source = spark_engine.load_source(db, "events", str(path))
            spark_engine.run_protocol(db, source, ProtocolConfig(protocol="ratings"), tmp_path)
    finally:
        db.close()
    assert str(path) in str(caught.value) and message in str(caught.value), str(caught.value)


def test_missing_pyspark_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyspark(name, *args, **kwargs):
        if name == "pyspark" or name.startswith("pyspark."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyspark)
    with pytest.raises(HybridInputError, match=r"pip install 'hybrid-ctr\[spark\]'"):
        spark_engine.spark_session(EngineConfig(name="spark"))
