"""Other people's data (issue 15 item 4): "one line per user" sequence files (``dataset: sequences``),
``data.nrows`` (a quick look at the first rows) and ``data.name`` (the dataset's name in stats and MLflow).

Small files written in ``tmp_path``; the out-of-core DuckDB engine is checked against the pandas reference
(the same prepared tables, feature map and stats), as in ``test_duckdb_engine.py``.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hybrid.cli import EXIT_BAD_INPUT, main
from hybrid.data.duckdb_engine import EngineConfig
from hybrid.data.protocols import PreparedData, ProtocolConfig
from hybrid.data.readers import PositionalTimeWarning, read_dataset
from hybrid.data.store import load_prepared
from hybrid.jobs.prepare import DataConfig, PrepareConfig, run_prepare
from hybrid.tracking import TrackingConfig

NO_TRACKING = TrackingConfig(enabled=False)


def _sequences(path: Path, timed: bool, users: int = 120, seed: int = 0, tabs: bool = False) -> Path:
    """Users with 2-25 items (Zipf-ish, repeats allowed), not in id order; ``timed``: ``item:ts`` with ties
    within and across users; a blank line and ragged whitespace in between."""
    rng = np.random.default_rng(seed)
    lines = []
    for u in rng.permutation(users) * 13 + 7:
        n = int(rng.integers(2, 26))
        items = (rng.zipf(1.4, size=n) % 150) * 3 + 1
        if timed:
            times = 1_600_000_000 + np.sort(rng.integers(0, 400, size=n)) * 60
            fields = [f"i{i}:{t}" for i, t in zip(items, times)]
        else:
            fields = [f"i{i}" for i in items]
        lines.append((" \t" if tabs else " ").join([f"u{u}", *fields]))
    lines.insert(len(lines) // 2, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def _prepare(tmp_path: Path, data: DataConfig, engine: str, protocol: str = "last-item", tag: str = "") -> Path:
    out = tmp_path / f"prepared-{engine}{tag}"
    run_prepare(PrepareConfig(data=data, protocol=ProtocolConfig(protocol=protocol), out=str(out),
                              tracking=NO_TRACKING, engine=EngineConfig(name=engine, memory_limit="1GB", threads=1)))
    return out


def assert_same_prepared(got: PreparedData, expected: PreparedData) -> None:
    assert got.feature_map.to_dict() == expected.feature_map.to_dict()
    for name in PreparedData.TABLES:
        pd.testing.assert_frame_equal(getattr(got, name), getattr(expected, name), check_dtype=True, obj=name)
    strip = ("prepare_seconds", "data_hash")  # the parquet bytes differ between writers, not the rows
    assert [(k, v) for k, v in got.stats.items() if k not in strip] == \
        [(k, v) for k, v in expected.stats.items() if k not in strip]


def _both_engines(tmp_path: Path, data: DataConfig, protocol: str = "last-item") -> tuple[PreparedData, PreparedData]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PositionalTimeWarning)
        duck = load_prepared(_prepare(tmp_path, data, "duckdb", protocol))
        reference = load_prepared(_prepare(tmp_path, data, "pandas", protocol))
    return duck, reference


# -- sequence files ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("timed", [True, False], ids=["item:ts", "positions"])
def test_sequences_identical_on_both_engines(tmp_path, timed):
    path = _sequences(tmp_path / "Beauty.txt", timed, tabs=not timed)
    items = tmp_path / "items.csv"
    pd.DataFrame({"item_id": [f"i{3 * k + 1}" for k in range(150)],
                  "genres": [f"g{k % 7}|g{k % 3}" for k in range(150)]}).to_csv(items, index=False)
    data = DataConfig(dataset="sequences", path=str(path), items_path=str(items) if timed else None,
                      duplicates="drop")  # the timed file repeats an item at the same second
    duck, reference = _both_engines(tmp_path, data)
    assert_same_prepared(duck, reference)
    assert duck.stats["dataset"] == "Beauty" and duck.stats["users"] == 120
    events = read_dataset("sequences", path).events
    assert duck.stats["events"] == len(events) - duck.stats["duplicates_dropped"]
    if not timed:  # the time of an event is its position in the line
        first = path.read_text().splitlines()[0].split()
        assert events["item_id"].iloc[:len(first) - 1].tolist() == first[1:]
        assert events["timestamp"].iloc[:len(first) - 1].tolist() == list(range(1, len(first)))


def test_sequences_without_timestamps_warn_once_with_timestamps_not(tmp_path):
    plain = _sequences(tmp_path / "plain.txt", timed=False, users=30)
    timed = _sequences(tmp_path / "timed.txt", timed=True, users=30)
    for engine in ("duckdb", "pandas"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _prepare(tmp_path, DataConfig(dataset="sequences", path=str(plain)), engine)
        said = [w for w in caught if issubclass(w.category, PositionalTimeWarning)]
        assert len(said) == 1, [str(w.message) for w in caught]
        assert str(said[0].message).startswith(f"{plain}: no timestamps in the sequence file")
        assert "by history length" in str(said[0].message)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _prepare(tmp_path, DataConfig(dataset="sequences", path=str(timed), duplicates="drop"), engine,
                     tag="-timed")
        assert not [w for w in caught if issubclass(w.category, PositionalTimeWarning)]


BAD_LINES = {
    "no items": ("u1 a b\nu2\nu3 c\n", "line 2: user 'u2' has no items; each line is 'user item item ...'"),
    "malformed item:ts": ("u1 a:100 b:200\nu2 c:300 d:x\n",
                          "line 2, item 2: 'd:x' is not item:timestamp (unix seconds); the file's first item has a "
                          "timestamp, so every item needs one"),
    "missing ts": ("u1 a:100\nu2 c\n", "line 2, item 1: 'c' is not item:timestamp"),
    "ts in a plain file": ("u1 a b\nu2 c d:5\n", "line 2, item 2: 'd:5' looks like item:timestamp, but the file's "
                                                 "first item has none"),
    "user twice": ("u1 a b\n\nu2 c\nu1 d\n", "line 4: user 'u1' already has a line (line 1); a sequence file has one "
                                             "line per user"),
}


@pytest.mark.parametrize("engine", ["duckdb", "pandas"])
@pytest.mark.parametrize("case", list(BAD_LINES))
def test_a_bad_line_is_one_error_line_naming_file_and_line(tmp_path, capsys, engine, case):
    text, message = BAD_LINES[case]
    path = tmp_path / "seq.txt"
    path.write_text(text)
    rc = main(["data", "prepare", "--dataset", "sequences", "--path", str(path), "--protocol", "last-item",
               "--out", str(tmp_path / "prepared"), "--set", "tracking.enabled=false", "--set", f"engine.name={engine}"])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {path}, {message}"), err
    assert not (tmp_path / "prepared").exists()


def test_sequences_refuse_the_ratings_protocol_and_columns(tmp_path):
    path = _sequences(tmp_path / "s.txt", timed=True, users=10)
    from hybrid.core.errors import HybridInputError

    for engine in ("duckdb", "pandas"):
        with pytest.raises(HybridInputError, match="ratings' needs a 'rating' column"):
            _prepare(tmp_path, DataConfig(dataset="sequences", path=str(path), duplicates="drop"), engine,
                     protocol="ratings")
        with pytest.raises(HybridInputError, match="dataset 'sequences' does not take option 'columns'"):
            _prepare(tmp_path, DataConfig(dataset="sequences", path=str(path), columns={"user_id": "u"}), engine)


def test_a_history_longer_than_duckdbs_default_line_limit_is_read(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("u1 " + " ".join(f"item{i}:{1_600_000_000 + i}" for i in range(150_000)) + "\nu2 a:1 b:2\n")
    assert path.stat().st_size > 2 * 1024 * 1024  # DuckDB's default max_line_size
    import duckdb

    from hybrid.data.duckdb_sources import load_source

    con = duckdb.connect()
    load_source(con, "sequences", str(path))
    assert con.execute("SELECT count(*), max(timestamp) FROM raw_events").fetchone() == (150_002, 1_600_149_999)
    assert len(read_dataset("sequences", path).events) == 150_002

# -- data.nrows -------------------------------------------------------------------------------------------------------

def _events_frame(users: int = 40, per_user: int = 10) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = [(f"u{u}", f"i{int(rng.integers(0, 60))}", 1_500_000_000 + int(rng.integers(0, 10_000)) * 7,
             float(rng.integers(1, 6))) for u in range(users) for _ in range(per_user)]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])


def test_nrows_reads_only_the_first_rows_on_both_engines(tmp_path):
    frame = _events_frame()
    csv = tmp_path / "clicks.csv"
    frame.to_csv(csv, index=False)
    with open(csv, "a") as handle:  # a malformed row past the first 300: never read
        handle.write("u1,i1,1500000000,4,extra\n")
    frame.to_parquet(tmp_path / "clicks.parquet", index=False)
    taobao = tmp_path / "UserBehavior.csv"
    taobao.write_text("".join(f"{u},{i},{int(i) % 5},pv,{t}\n" for u, i, t in
                              zip(frame["user_id"].str[1:], frame["item_id"].str[1:], frame["timestamp"])) + "x,,,,\n")
    seqs = _sequences(tmp_path / "seqs.txt", timed=True, users=60)
    with open(seqs, "a") as handle:
        handle.write("u999\n")  # a bad line past the first 40: never read
    for dataset, path, protocol, events in (("events", csv, "ratings", 300), ("events", tmp_path / "clicks.parquet",
                                                                             "ratings", 300),
                                            ("taobao", taobao, "last-item", 300)):
        duck, reference = _both_engines(tmp_path, DataConfig(dataset=dataset, path=str(path), nrows=300), protocol)
        assert_same_prepared(duck, reference)
        assert duck.stats["events"] == events and duck.stats["nrows"] == 300
        assert list(duck.stats)[:4] == ["dataset", "source", "nrows", "protocol"]
    duck, reference = _both_engines(tmp_path, DataConfig(dataset="sequences", path=str(seqs), nrows=40,
                                                                 duplicates="drop"))
    assert_same_prepared(duck, reference)
    lines = [line for line in seqs.read_text().splitlines()[:40] if line]
    assert duck.stats["users"] == len(lines) and duck.stats["nrows"] == 40
    assert duck.stats["events"] + duck.stats["duplicates_dropped"] == sum(len(line.split()) - 1 for line in lines)
    with warnings.catch_warnings():  # without nrows the bad lines are found
        warnings.simplefilter("ignore", PositionalTimeWarning)
        assert main(["data", "prepare", "--dataset", "sequences", "--path", str(seqs), "--protocol", "last-item",
                     "--out", str(tmp_path / "p"), "--set", "tracking.enabled=false"]) == EXIT_BAD_INPUT


def test_nrows_on_a_file_read_whole_keeps_the_first_events_and_is_set_from_the_cli(tmp_path, capsys):
    directory = tmp_path / "ml-100k"
    directory.mkdir()
    frame = _events_frame()
    (directory / "u.data").write_text("".join(f"{u[1:]}\t{i[1:]}\t{int(r)}\t{t}\n" for u, i, t, r in
                                              frame.itertuples(index=False)))
    duck, reference = _both_engines(tmp_path, DataConfig(dataset="movielens-100k", path=str(directory), nrows=250),
                                    "ratings")
    assert_same_prepared(duck, reference)
    assert duck.stats["events"] == 250 and duck.stats["nrows"] == 250
    out = tmp_path / "cli"
    assert main(["data", "prepare", "--dataset", "movielens-100k", "--path", str(directory), "--protocol", "ratings",
                 "--out", str(out), "--set", "tracking.enabled=false", "--set", "data.nrows=250"]) == 0
    assert json.loads((out / "stats.json").read_text())["nrows"] == 250
    capsys.readouterr()
    assert main(["data", "prepare", "--dataset", "movielens-100k", "--path", str(directory), "--protocol", "ratings",
                 "--out", str(tmp_path / "bad"), "--set", "tracking.enabled=false", "--set", "data.nrows=0"]) \
        == EXIT_BAD_INPUT
    assert "data.nrows must be a whole number >= 1" in capsys.readouterr().err


# -- data.name ---------------------------------------------------------------------------------------------------------

class _Recorder:
    """The tracker calls of ``run_prepare``: the run's tags and the dataset name MLflow gets."""

    def __init__(self):
        self.tags, self.datasets = {}, []

    @contextlib.contextmanager
    def run(self, name, parent=None, tags=None):
        self.tags.update(tags or {})
        yield "run"

    def log_params(self, run, params): pass

    def set_tags(self, run, tags): self.tags.update(tags)

    def log_metrics(self, run, metrics, step): pass

    def log_json(self, run, data, file_name): pass

    def log_prepared_data(self, run, directory, stats, tables=None, digest=None):
        self.datasets.append(f"{stats['dataset']}/{stats['protocol']}")  # the name Tracker.log_prepared_data gives


