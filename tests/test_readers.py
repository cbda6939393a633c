"""Readers: real MovieLens facts, RecBole/Taobao/generic formats, and one clear error per bad input."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from hybrid.core.errors import HybridInputError
from hybrid.data.fetch import (
    ML100K_MD5,
    FetchError,
    fetch_movielens_100k,
    find_shared_data,
)
from hybrid.data.readers import (
    read_dataset,
    read_events_table,
    read_movielens,
    read_recbole,
    read_taobao,
)
from hybrid.data.schema import EVENT_COLUMNS, ITEM_COLUMNS, USER_COLUMNS

# ------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def ml100k_dir(tmp_path_factory) -> Path:
    """Real ML-100K via the fetch path: shared copy if there is one, else the recbole wheel from PyPI."""
    try:
        return fetch_movielens_100k(tmp_path_factory.mktemp("ml-100k"))
    except FetchError as exc:
        pytest.skip(f"no ML-100K available: {exc}")


@pytest.fixture(scope="module")
def ml100k(ml100k_dir):
    return read_movielens(ml100k_dir)


@pytest.fixture(scope="module")
def ml1m_dir() -> Path:
    path = find_shared_data("ml-1m-partial")
    if path is None:
        pytest.skip("shared/data/ml-1m-partial not found next to the repository")
    return path


def _assert_schema(ds) -> None:
    """Canonical columns and dtypes (ids: object holding str)."""
    assert tuple(ds.events.columns[:3]) == EVENT_COLUMNS
    assert ds.events["user_id"].dtype == object and ds.events["item_id"].dtype == object
    assert ds.events["timestamp"].dtype == "int64"
    if "rating" in ds.events:
        assert ds.events["rating"].dtype == "float64"
    if ds.items is not None:
        assert tuple(ds.items.columns) == ITEM_COLUMNS
        assert ds.items["item_id"].is_unique
        assert all(dtype == object for dtype in ds.items.dtypes)  # noqa: E721
    if ds.users is not None:
        assert tuple(ds.users.columns) == USER_COLUMNS
        assert ds.users["user_id"].is_unique
        assert all(dtype == object for dtype in ds.users.dtypes)  # noqa: E721


def test_ml100k_counts(ml100k):
    ds = ml100k
    _assert_schema(ds)
    assert ds.name == "movielens-100k"
    assert len(ds.events) == 100_000
    assert ds.events["user_id"].nunique() == 943
    assert ds.events["item_id"].nunique() == 1682
    assert len(ds.items) == 1682 and len(ds.users) == 943
    assert set(ds.events["rating"].unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    first = ds.events.iloc[0]
    assert (first["user_id"], first["item_id"], first["timestamp"]) == ("196", "242", 881250949)
    # 1997-09-20 .. 1998-04-22
    assert ds.events["timestamp"].min() == 874724710 and ds.events["timestamp"].max() == 893286638


def test_ml100k_md5(ml100k_dir):
    record = json.loads((ml100k_dir / "SOURCE.json").read_text())
    if record["layout"] != "movielens":
        pytest.skip("fetched from the recbole wheel, which has no u.data")
    assert record["ratings_md5"] == ML100K_MD5
    assert record["matches_known_md5"] is True


def test_ml100k_items_and_users(ml100k):
    items = ml100k.items.set_index("item_id")
    assert items.loc["1"].tolist() == ["Toy Story", "Animation|Children's|Comedy", "1995"]
    assert items.loc["543", "title"] == "Misérables, Les"  # Latin-1 (or RecBole's UTF-8) decoded
    assert items.loc["1005", "title"] == "Double vie de Véronique, La (Double Life of Veronique, The)"
    assert items.loc["267", "genres"] == "unknown" and items.loc["267", "year"] == "unknown"
    assert items["year"].str.fullmatch(r"\d{4}|unknown").all()
    assert ml100k.users.set_index("user_id").loc["1"].tolist() == ["M", "24", "technician", "85711"]


def test_ml1m_partial(ml1m_dir):
    start = time.perf_counter()
    ds = read_movielens(ml1m_dir)
    seconds = time.perf_counter() - start
    print(f"read ml-1m-partial in {seconds:.3f} s")
    assert seconds < 2.0
    _assert_schema(ds)
    assert ds.name == "movielens-1m"
    assert len(ds.events) == 487_650
    assert ds.events["user_id"].nunique() == 2999 and ds.events["item_id"].nunique() == 3615
    assert len(ds.items) == 3883 and len(ds.users) == 6040
    assert pd.to_datetime(ds.events["timestamp"].min(), unit="s").strftime("%Y-%m-%d") == "2000-10-04"
    assert pd.to_datetime(ds.events["timestamp"].max(), unit="s").strftime("%Y-%m-%d") == "2003-02-27"
    items = ds.items.set_index("item_id")
    assert items.loc["1"].tolist() == ["Toy Story", "Animation|Children's|Comedy", "1995"]
    assert items.loc["73", "title"] == "Misérables, Les"  # é from Latin-1 byte 0xE9
    assert items.loc["582", "title"] == "Metisse (Café au Lait)"  # inner parentheses kept
    assert items["year"].str.fullmatch(r"\d{4}").all()
    assert ds.users.set_index("user_id").loc["1"].tolist() == ["F", "1", "10", "48067"]


def test_read_dataset_dispatch_real(ml100k_dir, ml1m_dir):
    assert read_dataset("ml-100k", ml100k_dir).name == "movielens-100k"
    assert read_dataset("movielens-1m", ml1m_dir).name == "movielens-1m"
    with pytest.raises(HybridInputError, match="holds movielens-1m, not movielens-100k"):
        read_dataset("ml-100k", ml1m_dir)


# ------------------------------------------------------------------------------------------- small files


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def _ml100k_dir(tmp_path: Path, u_data: str) -> Path:
    _write(tmp_path / "u.data", u_data)
    return tmp_path


def _match(*parts: str) -> str:
    """A regex that needs every part, in order."""
    import re

    return ".*".join(re.escape(p) for p in parts)


def test_ml100k_small_items_genres_latin1(tmp_path):
    _write(tmp_path / "u.data", "1\t10\t4\t881250949\n2\t11\t5\t881250950\n")
    _write(tmp_path / "u.genre", "unknown|0\nAction|1\nDrama|2\n\n")
    _write(
        tmp_path / "u.item",
        '10|Misérables, Les (1995)|01-Jan-1995||http://x|0|1|1\n11|"Quoted" Title|||http://y|1|0|0\n',
        encoding="latin-1",
    )
    ds = read_movielens(tmp_path)
    assert ds.users is None
    assert ds.items.to_dict("list") == {
        "item_id": ["10", "11"],
        "title": ["Misérables, Les", '"Quoted" Title'],
        "genres": ["Action|Drama", "unknown"],
        "year": ["1995", "unknown"],
    }


def test_ml1m_small_multiple_rating_files(tmp_path):
    _write(tmp_path / "ratings_a.dat", "1::10::5::978300760\n")
    _write(tmp_path / "ratings_b.dat", "2::10::3::978300761\n")
    _write(tmp_path / "movies.dat", "10::Star Wars: Episode IV - A New Hope (1977)::Action|Sci-Fi\n")
    ds = read_movielens(tmp_path)
    assert ds.events["user_id"].tolist() == ["1", "2"]
    assert ds.items.iloc[0].tolist() == ["10", "Star Wars: Episode IV - A New Hope", "Action|Sci-Fi", "1977"]


def test_missing_directory_and_file(tmp_path):
    with pytest.raises(HybridInputError, match=_match(str(tmp_path / "nope"), "does not exist")):
        read_movielens(tmp_path / "nope")
    with pytest.raises(HybridInputError, match=_match(str(tmp_path), "no MovieLens ratings found")):
        read_movielens(tmp_path)
    with pytest.raises(HybridInputError, match=_match(str(tmp_path / "x.csv"), "does not exist")):
        read_events_table(tmp_path / "x.csv")
    with pytest.raises(HybridInputError, match=_match(str(tmp_path / "UserBehavior.csv"), "does not exist")):
        read_taobao(tmp_path)


def test_non_numeric_timestamp_names_file_line_column(tmp_path):
    _ml100k_dir(tmp_path, "1\t10\t4\t881250949\n2\t11\t5\t881250950\n3\t12\t5\tabc\n")
    with pytest.raises(HybridInputError) as info:
        read_movielens(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'u.data'}, line 3, column 'timestamp'")
    assert "'abc'" in message and "\n" not in message


def test_blank_line_keeps_line_numbers(tmp_path):
    _ml100k_dir(tmp_path, "1\t10\t4\t881250949\n\n3\t\t5\t881250950\n")
    with pytest.raises(HybridInputError, match=_match("u.data, line 3, column 'item_id'", "empty")):
        read_movielens(tmp_path)


def test_empty_item_id_and_nan_rating(tmp_path):
    _ml100k_dir(tmp_path, "1\t10\t4\t881250949\n2\t\t5\t881250950\n")
    with pytest.raises(HybridInputError, match=_match("u.data, line 2, column 'item_id'", "empty")):
        read_movielens(tmp_path)
    _ml100k_dir(tmp_path, "1\t10\t4\t881250949\n2\t11\tNaN\t881250950\n")
    with pytest.raises(HybridInputError, match=_match("u.data, line 2, column 'rating'", "empty/NaN")):
        read_movielens(tmp_path)
    _ml100k_dir(tmp_path, "1\t10\tgood\t881250949\n")
    with pytest.raises(HybridInputError, match=_match("u.data, line 1, column 'rating'", "'good'")):
        read_movielens(tmp_path)


def test_too_many_fields_is_reported(tmp_path):
    _ml100k_dir(tmp_path, "1\t10\t4\t881250949\n2\t11\t5\t881250950\t9\n")
    with pytest.raises(HybridInputError, match=_match("u.data: malformed file", "line 2")):
        read_movielens(tmp_path)


def test_ml1m_bad_timestamp_in_double_colon_file(tmp_path):
    _write(tmp_path / "ratings.dat", "1::10::5::978300760\n1::11::5::97830x\n")
    with pytest.raises(HybridInputError, match=_match("ratings.dat, line 2, column 'timestamp'", "'97830x'")):
        read_movielens(tmp_path)


def test_duplicate_item_id(tmp_path):
    _write(tmp_path / "ratings.dat", "1::10::5::978300760\n")
    _write(tmp_path / "movies.dat", "10::A (1990)::Drama\n10::B (1991)::Drama\n")
    with pytest.raises(HybridInputError, match=_match("movies.dat", "duplicate item_id '10'")):
        read_movielens(tmp_path)


# ------------------------------------------------------------------------------------------- RecBole


def _recbole_dir(tmp_path: Path) -> Path:
    _write(
        tmp_path / "toy.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\textra:token\n"
        "1\t10\t4\t881250949\tx\n2\t11\t3.5\t881250950.0\ty\n",
    )
    _write(
        tmp_path / "toy.item",
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "10\tMisérables, Les\t1995\tDrama Musical\n11\tunkonwn\tunkonwn\tunknown\n",
    )
    _write(
        tmp_path / "toy.user",
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n1\t24\tM\twriter\t00501\n",
    )
    return tmp_path


def test_recbole_fields_mapped(tmp_path):
    ds = read_recbole(_recbole_dir(tmp_path))  # name found from the one *.inter
    _assert_schema(ds)
    assert ds.name == "toy"
    assert ds.events.columns.tolist() == ["user_id", "item_id", "timestamp", "rating"]  # extra left out
    assert ds.events["timestamp"].tolist() == [881250949, 881250950]
    assert ds.events["rating"].tolist() == [4.0, 3.5]
    assert ds.items.to_dict("list") == {
        "item_id": ["10", "11"],
        "title": ["Misérables, Les", "unkonwn"],
        "genres": ["Drama|Musical", "unknown"],
        "year": ["1995", "unknown"],
    }
    assert ds.users.iloc[0].tolist() == ["1", "M", "24", "writer", "00501"]  # zip keeps its leading zeros
    assert read_dataset("recbole", tmp_path / "toy.inter").name == "toy"


def test_recbole_missing_column_and_bad_value(tmp_path):
    _write(tmp_path / "toy.inter", "user_id:token\titem_id:token\trating:float\n1\t10\t4\n")
    with pytest.raises(HybridInputError, match=_match("toy.inter", "missing required column 'timestamp'")):
        read_recbole(tmp_path, "toy")
    _write(tmp_path / "toy.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t10\t5\n2\t11\tsoon\n")
    with pytest.raises(HybridInputError, match=_match("toy.inter, line 3, column 'timestamp:float' (timestamp)")):
        read_recbole(tmp_path, "toy")
    with pytest.raises(HybridInputError, match=_match("other.inter", "does not exist")):
        read_recbole(tmp_path, "other")


# ------------------------------------------------------------------------------------------- Taobao


def test_taobao(tmp_path):
    path = _write(
        tmp_path / "UserBehavior.csv",
        "1,2268318,2520377,pv,1511544070\n1,2333346,2520771,pv,1511561733\n"
        "2,2268318,2520377,buy,1511572885\n3,9,7,cart,1511600000\n",
    )
    ds = read_taobao(path)
    _assert_schema(ds)
    assert ds.name == "taobao" and ds.users is None
    assert ds.events.columns.tolist() == ["user_id", "item_id", "timestamp", "behavior"]
    assert ds.events["behavior"].tolist() == ["pv", "pv", "buy", "cart"]
    assert ds.items.to_dict("list") == {
        "item_id": ["2268318", "2333346", "9"],
        "title": ["", "", ""],
        "genres": ["2520377", "2520771", "7"],
        "year": ["unknown"] * 3,
    }
    assert len(read_dataset("taobao", tmp_path, nrows=2).events) == 2
    _write(path, "1,2,3,pv,1511544070\n1,2,3,,1511544071\n")
    with pytest.raises(HybridInputError, match=_match("UserBehavior.csv, line 2, column 'behavior_type'")):
        read_taobao(path)


# ------------------------------------------------------------------------------------------- generic


def test_events_csv_with_mapping_and_datetimes(tmp_path):
    path = _write(
        tmp_path / "log.csv",
        "uid,iid,ts,score,note\nu1,7,2020-01-01 00:00:00,1.5,a\nu2,8,2020-01-01 00:00:10,2,b\n",
    )
    ds = read_events_table(path, columns={"user_id": "uid", "item_id": "iid", "timestamp": "ts", "rating": "score"})
    _assert_schema(ds)
    assert ds.events.to_dict("list") == {
        "user_id": ["u1", "u2"],
        "item_id": ["7", "8"],
        "timestamp": [1577836800, 1577836810],
        "rating": [1.5, 2.0],
    }


def test_events_csv_errors(tmp_path):
    columns = {"user_id": "uid", "item_id": "iid", "timestamp": "ts"}
    path = _write(tmp_path / "log.csv", "uid,iid\nu1,7\n")
    with pytest.raises(HybridInputError, match=_match("log.csv", "missing required column 'ts' (timestamp)")):
        read_events_table(path, columns=columns)
    path = _write(tmp_path / "log.csv", "uid,iid,ts\nu1,7,100\nu2,8,200\nu3,9,three hundred\n")
    with pytest.raises(HybridInputError, match=_match("log.csv, line 4, column 'ts' (timestamp)", "'three hundred'")):
        read_events_table(path, columns=columns)
    with pytest.raises(HybridInputError, match="missing required column 'rating'"):
        read_events_table(path, columns=columns | {"rating": "rating"})  # a mapped column must exist
    with pytest.raises(HybridInputError, match="unknown canonical column 'user'"):
        read_events_table(path, columns={"user": "uid"})
    with pytest.raises(HybridInputError, match="unsupported file type '.json'"):
        read_events_table(_write(tmp_path / "log.json", "{}"))


def test_events_parquet_with_side_tables(tmp_path):
    events = pd.DataFrame(
        {
            "user_id": [1.0, 2.0],  # float ids, as parquet stores nullable ints: must become "1", not "1.0"
            "item_id": [10, 11],
            "timestamp": pd.to_datetime(["2020-01-01 00:00:00", "2020-01-01 00:01:00"]),
            "behavior": ["click", "buy"],
        }
    )
    events.to_parquet(tmp_path / "ev.parquet")
    pd.DataFrame({"item_id": [10, 11], "title": ["A (1999)", "B"]}).to_csv(tmp_path / "items.csv", index=False)
    pd.DataFrame({"user_id": [1, 2], "gender": ["F", None]}).to_parquet(tmp_path / "users.parquet")
    ds = read_dataset(
        "events", tmp_path / "ev.parquet", items_path=tmp_path / "items.csv", users_path=tmp_path / "users.parquet"
    )
    _assert_schema(ds)
    assert ds.events.to_dict("list") == {
        "user_id": ["1", "2"],
        "item_id": ["10", "11"],
        "timestamp": [1577836800, 1577836860],
        "behavior": ["click", "buy"],
    }
    assert ds.items.to_dict("list") == {
        "item_id": ["10", "11"],
        "title": ["A", "B"],
        "genres": ["", ""],
        "year": ["1999", "unknown"],
    }
    assert ds.users["gender"].tolist() == ["F", ""] and ds.users["zip"].tolist() == ["", ""]


def test_events_parquet_nan_id_names_row(tmp_path):
    pd.DataFrame({"user_id": ["a", "b", None], "item_id": ["1", "2", "3"], "timestamp": [1, 2, 3]}).to_parquet(
        tmp_path / "ev.parquet"
    )
    with pytest.raises(HybridInputError, match=_match("ev.parquet, row 3, column 'user_id'", "empty")):
        read_events_table(tmp_path / "ev.parquet")
    pd.DataFrame({"user_id": ["a"], "item_id": ["1"], "timestamp": [1], "rating": [float("nan")]}).to_parquet(
        tmp_path / "ev.parquet"
    )
    with pytest.raises(HybridInputError, match=_match("ev.parquet, row 1, column 'rating'", "NaN")):
        read_events_table(tmp_path / "ev.parquet")


def test_read_dataset_rejects_unknown_name_and_option(tmp_path):
    with pytest.raises(HybridInputError, match="unknown dataset 'imdb'"):
        read_dataset("imdb", tmp_path)
    with pytest.raises(HybridInputError, match="does not take option 'colums'"):
        read_dataset("events", tmp_path / "x.csv", colums={})
    with pytest.raises(HybridInputError, match="dataset 'ml-100k' does not take option 'columns'"):
        read_dataset("ml-100k", tmp_path, columns={"user_id": "uid"})  # would be silently ignored otherwise
    _write(tmp_path / "u.data", "1\t10\t4\t881250949\n")
    assert len(read_dataset("ml-100k", tmp_path, columns=None).events) == 1  # None = not given
