"""bench/official_gpsd_side_by_side.py: the prepared protocol-A rows, exported in the official GPSD code's format.

The side-by-side comparison is only as fair as this export: the official code must see exactly the rows hybrid
trains and evaluates on. These tests read the files back the way the official tokenizer and dataset do.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from hybrid.data.store import load_prepared

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("official_gpsd_side_by_side",
                                                  REPO / "bench" / "official_gpsd_side_by_side.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


side_by_side = _load()


def _index(path: str) -> dict[str, int]:
    return {key: int(value) for key, value in (line.split(",") for line in Path(path).read_text().splitlines())}


def _sequence(field: str) -> list[tuple[str, str]]:
    if not field:
        return []
    pairs = [dict(kv.split(":") for kv in token.split("#")) for token in field.split(";")]
    return [(p["item__item_id"], p["item__cate_id"]) for p in pairs]


@pytest.fixture(scope="module")
def exported(prepared_last_item_dir, tmp_path_factory):
    return side_by_side.export(Path(prepared_last_item_dir), tmp_path_factory.mktemp("official"))


def test_indices_are_contiguous_and_cover_every_id_the_rows_use(exported, prepared_last_item_dir):
    # the official tokenizer sizes its table as len(map) + 1, index 0 = unknown: 1..N exactly, or lookups overflow
    items, cates = _index(exported["item2index"]), _index(exported["cate2index"])
    assert sorted(items.values()) == list(range(1, len(items) + 1))
    assert sorted(cates.values()) == list(range(1, len(cates) + 1))
    for split in ("train", "valid", "test"):
        ctr = getattr(load_prepared(prepared_last_item_dir), f"ctr_{split}")
        assert set(map(str, ctr["item_id"])) <= set(items)
        assert set(map(str, ctr["category"])) <= set(cates)


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_ctr_rows_carry_the_prepared_histories_targets_and_labels(exported, prepared_last_item_dir, split):
    data = load_prepared(prepared_last_item_dir)
    events, ctr = data.events, getattr(data, f"ctr_{split}")
    lines = Path(exported[split]).read_text().splitlines()
    assert len(lines) == len(ctr)
    for line, row in zip(lines, ctr.itertuples()):
        user, item, cate, label, seq, length = line.split(",")
        assert (user, item, cate, int(label)) == (str(row.user_row), str(row.item_id), str(row.category),
                                                 int(row.click))
        history = events.iloc[row.hist_start:row.hist_end]
        assert _sequence(seq) == list(zip(map(str, history["item_id"]), map(str, history["category"])))
        assert int(length) == len(history)


def test_pretraining_rows_end_in_their_own_last_event(exported, prepared_last_item_dir):
    # label 2 = next-item only; the CTR target (after `end`) must not leak into pretraining
    data = load_prepared(prepared_last_item_dir)
    events, sequences = data.events, data.pretrain_train
    lines = Path(exported["pretrain"]).read_text().splitlines()
    assert len(lines) == len(sequences)
    for line, row in zip(lines, sequences.itertuples()):
        _, item, cate, label, seq, length = line.split(",")
        last = events.iloc[row.end - 1]
        assert (item, cate, label) == (str(last["item_id"]), str(last["category"]), "2")
        assert len(_sequence(seq)) == int(length) == row.end - 1 - row.start


def test_work_dir_inside_the_repository_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        side_by_side.main(["--official-repo", "/nonexistent", "--official-python", "/nonexistent",
                           "--work-dir", str(REPO / "runs" / "official"), "--tracking-uri", "sqlite:///unused.db"])
    assert exit_info.value.code == 2
    assert "inside the repository" in capsys.readouterr().err
    assert not (REPO / "runs" / "official").exists()
