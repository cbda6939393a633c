"""``hybrid data prepare`` refuses what later stages cannot use, in one line with exit code 2, and writes nothing:
non-finite numbers, timestamps that are no point in time, rows with extra fields, duplicate events (unless
``data.duplicates: drop``, which counts them), a time split that leaves a split empty; ``finetune`` /
``pretrain`` refuse a prepared directory whose stats show an empty split before they build a model.

Small files in the formats the readers take: ML-100K's tab-separated ``u.data``, events CSV and parquet.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hybrid.cli import EXIT_BAD_INPUT, main
from hybrid.data.protocols import ProtocolConfig, prepare
from hybrid.data.readers import read_movielens
from hybrid.data.store import save_prepared
from hybrid.data.validation import check_prepared_stats

REPO = Path(__file__).resolve().parents[1]
NO_TRACKING = ["--set", "tracking.enabled=false"]


def _events(users: int = 15, per_user: int = 8, one_time: int | None = None) -> pd.DataFrame:
    """Distinct (user, item) pairs, ratings 1-5, timestamps spread over time (or all ``one_time``)."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(1, users + 1):
        for k, item in enumerate(rng.choice(np.arange(1, 31), size=per_user, replace=False)):
            ts = one_time if one_time is not None else 880_000_000 + u * 1000 + k * 37 + int(rng.integers(0, 3000))
            rows.append((str(u), str(item), str(int(rng.integers(1, 6))), str(ts)))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])


def _u_data(tmp_path: Path, frame: pd.DataFrame, edit=None) -> Path:
    """An ML-100K directory holding ``u.data`` (user, item, rating, timestamp; tab-separated, no header).
    ``edit(lines)`` changes the text lines before they are written."""
    directory = tmp_path / "ml-100k"
    directory.mkdir()
    lines = ["\t".join(row) for row in frame[["user_id", "item_id", "rating", "timestamp"]].to_numpy()]
    if edit is not None:
        edit(lines)
    (directory / "u.data").write_text("\n".join(lines) + "\n")
    return directory


def _set(frame: pd.DataFrame, row: int, column: str, value: str) -> pd.DataFrame:
    frame = frame.copy()
    frame.loc[row, column] = value
    return frame


def _prepare(tmp_path: Path, dataset: str, path: Path, *extra: str, protocol: str = "ratings") -> list[str]:
    return ["data", "prepare", "--dataset", dataset, "--path", str(path), "--protocol", protocol,
            "--out", str(tmp_path / "prepared"), *NO_TRACKING, *extra]