@pytest.mark.parametrize("engine", ["duckdb", "pandas"])
def test_data_name_names_the_dataset_in_stats_feature_map_and_mlflow(tmp_path, engine):
    csv = tmp_path / "clicks.csv"
    _events_frame().to_csv(csv, index=False)
    for name, expected in ((None, "clicks"), ("shop-clicks-2024", "shop-clicks-2024")):
        out = tmp_path / f"{engine}-{expected}"
        recorder = _Recorder()
        summary = run_prepare(PrepareConfig(data=DataConfig(dataset="events", path=str(csv), name=name),
                                            protocol=ProtocolConfig(protocol="ratings"), out=str(out),
                                            engine=EngineConfig(name=engine, threads=1)), tracker=recorder)
        assert summary.stats["dataset"] == expected
        assert json.loads((out / "stats.json").read_text())["dataset"] == expected
        assert summary.feature_map.metadata["dataset"] == expected
        assert recorder.tags["dataset"] == expected and recorder.datasets == [f"{expected}/ratings"]
    with pytest.raises(ValueError, match="data.name must be a non-empty name without '/'"):
        DataConfig(dataset="events", path=str(csv), name="a/b")


# -- evaluation / checkpoint cadence per epoch ---------------------------------------------------------------------

def test_per_epoch_positions_and_config_checks():
    from hybrid.core.training import per_epoch_positions
    from hybrid.ctr_models.trainer import CTRTrainConfig
    from hybrid.pretrain import PretrainTrainConfig

    assert sorted(per_epoch_positions(9, 3)) == [3, 6, 9] and sorted(per_epoch_positions(10, 4)) == [3, 5, 8, 10]
    assert sorted(per_epoch_positions(2, 5)) == [1, 2] and per_epoch_positions(7, 0) == frozenset()
    for make, name in ((CTRTrainConfig, "evals_per_epoch"), (PretrainTrainConfig, "evals_per_epoch"),
                       (PretrainTrainConfig, "checkpoints_per_epoch")):
        with pytest.raises(ValueError, match=f"train.{name} must be an integer >= 0"):
            make(**{name: -1})


