"""Protocols on real ML-100K: sizes, labels, time splits and — above all — no leakage."""
import numpy as np
import pandas as pd
import pytest

from hybrid.core.errors import HybridInputError
from hybrid.data.protocols import ProtocolConfig, prepare
from hybrid.data.schema import RawDataset


def _sorted(events):
    return events.reset_index(drop=True).sort_values(["user_id", "timestamp"], kind="stable")


def _windows_cover(prepared, frame, start="start", end="end"):
    """Absolute event positions covered by the windows of ``frame``."""
    lengths = (frame[end] - frame[start]).to_numpy()
    return np.concatenate([np.arange(s, e) for s, e in zip(frame[start], frame[end])]) if lengths.sum() else np.array([])


def test_last_item_shapes_and_labels(ml100k, prepared_last_item):
    p = prepared_last_item
    n_users = ml100k.events["user_id"].nunique()
    # every ML-100K user has >= 20 ratings: one positive and one negative each
    assert len(p.ctr_train) + len(p.ctr_valid) + len(p.ctr_test) == 2 * n_users
    for split in (p.ctr_train, p.ctr_valid, p.ctr_test):
        assert split["click"].mean() == 0.5
        pos, neg = split.iloc[0::2], split.iloc[1::2]
        assert (pos["click"] == 1).all() and (neg["click"] == 0).all()
        assert (pos["user_row"].to_numpy() == neg["user_row"].to_numpy()).all()
        assert (pos["item_id"].to_numpy() != neg["item_id"].to_numpy()).all()
    # the positive is the user's last event, the history all earlier events (at most 200)
    users = p.users
    last = users["offset"] + users["length"] - 1
    pos = p.ctr_train.iloc[0::2]
    assert (pos["hist_end"].to_numpy() == last.to_numpy()[pos["user_row"]]).all()
    assert ((pos["hist_end"] - pos["hist_start"]) <= 200).all()
    assert (p.events["item_id"].to_numpy()[pos["hist_end"]] == pos["item_id"].to_numpy()).all()


def _raw_users(p, frame):
    return set(p.users["raw_user_id"].to_numpy()[frame["user_row"].unique()])


def test_last_item_user_split_is_by_last_event_time(ml100k, prepared_last_item):
    p = prepared_last_item
    last_time = ml100k.events.groupby("user_id")["timestamp"].max()
    split, valid = np.quantile(last_time, 0.7), np.quantile(last_time, 0.6)
    assert _raw_users(p, p.ctr_test) == set(last_time.index[last_time > split])
    # validation: the training users whose last event comes latest, by the same rule
    assert _raw_users(p, p.ctr_valid) == set(last_time.index[(last_time > valid) & (last_time <= split)])
    assert _raw_users(p, p.ctr_train) == set(last_time.index[last_time <= valid])
    shares = [len(_raw_users(p, f)) / len(last_time) for f in (p.ctr_train, p.ctr_valid, p.ctr_test)]
    assert 0.55 < shares[0] < 0.65 and 0.05 < shares[1] < 0.15 and 0.25 < shares[2] < 0.35
    assert p.stats["validation_users"] == len(_raw_users(p, p.ctr_valid))


def test_last_item_no_leakage(ml100k, prepared_last_item):
    p = prepared_last_item
    # No pretraining window (train or eval input) reaches a CTR evaluation target event (validation or test).
    eval_targets = set(p.ctr_test["hist_end"]) | set(p.ctr_valid["hist_end"])  # the positives' positions
    assert not eval_targets & set(_windows_cover(p, p.pretrain_train))
    eval_inputs = p.pretrain_eval.assign(end=p.pretrain_eval["end"] - p.pretrain_eval["num_eval_targets"])
    assert not eval_targets & set(_windows_cover(p, eval_inputs))
    # nor any user's last event (the CTR target, train users included)
    last = set(p.users["offset"] + p.users["length"] - 1)
    assert not last & set(_windows_cover(p, p.pretrain_train))
    # The feature map saw exactly the events that are not validation or test users' last events.
    events = _sorted(ml100k.events)
    is_last = events.groupby("user_id").cumcount(ascending=False) == 0
    held_out = _raw_users(p, p.ctr_test) | _raw_users(p, p.ctr_valid)
    fit_events = events[~(is_last & events["user_id"].isin(held_out))]
    assert set(p.feature_map["item_id"].tokens) == set(fit_events["item_id"])
    assert p.feature_map.metadata["fit_events"] == len(fit_events)


