"""The batch converters against hand-built KeyedJaggedTensors, and the length-bucketing sampler."""
import numpy as np
import pandas as pd
import pytest
import torch

from hybrid.core.errors import HybridInputError
from hybrid.data.batching import (
    BucketBatchSampler,
    CTRBatchConverter,
    SequenceBatchConverter,
    make_loader,
    user_subset,
)
from hybrid.data.protocols import ProtocolConfig, prepare
from hybrid.data.schema import RawDataset
from hybrid.data.store import load_prepared, save_prepared


@pytest.fixture(scope="module")
def toy():
    """Two users; u1 rates a,b,c,d; u2 rates b,c. Ratings ≥ 4 are clicks. Cut: after t=3."""
    events = pd.DataFrame({
        "user_id": ["u1", "u1", "u1", "u1", "u2", "u2"],
        "item_id": ["a", "b", "c", "d", "b", "c"],
        "timestamp": [1, 2, 3, 10, 2, 11],
        "rating": [5.0, 3.0, 4.0, 4.0, 1.0, 5.0],
    })
    items = pd.DataFrame({"item_id": ["a", "b", "c", "d"], "title": ["A", "B", "C", "D"],
                          "genres": ["X|Y", "Y", "X", "Z"], "year": ["1990", "1991", "1990", "1995"]})
    users = pd.DataFrame({"user_id": ["u1", "u2"], "gender": ["F", "M"], "age": ["25", "35"],
                          "occupation": ["7", "1"], "zip": ["1", "2"]})
    data = RawDataset("toy", events, items, users)
    return prepare(data, ProtocolConfig(protocol="ratings", time_cut_quantile=0.6, validation_share=0.0, max_history=2))


def test_ctr_kjt_matches_hand_built(toy):
    fm = toy.feature_map
    item, cat, act, genre = (fm[n].encode for n in ("item_id", "category", "action", "genres"))
    # Train events: t <= quantile(.6) of [1,2,3,10,2,11] = 3 → u1:a,b,c and u2:b. Samples = events with an
    # earlier event: train u1:b(t2), u1:c(t3); test u1:d(t10), u2:c(t11).
    assert len(toy.ctr_train) == 2 and len(toy.ctr_test) == 2
    conv = CTRBatchConverter(toy, "ctr_test", max_history=2,
                             fields=["user_id", "gender", "item_id", "category", "genres", "hist_item_id",
                                     "hist_action"])
    batch = conv.__getitems__([0, 1])
    kjt = batch.sparse
    expected = {
        "user_id": ([fm["user_id"].encode(["u1"])[0]], [fm["user_id"].encode(["u2"])[0]]),
        "gender": (fm["gender"].encode(["F"]).tolist(), fm["gender"].encode(["M"]).tolist()),
        "item_id": (item(["d"]).tolist(), item(["c"]).tolist()),     # d is unseen in training → OOV
        "category": (cat(["Z"]).tolist(), cat(["X"]).tolist()),
        "genres": (genre(["Z"]).tolist(), genre(["X"]).tolist()),
        "hist_item_id": (item(["b", "c"]).tolist(), item(["b"]).tolist()),   # most recent 2 of a,b,c
        "hist_action": (act(["3", "4"]).tolist(), act(["1"]).tolist()),
    }
    assert kjt.keys() == list(expected)
    for key, (first, second) in expected.items():
        assert kjt[key].to_dense()[0].tolist() == list(first), key
        assert kjt[key].to_dense()[1].tolist() == list(second), key
    assert item(["d"]).tolist() == [1]
    assert batch.labels.tolist() == [[1.0], [1.0]]
    assert batch.timestamps.tolist() == [10, 11]
    assert batch.hist_timestamps.tolist() == [2, 3, 2]
    assert batch.dense.shape == (2, 0)
    # the flat layout: values key by key, lengths key by key
    assert kjt.lengths().tolist() == [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 1, 2, 1]


def test_sequence_batch_matches_hand_built(toy):
    fm = toy.feature_map
    conv = SequenceBatchConverter(toy, "pretrain_train", max_len=200)
    batch = conv.__getitems__(list(range(len(conv))))
    # only u1 has >= 2 events before the cut (a, b, c); the protocol keeps the most recent max_history=2
    assert batch.lengths.tolist() == [2]
    assert batch.features["item_id"].values().tolist() == fm["item_id"].encode(["b", "c"]).tolist()
    assert batch.features["category"].values().tolist() == fm["category"].encode(["Y", "X"]).tolist()
    assert batch.timestamps.tolist() == [2, 3]
    assert batch.num_eval_targets == 0
    ev = SequenceBatchConverter(toy, "pretrain_eval", max_len=2).__getitems__([0, 1])
    # eval: pre-cut history + the first post-cut event, truncated to the last 2
    assert ev.num_eval_targets == 1
    assert ev.features["item_id"].to_dense()[0].tolist() == \
        fm["item_id"].encode(["c", "d"]).tolist()


def test_converter_rejects_unknown_fields(toy):
    with pytest.raises(HybridInputError, match="unknown sparse field 'hist_itemid'"):
        CTRBatchConverter(toy, "ctr_train", fields=["hist_itemid"])
    with pytest.raises(HybridInputError, match="no label column 'rating'"):
        CTRBatchConverter(toy, "ctr_train", task_names=("rating",))
    with pytest.raises(HybridInputError, match="unknown CTR split"):
        CTRBatchConverter(toy, "train")