@pytest.fixture(scope="module")
def sequence_prepared(tmp_path_factory):
    """ML-sized nothing: 120 users of a timed sequence file, prepared with last-item (pandas engine)."""
    tmp = tmp_path_factory.mktemp("seq")
    path = _sequences(tmp / "seqs.txt", timed=True)
    out = _prepare(tmp, DataConfig(dataset="sequences", path=str(path), duplicates="drop"), "pandas")
    return load_prepared(out)


def test_ctr_evals_per_epoch_evaluates_evenly_inside_each_epoch(sequence_prepared):
    import torch

    from hybrid.core.training import OptimConfig
    from hybrid.ctr_models import build_ranker
    from hybrid.ctr_models.trainer import CTRTrainConfig, prepare_for_training, train
    from hybrid.data.batching import CTRBatchConverter, make_loader

    prepared = sequence_prepared
    cfg = CTRTrainConfig(epochs=2, batch_size=16, eval_batch_size=64, eval_every=2, evals_per_epoch=3, max_history=8,
                         log_every=100, progress=False, optim=OptimConfig(lr=1e-3, warmup_steps=0))
    torch.manual_seed(0)
    model = build_ranker("dcn_v2", {"features": {"embedding_dim": 8, "max_len": 8}, "history": {"attention_hidden": [8]},
                                    "num_cross_layers": 1, "deep_hidden": [16]},
                         prepared.feature_map.vocab_sizes(), ("click",))
    model = prepare_for_training(model, cfg.optim)
    fields = list(model.spec.kjt_keys)
    train_loader = make_loader(CTRBatchConverter(prepared, "ctr_train", max_history=8, fields=fields,
                                                 task_names=("click",)), cfg.batch_size, shuffle=True, seed=0)
    valid_loader = make_loader(CTRBatchConverter(prepared, "ctr_valid", max_history=8, fields=fields,
                                                 task_names=("click",)), cfg.eval_batch_size, shuffle=False)
    steps = len(train_loader)
    result = train(model, train_loader, valid_loader, cfg)
    per_epoch = sorted(per_epoch_positions_of(steps, 3))
    assert [e.step for e in result.evaluations] == [*per_epoch, *(steps + p for p in per_epoch)]  # eval_every ignored