def test_last_item_inductive_switch(ml100k):
    p = prepare(ml100k, ProtocolConfig(protocol="last-item", transductive=False))
    test_rows = set(p.ctr_test["user_row"]) | set(p.ctr_valid["user_row"])
    assert not test_rows & set(p.pretrain_train["user_row"])
    test_users = set(p.users["raw_user_id"].to_numpy()[list(test_rows)])
    train_only = ml100k.events[~ml100k.events["user_id"].isin(test_users)]
    assert set(p.feature_map["item_id"].tokens) == set(train_only["item_id"])


def test_last_item_negatives_are_seeded(ml100k, prepared_last_item):
    again = prepare(ml100k, ProtocolConfig(protocol="last-item"))
    other = prepare(ml100k, ProtocolConfig(protocol="last-item", seed=1))
    neg = prepared_last_item.ctr_train.iloc[1::2]["item_id"].to_numpy()
    assert (again.ctr_train.iloc[1::2]["item_id"].to_numpy() == neg).all()
    assert (other.ctr_train.iloc[1::2]["item_id"].to_numpy() != neg).any()


def test_ratings_time_cut_labels_and_histories(ml100k, prepared_ratings):
    p = prepared_ratings
    cut, valid_cut = np.quantile(ml100k.events["timestamp"], [0.8, 0.7])
    assert (p.ctr_train["timestamp"] <= valid_cut).all() and (p.ctr_test["timestamp"] > cut).all()
    assert ((p.ctr_valid["timestamp"] > valid_cut) & (p.ctr_valid["timestamp"] <= cut)).all()
    assert 0.07 < len(p.ctr_valid) / len(ml100k.events) < 0.13   # the last tenth of time before the cut
    events = _sorted(ml100k.events)
    first = events.groupby("user_id").cumcount() == 0
    # every event with an earlier one
    assert len(p.ctr_train) + len(p.ctr_valid) + len(p.ctr_test) == int((~first).sum())
    # labels and histories against a direct pandas computation, for a sample of rows
    raw_events = events.reset_index(drop=True)
    for frame in (p.ctr_train, p.ctr_valid, p.ctr_test):
        rows = frame.sample(200, random_state=0)
        for _, row in rows.iterrows():
            target = raw_events.iloc[row["hist_end"]]
            assert row["click"] == float(target["rating"] >= 4)
            assert row["rating5"] == float(target["rating"] == 5)
            user_events = raw_events[raw_events["user_id"] == target["user_id"]]
            earlier = user_events.loc[: row["hist_end"] - 1].iloc[-200:]
            hist = p.feature_map["item_id"].encode(earlier["item_id"])
            assert (p.events["item_id"].to_numpy()[row["hist_start"]:row["hist_end"]] == hist).all()
            assert (earlier["timestamp"] <= target["timestamp"]).all()


def test_ratings_no_leakage(ml100k, prepared_ratings):
    p = prepared_ratings
    cut = np.quantile(ml100k.events["timestamp"], 0.7)   # training ends at the validation cut
    times = p.events["timestamp"].to_numpy()
    assert (times[_windows_cover(p, p.pretrain_train).astype(int)] <= cut).all()
    inputs = p.pretrain_eval.assign(end=p.pretrain_eval["end"] - 1)
    assert (times[_windows_cover(p, inputs).astype(int)] <= cut).all()
    assert (times[p.pretrain_eval["end"] - 1] > cut).all()          # the held-out next item is after the cut
    train = ml100k.events[ml100k.events["timestamp"] <= cut]
    assert set(p.feature_map["item_id"].tokens) == set(train["item_id"])
    assert set(p.feature_map["user_id"].tokens) == set(train["user_id"])
    counts = train["item_id"].value_counts()
    vocab = p.feature_map["item_id"]
    assert vocab.counts == [int(counts[t]) for t in vocab.tokens]