def test_real_data_batches_are_consistent(prepared_ratings):
    conv = CTRBatchConverter(prepared_ratings, "ctr_train", max_history=50, task_names=("click", "rating5"))
    loader = make_loader(conv, batch_size=512, shuffle=True, seed=0)
    seen = 0
    for i, batch in enumerate(loader):
        hist = batch.sparse["hist_item_id"].lengths()
        assert (hist <= 50).all()
        assert (batch.sparse["hist_category"].lengths() == hist).all()
        assert batch.hist_timestamps.numel() == int(hist.sum())
        assert batch.labels.shape == (batch.batch_size, 2)
        seen += batch.batch_size
        if i == 5:
            break
    assert seen > 0


def test_bucket_sampler_covers_everything_once_and_reduces_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=10_000)
    sampler = BucketBatchSampler(lengths, batch_size=64, shuffle=True, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    flat = np.concatenate(batches)
    assert np.array_equal(np.sort(flat), np.arange(len(lengths)))
    assert [b for b in BucketBatchSampler(lengths, 64, shuffle=True, seed=1)] == batches   # deterministic
    sampler.set_epoch(1)
    assert list(sampler) != batches                                                        # reshuffled
    padded = sum(len(b) * lengths[b].max() for b in batches)
    plain = BucketBatchSampler(lengths, 64, shuffle=True, seed=1, pool_batches=1)
    padded_plain = sum(len(b) * lengths[b].max() for b in plain)
    assert padded < 0.7 * padded_plain
    assert padded < 1.1 * lengths.sum()


def test_bucket_sampler_shards_across_ranks():
    lengths = np.arange(1000)
    ranks = [list(BucketBatchSampler(lengths, 10, shuffle=True, seed=0, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1                       # same number of steps on every rank
    sets = [set(np.concatenate(r)) for r in ranks]
    assert not (sets[0] & sets[1]) and not (sets[1] & sets[2])


def test_evaluation_on_a_user_subset_takes_every_row_of_exactly_those_users(prepared_ratings):
    conv = CTRBatchConverter(prepared_ratings, "ctr_test", max_history=20)
    users = np.unique(conv.user_row)
    rows = user_subset(conv.user_row, 50, seed=3)
    chosen = np.unique(conv.user_row[rows])
    assert len(chosen) == 50 and set(chosen) <= set(users)
    assert np.array_equal(rows, np.flatnonzero(np.isin(conv.user_row, chosen)))      # all their rows, in order
    assert np.array_equal(user_subset(conv.user_row, 50, seed=3), rows)                # fixed for the run
    assert not np.array_equal(user_subset(conv.user_row, 50, seed=4), rows)
    assert user_subset(conv.user_row, None) is None and user_subset(conv.user_row, len(users)) is None
    loader = make_loader(conv, batch_size=64, shuffle=False, seed=3, max_users=50)
    batches = list(loader)
    assert np.array_equal(np.concatenate([b.user_index.numpy() for b in batches]), conv.user_row[rows])
    whole = conv.__getitems__(rows.tolist())
    assert torch.equal(torch.cat([b.labels for b in batches]), whole.labels)


def test_store_round_trip(tmp_path, toy):
    out = save_prepared(toy, tmp_path / "prep", config_yaml="a: 1\n")
    loaded = load_prepared(out)
    assert loaded.feature_map == toy.feature_map
    for name in loaded.TABLES:
        original, back = getattr(toy, name), getattr(loaded, name)
        assert list(original.columns) == list(back.columns), name
    a = CTRBatchConverter(toy, "ctr_test").__getitems__([0, 1])
    b = CTRBatchConverter(loaded, "ctr_test").__getitems__([0, 1])
    assert torch.equal(a.sparse.values(), b.sparse.values()) and torch.equal(a.sparse.lengths(), b.sparse.lengths())
    assert (out / "config.yaml").read_text() == "a: 1\n"
    with pytest.raises(HybridInputError, match="prepared data directory not found"):
        load_prepared(tmp_path / "nope")
    (out / "ctr_test.parquet").unlink()
    with pytest.raises(HybridInputError, match="ctr_test.parquet: missing"):
        load_prepared(out)


def test_gauc_groups_by_raw_user_even_when_the_feature_map_does_not_know_them(ml100k):
    """Inductive last-item: every test user is unknown to the feature map (one OOV id), yet each keeps
    their own gAUC group — the raw user — so gAUC is not AUC over one giant "user"."""
    from sklearn.metrics import roc_auc_score

    from hybrid.core.feature_map import OOV_ID
    from hybrid.ctr_models.metrics import auc, gauc

    p = prepare(ml100k, ProtocolConfig(protocol="last-item", transductive=False))
    conv = CTRBatchConverter(p, "ctr_test", max_history=10, fields=["user_id", "item_id"])
    batch = conv.__getitems__(list(range(len(conv))))
    assert (batch.sparse["user_id"].values() == OOV_ID).all()
    raw = p.users["raw_user_id"].to_numpy()[p.ctr_test["user_row"].to_numpy()]
    assert len(set(batch.user_index.tolist())) == len(set(raw)) > 200
    labels = batch.labels[:, 0].numpy()
    scores = np.random.default_rng(0).normal(size=len(labels)) + labels  # some signal
    frame = pd.DataFrame({"user": raw, "y": labels, "s": scores})
    per_user = [(len(g), roc_auc_score(g["y"], g["s"])) for _, g in frame.groupby("user") if g["y"].nunique() == 2]
    expected = sum(n * a for n, a in per_user) / sum(n for n, _ in per_user)
    assert gauc(labels, scores, batch.user_index) == pytest.approx(expected)
    assert gauc(labels, scores, batch.user_index) != pytest.approx(auc(labels, scores))
