import json

import numpy as np
import pandas as pd
import pytest

from hybrid.core.errors import HybridInputError
from hybrid.core.feature_map import OOV_ID, PAD_ID, FeatureMap, Vocabulary


def test_reserved_ids_oov_and_missing():
    fm = FeatureMap.fit({"item_id": pd.Series(["b", "a", "b", "c", "b", "a"])})
    vocab = fm["item_id"]
    assert vocab.tokens == ["b", "a", "c"]            # most frequent first
    assert vocab.size == 5                             # 3 values + padding + OOV
    assert vocab.encode(["a", "b", "c", "never-seen", None]).tolist() == [3, 2, 4, OOV_ID, PAD_ID]
    assert vocab.decode([2, 3, 4, PAD_ID, OOV_ID]) == ["b", "a", "c", None, None]
    assert vocab.id_counts().tolist() == [0, 0, 3, 2, 1]


def test_ids_do_not_depend_on_row_order(ml100k):
    events = ml100k.events
    a = FeatureMap.fit({"item_id": events["item_id"], "user_id": events["user_id"]})
    shuffled = events.sample(frac=1.0, random_state=3)
    b = FeatureMap.fit({"item_id": shuffled["item_id"], "user_id": shuffled["user_id"]})
    assert a == b and a.fingerprint() == b.fingerprint()


def test_min_count_maps_rare_values_to_oov():
    fm = FeatureMap.fit({"x": pd.Series(["a", "a", "b"])}, min_count=2)
    assert fm["x"].encode(["a", "b"]).tolist() == [2, OOV_ID]


def test_list_valued_column_counts_every_element():
    fm = FeatureMap.fit({"genres": pd.Series([["Drama", "War"], ["Drama"]])})
    assert fm["genres"].tokens == ["Drama", "War"] and fm["genres"].counts == [2, 1]


def test_shared_vocabulary_for_history_features():
    fm = FeatureMap.fit({"item_id": pd.Series(["x", "y"])}, shared={"hist_item_id": "item_id"})
    assert fm["hist_item_id"] is fm["item_id"]
    assert fm.base_feature("hist_item_id") == "item_id"
    with pytest.raises(KeyError, match="no feature 'nope'"):
        fm["nope"]


def test_json_round_trip(tmp_path, prepared_ratings):
    fm = prepared_ratings.feature_map
    path = fm.save(tmp_path / "fm.json")
    loaded = FeatureMap.load(path)
    assert loaded == fm
    assert loaded.fingerprint() == fm.fingerprint()
    assert loaded.vocab_sizes() == fm.vocab_sizes()
    raw = ["50", "181", "1", "unknown-item"]
    assert loaded["item_id"].encode(raw).tolist() == fm["item_id"].encode(raw).tolist()


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(HybridInputError, match="fm.json: feature map file not found"):
        FeatureMap.load(tmp_path / "fm.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(HybridInputError, match="bad.json: not valid JSON"):
        FeatureMap.load(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"format_version": 1, "vocabularies": {"x": {"tokens": ["a"]}}}))
    with pytest.raises(HybridInputError, match="wrong.json: not a feature map"):
        FeatureMap.load(wrong)
    with pytest.raises(HybridInputError, match="token 'a' appears twice"):
        Vocabulary("x", ["a", "a"], [1, 1])


def test_align_by_raw_value_across_two_real_feature_maps(ml100k):
    """Two maps fitted on different users of ML-100K give different ids; align() maps them by raw id."""
    events = ml100k.events
    users = np.sort(events["user_id"].unique())
    first = events[events["user_id"].isin(users[: len(users) // 2])]
    second = events[events["user_id"].isin(users[len(users) // 2:])]
    source = FeatureMap.fit({"item_id": first["item_id"]})
    target = FeatureMap.fit({"item_id": second["item_id"]})
    mapping = target.align(source, "item_id")
    assert mapping.shape == (target["item_id"].size,)
    assert mapping[:2].tolist() == [0, 1]
    target_raw = target["item_id"].decode(range(2, target["item_id"].size))
    source_raw = source["item_id"].decode([m for m in mapping[2:] if m >= 0])
    known = [r for r, m in zip(target_raw, mapping[2:]) if m >= 0]
    assert known == source_raw                                 # same raw item on both sides
    only_in_target = set(second["item_id"]) - set(first["item_id"])
    assert {r for r, m in zip(target_raw, mapping[2:]) if m < 0} == only_in_target
    assert (mapping[2:] != np.arange(2, len(mapping))).any()   # ids really differ: alignment is needed