def test_stats(prepared_ratings, prepared_last_item):
    for p in (prepared_ratings, prepared_last_item):
        s = p.stats
        assert s["events"] == 100_000 and s["users"] == 943 and s["items"] == 1682
        assert s["ctr_train"]["samples"] == len(p.ctr_train)
        assert s["ctr_valid"]["samples"] == len(p.ctr_valid) > 0
        assert s["vocab_sizes"] == p.feature_map.vocab_sizes()


def test_bad_protocol_inputs(ml100k):
    with pytest.raises(HybridInputError, match="unknown protocol 'last_item'"):
        prepare(ml100k, ProtocolConfig(protocol="last_item"))
    no_rating = RawDataset("x", ml100k.events.drop(columns=["rating"]), source="x/events.csv")
    with pytest.raises(HybridInputError, match="x/events.csv: protocol 'ratings' needs a 'rating' column"):
        prepare(no_rating, ProtocolConfig(protocol="ratings"))
    empty = RawDataset("x", ml100k.events.iloc[:0], source="empty.csv")
    with pytest.raises(HybridInputError, match="empty.csv: no events"):
        prepare(empty, ProtocolConfig(protocol="last-item"))


def test_generic_events_without_side_tables():
    events = pd.DataFrame({"user_id": ["u1"] * 4 + ["u2"] * 3, "item_id": list("abcdabc"),
                           "timestamp": [1, 2, 3, 4, 1, 5, 9]})
    p = prepare(RawDataset("toy", events), ProtocolConfig(protocol="last-item", user_split_quantile=0.5))
    assert "category" not in p.ctr_train and "genres" not in p.ctr_train
    assert len(p.ctr_train) == 2 and len(p.ctr_test) == 2


def test_validation_split_by_hand():
    """Five users with last events at t = 1..5: with user_split 0.8 and share 0.2, user 5 is test (after the
    0.8 quantile, 4.2), user 4 validation (after the 0.6 quantile, 3.4), users 1-3 train."""
    events = pd.DataFrame({"user_id": [f"u{u}" for u in range(1, 6) for _ in range(2)],
                           "item_id": list("abcdefghij"), "timestamp": [0, 1, 0, 2, 0, 3, 0, 4, 0, 5]})
    p = prepare(RawDataset("toy", events), ProtocolConfig(protocol="last-item", user_split_quantile=0.8,
                                                          validation_share=0.2))
    assert [_raw_users(p, f) for f in (p.ctr_train, p.ctr_valid, p.ctr_test)] == [{"u1", "u2", "u3"}, {"u4"}, {"u5"}]
    assert "h" not in p.feature_map["item_id"].tokens and "j" not in p.feature_map["item_id"].tokens
    none = prepare(RawDataset("toy", events), ProtocolConfig(protocol="last-item", user_split_quantile=0.8,
                                                             validation_share=0.0))
    assert len(none.ctr_valid) == 0 and len(none.ctr_train) == 8
    # ratings: t = 1..10 for one user; cut 0.8 → test after 8.2, validation after the 0.6 quantile (6.4)
    ratings = pd.DataFrame({"user_id": ["u"] * 10, "item_id": list("abcdefghij"), "timestamp": range(1, 11),
                            "rating": [5.0] * 10})
    r = prepare(RawDataset("toy", ratings), ProtocolConfig(protocol="ratings", time_cut_quantile=0.8,
                                                           validation_share=0.2))
    assert r.ctr_train["timestamp"].tolist() == [2, 3, 4, 5, 6]
    assert r.ctr_valid["timestamp"].tolist() == [7, 8] and r.ctr_test["timestamp"].tolist() == [9, 10]
    assert (r.pretrain_train["end"] <= 6).all()        # pretraining stops at the validation cut
    with pytest.raises(ValueError, match=r"protocol.validation_share must be in \[0, protocol.time_cut_quantile"):
        ProtocolConfig(protocol="ratings", time_cut_quantile=0.8, validation_share=0.8)