def _refused(argv: list[str], capsys, tmp_path: Path) -> str:
    """Exit code 2, one line on stderr (returned without ``error: ``), and no output or temporary directory."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "prepared").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".prepared")] == []
    return err.removeprefix("error: ").rstrip("\n")


# -- the time order --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["ratings", "last-item"])
def test_all_events_at_one_timestamp_are_refused(tmp_path, capsys, protocol):
    data = _u_data(tmp_path, _events(one_time=881_250_949))
    err = _refused(_prepare(tmp_path, "movielens-100k", data, protocol=protocol), capsys, tmp_path)
    counts = ("CTR samples: 105 train / 0 validation / 0 test; pretraining sequences: 15 train / 0 eval"
              if protocol == "ratings" else
              "CTR samples: 30 train / 0 validation / 0 test; pretraining sequences: 15 train / 0 eval")
    assert err == (f"{data / 'u.data'}, column 'timestamp': all 120 events are at the same time (881250949), so the "
                   f"{protocol} protocol's time split leaves no CTR validation samples, no CTR test samples, no "
                   f"pretraining evaluation sequences ({counts}); later stages need events at different times")


def test_all_events_at_one_timestamp_in_parquet_are_refused(tmp_path, capsys):
    events = _events(one_time=881_250_949).astype({"rating": float, "timestamp": np.int64})
    events.to_parquet(tmp_path / "events.parquet")
    err = _refused(_prepare(tmp_path, "events", tmp_path / "events.parquet"), capsys, tmp_path)
    assert err.startswith(f"{tmp_path / 'events.parquet'}, column 'timestamp': all 120 events are at the same time "
                          "(881250949), so the ratings protocol's time split leaves no CTR validation samples")


# -- finite numbers ------------------------------------------------------------------------------------------------

def test_inf_rating_is_refused_in_u_data_csv_and_parquet(tmp_path, capsys):
    data = _u_data(tmp_path, _set(_events(), 4, "rating", "inf"))
    assert _refused(_prepare(tmp_path, "movielens-100k", data), capsys, tmp_path) == \
        f"{data / 'u.data'}, line 5, column 'rating': 'inf' is not a finite number"
    csv = tmp_path / "events.csv"
    _set(_events(), 4, "rating", "-inf").to_csv(csv, index=False)
    assert _refused(_prepare(tmp_path, "events", csv), capsys, tmp_path) == \
        f"{csv}, line 6, column 'rating': '-inf' is not a finite number"
    parquet = tmp_path / "events.parquet"
    _events().astype({"rating": float}).pipe(_set, 4, "rating", np.inf).to_parquet(parquet)
    assert _refused(_prepare(tmp_path, "events", parquet), capsys, tmp_path) == \
        f"{parquet}, row 5, column 'rating': 'inf' is not a finite number"


@pytest.mark.parametrize("engine", ["duckdb", "pandas"])
def test_nan_and_inf_timestamps_are_refused(tmp_path, capsys, engine):
    engine_set = ["--set", f"engine.name={engine}"]
    data = _u_data(tmp_path, _set(_events(), 4, "timestamp", "nan"))
    first = _events()["timestamp"][0]
    assert _refused(_prepare(tmp_path, "movielens-100k", data, *engine_set), capsys, tmp_path) == \
        (f"{data / 'u.data'}, line 5, column 'timestamp': cannot parse 'nan' as a timestamp "
         f"(expected unix seconds, like '{first}' in the first row)")
    csv = tmp_path / "events.csv"
    _set(_events(), 4, "timestamp", "inf").to_csv(csv, index=False)
    assert _refused(_prepare(tmp_path, "events", csv, *engine_set), capsys, tmp_path) == \
        (f"{csv}, line 6, column 'timestamp': cannot parse 'inf' as a timestamp "
         f"(expected unix seconds, like '{first}' in the first row)")
    _set(_events(), 4, "timestamp", "1e30").to_csv(csv, index=False)
    assert _refused(_prepare(tmp_path, "events", csv, *engine_set), capsys, tmp_path) == \
        f"{csv}, line 6, column 'timestamp': '1e30' is out of range for a timestamp (unix seconds, at most 1e18 in magnitude)"
    parquet = tmp_path / "events.parquet"
    events = _events().astype({"rating": float, "timestamp": float})
    events.pipe(_set, 4, "timestamp", np.nan).to_parquet(parquet)
    assert _refused(_prepare(tmp_path, "events", parquet, *engine_set), capsys, tmp_path) == \
        f"{parquet}, row 5, column 'timestamp': timestamp is empty/NaN"
    events.pipe(_set, 4, "timestamp", -np.inf).to_parquet(parquet)
    assert _refused(_prepare(tmp_path, "events", parquet, *engine_set), capsys, tmp_path) == \
        f"{parquet}, row 5, column 'timestamp': -inf is out of range for a timestamp (unix seconds, at most 1e18 in magnitude)"


# -- extra fields ------------------------------------------------------------------------------------------------

def test_rows_with_extra_fields_are_refused_naming_the_line(tmp_path, capsys):
    def extra_on(line: int):
        def edit(lines):
            lines[line - 1] += "\t9"
        return edit

    data = _u_data(tmp_path, _events(), extra_on(5))
    assert _refused(_prepare(tmp_path, "movielens-100k", data), capsys, tmp_path) == \
        f"{data / 'u.data'}: malformed file: line 5 has 5 fields, expected 4"
    (data / "u.data").unlink()
    data.rmdir()
    data = _u_data(tmp_path, _events(), extra_on(1))  # the first row: pandas would take it as an index column
    assert _refused(_prepare(tmp_path, "movielens-100k", data), capsys, tmp_path) == \
        f"{data / 'u.data'}: malformed file: line 1 has 5 fields, expected 4"
    csv = tmp_path / "events.csv"
    lines = _events().to_csv(index=False).splitlines()
    lines[6] += ",7"
    csv.write_text("\n".join(lines) + "\n")
    for engine in ("duckdb", "pandas"):
        assert _refused(_prepare(tmp_path, "events", csv, "--set", f"engine.name={engine}"), capsys, tmp_path) == \
            f"{csv}: malformed file: line 7 has 5 fields, expected 4"


# -- duplicates ----------------------------------------------------------------------------------------------------

def _with_duplicates(frame: pd.DataFrame) -> pd.DataFrame:
    """Row 4 again right after it (data row 5) and row 10 again at the end."""
    return pd.concat([frame.iloc[:5], frame.iloc[4:5], frame.iloc[5:], frame.iloc[10:11]], ignore_index=True)


@pytest.mark.parametrize("engine", ["duckdb", "pandas"])
def test_duplicate_rows_are_refused_by_default(tmp_path, capsys, engine):
    data = _u_data(tmp_path, _with_duplicates(_events()))
    advice = "Set data.duplicates: drop (--set data.duplicates=drop) to keep the first of each"
    assert _refused(_prepare(tmp_path, "movielens-100k", data, "--set", f"engine.name={engine}"), capsys, tmp_path) == \
        (f"{data / 'u.data'}, line 6: duplicate of line 5 (same user_id, item_id, timestamp, rating); 2 duplicate "
         f"rows in all. {advice}")
    csv = tmp_path / "events.csv"
    _with_duplicates(_events()).to_csv(csv, index=False)
    assert _refused(_prepare(tmp_path, "events", csv, "--set", f"engine.name={engine}"), capsys, tmp_path) == \
        (f"{csv}, line 7: duplicate of line 6 (same user_id, item_id, timestamp, rating); 2 duplicate rows in all. "
         f"{advice}")


def test_same_user_item_time_with_another_rating_is_no_duplicate(tmp_path, capsys):
    frame = _events()
    frame = pd.concat([frame, _set(frame.iloc[[3]], 3, "rating", "6")], ignore_index=True)
    assert main(_prepare(tmp_path, "movielens-100k", _u_data(tmp_path, frame))) == 0
    assert json.loads((tmp_path / "prepared" / "stats.json").read_text())["duplicates_dropped"] == 0


@pytest.mark.parametrize("engine", ["duckdb", "pandas"])
def test_duplicates_drop_keeps_the_first_and_counts_the_others(tmp_path, capsys, engine):
    data = _u_data(tmp_path, _with_duplicates(_events()))
    assert main(_prepare(tmp_path, "movielens-100k", data, "--set", "data.duplicates=drop",
                         "--set", f"engine.name={engine}")) == 0
    out = capsys.readouterr().out
    assert "dropped 2 duplicate event rows (data.duplicates: drop)" in out
    stats = json.loads((tmp_path / "prepared" / "stats.json").read_text())
    assert stats["events"] == 120 and stats["duplicates_dropped"] == 2  # events: those kept (122 rows read)
    assert list(stats)[list(stats).index("events") + 1] == "duplicates_dropped"
    # the same tables as the data without the duplicates
    clean = tmp_path / "clean"
    clean.mkdir()
    _u_data(clean, _events())
    assert main(["data", "prepare", "--dataset", "movielens-100k", "--path", str(clean / "ml-100k"), "--protocol",
                 "ratings", "--out", str(clean / "prepared"), *NO_TRACKING, "--set", f"engine.name={engine}"]) == 0
    reference = json.loads((clean / "prepared" / "stats.json").read_text())
    assert stats["data_hash"] == reference["data_hash"] and reference["duplicates_dropped"] == 0


def test_an_unknown_duplicates_mode_names_the_key(tmp_path, capsys):
    data = _u_data(tmp_path, _events())
    err = _refused(_prepare(tmp_path, "movielens-100k", data, "--set", "data.duplicates=keep"), capsys, tmp_path)
    assert "data.duplicates" in err and "'error', 'drop'" in err and "'keep'" in err


# -- a failed prepare keeps the earlier output --------------------------------------------------------------------

def test_a_refused_prepare_keeps_the_earlier_output(tmp_path, capsys):
    argv = _prepare(tmp_path, "movielens-100k", _u_data(tmp_path, _events()))
    assert main(argv) == 0
    out = tmp_path / "prepared"
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (tmp_path / "ml-100k" / "u.data").write_text((tmp_path / "ml-100k" / "u.data").read_text() * 2)
    rc = main(argv)
    assert rc == EXIT_BAD_INPUT and "duplicate of line 1" in capsys.readouterr().err
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ml-100k", "prepared"]


# -- the training jobs check the prepared stats -----------------------------------------------------------------

def _one_timestamp_dir(tmp_path: Path) -> Path:
    """What an older ``prepare`` wrote for events all at one time: no validation and no test samples."""
    data = _u_data(tmp_path, _events(one_time=881_250_949))
    return save_prepared(prepare(read_movielens(data), ProtocolConfig(protocol="ratings")), tmp_path / "old-prepared")


def test_finetune_refuses_prepared_data_without_evaluation_samples(tmp_path, capsys):
    prepared = _one_timestamp_dir(tmp_path)
    argv = ["finetune", "--config", str(REPO / "configs/finetune_tiny.yaml"), "--set", f"data={prepared}",
            "--set", f"out={tmp_path / 'o'}", *NO_TRACKING]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and err.count("\n") == 1
    assert err == (f"error: {prepared}: the prepared data has no validation samples (ctr_valid); fine-tuning selects "
                   "its checkpoint on validation: prepare it with protocol.validation_share > 0\n")
    stats = json.loads((prepared / "stats.json").read_text())
    stats["ctr_valid"]["samples"] = 3
    (prepared / "stats.json").write_text(json.dumps(stats))
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT
    assert err == (f"error: {prepared}: the prepared data has no CTR test samples (ctr_test, stats.json: samples = 0); "
                   "`hybrid finetune` needs them: prepare it again with more events at distinct times or other "
                   "protocol settings\n")
    assert not (tmp_path / "o").exists()


def test_pretrain_check_and_stats_of_an_older_version(tmp_path):
    prepared = _one_timestamp_dir(tmp_path)
    with pytest.raises(ValueError, match=r"no pretraining evaluation sequences \(pretrain_eval, stats.json: "
                                         r"sequences = 0\); `hybrid pretrain` needs them"):
        check_prepared_stats(prepared, "pretrain")
    stats = json.loads((prepared / "stats.json").read_text())
    for key in ("ctr_valid", "ctr_test", "pretrain_eval", "duplicates_dropped"):  # keys an older version lacks
        stats.pop(key, None)
    (prepared / "stats.json").write_text(json.dumps(stats))
    check_prepared_stats(prepared, "pretrain")
    check_prepared_stats(prepared, "finetune")
    (prepared / "stats.json").unlink()
    check_prepared_stats(prepared, "finetune")