def per_epoch_positions_of(steps: int, n: int):
    from hybrid.core.training import per_epoch_positions

    return per_epoch_positions(steps, n)


def test_pretrain_evals_and_checkpoints_per_epoch(sequence_prepared, tmp_path):
    from hybrid.core.backbones import BackboneConfig
    from hybrid.core.checkpoint import latest_checkpoint
    from hybrid.core.training import OptimConfig
    from hybrid.data.batching import SequenceBatchConverter, make_loader
    from hybrid.pretrain import GenerativeModelConfig, ObjectiveConfig, PretrainTrainConfig, build_model, train

    prepared = sequence_prepared
    cfg = PretrainTrainConfig(epochs=2, batch_size=16, eval_batch_size=64, max_len=16, eval_every=1000,
                              checkpoint_every=1, evals_per_epoch=2, checkpoints_per_epoch=1, keep_last=10,
                              log_every=100, progress=False, optim=OptimConfig(lr=1e-3, warmup_steps=0))
    backbone = BackboneConfig.from_size("L1H8A2", kind="llama", max_len=16)
    config = GenerativeModelConfig(backbone=backbone, features=("item_id",),
                                   objective=ObjectiveConfig(num_negatives=8, category_loss_weight=0))
    model = build_model(config, prepared.feature_map.vocab_sizes(), cfg.optim, seed=0)
    train_loader = make_loader(SequenceBatchConverter(prepared, "pretrain_train", 16, ("item_id",)), 16, shuffle=True,
                               seed=0)
    eval_loader = make_loader(SequenceBatchConverter(prepared, "pretrain_eval", 16, ("item_id",)), 64, shuffle=False)
    steps = len(train_loader)
    result = train(model, train_loader, eval_loader, cfg, checkpoint_dir=tmp_path)
    half = sorted(per_epoch_positions_of(steps, 2))
    assert [s for s, _ in result.evaluations] == [*half, *(steps + p for p in half)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-")) == \
        [f"step-{steps:08d}", f"step-{2 * steps:08d}"]  # once an epoch, not every step
    assert latest_checkpoint(tmp_path) == tmp_path / f"step-{2 * steps:08d}"
