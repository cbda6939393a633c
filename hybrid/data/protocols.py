"""Benchmark protocols: turn a :class:`RawDataset` into pretraining sequences and CTR samples.

Both protocols (``../shared/BENCHMARKS.md``) produce the same :class:`PreparedData` layout, which keeps
every user's events once and describes every pretraining sequence and every CTR history as a *window*
``[start, end)`` into them — so a user with 500 ratings costs 500 rows, not 500 copies of a history:

- ``events``: all events, grouped by user (``user_row``) in chronological order, encoded ids:
  ``item_id``, ``category``, ``action``, ``timestamp``;
- ``users``: one row per ``user_row``: ``user_id`` and user fields (encoded), ``offset``, ``length``;
- ``pretrain_train`` / ``pretrain_eval``: ``user_row``, ``start``, ``end`` (absolute event positions),
  ``num_eval_targets`` (0 for training; 1 for evaluation: the window's last event is a held-out target);
- ``ctr_train`` / ``ctr_valid`` / ``ctr_test``: ``user_row``, ``hist_start``, ``hist_end`` (the history before
  the candidate), the candidate's ``item_id``, ``category``, ``year``, ``genres`` (list), ``timestamp``,
  and labels ``click`` (and ``rating5`` where ratings exist).

Three CTR splits, by time. ``ctr_valid`` is what fine-tuning selects its checkpoint and detects the one-epoch
drop on; ``ctr_test`` is only reported. Validation is cut by the same rule as test, just before it
(``validation_share``): in ``last-item`` the training users whose last event comes latest; in ``ratings`` the
last slice of time before the test cut. Validation targets are treated like test targets: outside the feature
map's fit and outside every pretraining window.

Leakage rules (tested): the feature map is fitted on training events only; no pretraining window, of
either split, reaches an event that is a CTR validation or test target; in ``ratings`` no pretraining event
is after the validation cut.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa

from hybrid.core.errors import HybridInputError
from hybrid.core.feature_map import (
    NUM_RESERVED_IDS,
    PAD_ID,
    FeatureMap,
    Vocabulary,
    history_key,
)
from hybrid.data.columns import ColumnTable
from hybrid.data.schema import RawDataset

Protocol = Literal["last-item", "ratings"]
PROTOCOLS = ("last-item", "ratings")
USER_FIELDS = ("gender", "age", "occupation")
UNKNOWN = "unknown"


@dataclass
class ProtocolConfig:
    """How to build pretraining sequences and CTR samples.

    Args:
        protocol: ``last-item`` (GPSD: last item vs one uniform negative, users split by last-event
            time) or ``ratings`` (every rating is a sample, label rating >= 4, global time cut).
        max_history: most recent events kept in a CTR history and in a pretraining sequence.
        user_split_quantile: ``last-item``: users whose last event is after this quantile of
            last-event times are test users (0.7 → 70/30).
        time_cut_quantile: ``ratings``: events after this quantile of all timestamps are test events.
        validation_share: the validation split, taken just before the test split: ``last-item``: users
            whose last event is in the quantile range ``(user_split_quantile - share, user_split_quantile]``;
            ``ratings``: events in ``(time_cut_quantile - share, time_cut_quantile]``. Default 0.1 →
            60/10/30 users (last-item) or 70/10/20 events (ratings). 0: no validation split (fine-tuning,
            which selects on it, then refuses the data).
        transductive: ``last-item``: test users' earlier events are pretraining data too (GPSD's choice).
        positive_rating: ``ratings``: label = rating >= this.
        min_count: feature values seen fewer times in training map to OOV.
        seed: negative sampling seed.
    """

    protocol: Protocol = "last-item"
    max_history: int = 200
    user_split_quantile: float = 0.7
    time_cut_quantile: float = 0.8
    validation_share: float = 0.1
    transductive: bool = True
    positive_rating: float = 4.0
    min_count: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        cut = self.user_split_quantile if self.protocol == "last-item" else self.time_cut_quantile
        name = "user_split_quantile" if self.protocol == "last-item" else "time_cut_quantile"
        if not 0.0 <= self.validation_share < cut:
            raise ValueError(f"protocol.validation_share must be in [0, protocol.{name} = {cut}), got "
                             f"{self.validation_share}")


@dataclass
class PreparedData:
    """The output of a protocol (see the module docstring for the columns).

    The tables are DataFrames in memory (a protocol's output, :func:`hybrid.data.store.load_prepared`) or
    memory-mapped :class:`~hybrid.data.columns.ColumnTable` s (:func:`hybrid.data.store.open_prepared`, what
    the training jobs read); the batch converters take either.
    """

    feature_map: FeatureMap
    events: pd.DataFrame | ColumnTable
    users: pd.DataFrame | ColumnTable
    pretrain_train: pd.DataFrame | ColumnTable
    pretrain_eval: pd.DataFrame | ColumnTable
    ctr_train: pd.DataFrame | ColumnTable
    ctr_valid: pd.DataFrame | ColumnTable
    ctr_test: pd.DataFrame | ColumnTable
    stats: dict = field(default_factory=dict)

    TABLES = ("events", "users", "pretrain_train", "pretrain_eval", "ctr_train", "ctr_valid", "ctr_test")
    CTR_SPLITS = ("ctr_train", "ctr_valid", "ctr_test")


# -- shared steps -------------------------------------------------------------------------------------------

def _sorted_events(data: RawDataset) -> pd.DataFrame:
    """Events sorted by user then time; ties keep file order (a stable sort), so results are reproducible."""
    events = data.events.reset_index(drop=True)
    if events.empty:
        raise HybridInputError(f"{data.source or data.name}: no events")
    order = np.lexsort((np.arange(len(events)), events["timestamp"].to_numpy(), events["user_id"].to_numpy()))
    return events.iloc[order].reset_index(drop=True)


def _item_side(data: RawDataset) -> pd.DataFrame | None:
    """Raw item id → ``category`` (first genre), ``genres`` (list), ``year``; ``None`` without an item table."""
    return item_side_table(data.items)


def item_side_table(items: pd.DataFrame | None) -> pd.DataFrame | None:
    """An items table (``item_id``, ``genres`` ``|``-separated, ``year``; missing values allowed) → raw item id
    → ``category`` (first genre), ``genres`` (list), ``year``, as the protocols encode them (``unknown`` where
    absent). ``None`` → ``None``. Scoring uses it on the items of each chunk."""
    if items is None:
        return None
    items = items.drop_duplicates("item_id").set_index("item_id")
    genres = items["genres"].fillna("").astype(str).str.split("|")
    genres = genres.map(lambda g: [x for x in g if x] or [UNKNOWN])
    year = items["year"].fillna(UNKNOWN).astype(str) if "year" in items else pd.Series(UNKNOWN, index=items.index)
    return pd.DataFrame({"category": genres.str[0], "genres": genres, "year": year})


def _action(events: pd.DataFrame) -> pd.Series | None:
    """The event's action token: the rating (GenRank-style action as side info), else the behaviour type."""
    if "rating" in events:
        r = events["rating"].to_numpy(dtype=float)
        as_int = np.round(r).astype(np.int64)
        return pd.Series(np.where(r == as_int, as_int.astype(str), r.astype(str)), index=events.index)
    if "behavior" in events:
        return events["behavior"].astype(str)
    return None


def _attach_event_side(events: pd.DataFrame, side: pd.DataFrame | None) -> pd.DataFrame:
    """Add each event's ``category`` and ``action`` tokens (what sequences carry besides the item)."""
    events = events.copy()
    if side is not None:
        events["category"] = side["category"].reindex(events["item_id"].to_numpy()).fillna(UNKNOWN).to_numpy()
    action = _action(events)
    if action is not None:
        events["action"] = action.to_numpy()
    return events


def _fit_feature_map(train_events: pd.DataFrame, side: pd.DataFrame | None, users: pd.DataFrame | None,
                     cfg: ProtocolConfig, dataset: str) -> FeatureMap:
    """Fit on training events only: their items, users, actions, item side features and users' fields.

    Item side features are counted per training event (an item rated 50 times counts its genres 50 times),
    computed at item level so no per-event genre lists are built.
    """
    from_counts = Vocabulary.from_counts
    item_counts = train_events["item_id"].value_counts()
    vocabs = {"item_id": from_counts("item_id", item_counts, cfg.min_count),
              "user_id": from_counts("user_id", train_events["user_id"].value_counts(), cfg.min_count)}
    if side is not None:
        known = side.reindex(item_counts.index)
        weight = item_counts.to_numpy()
        for name in ("category", "year"):
            values = known[name].fillna(UNKNOWN).to_numpy()
            vocabs[name] = from_counts(name, pd.Series(weight).groupby(values).sum(), cfg.min_count)
        genres = known["genres"].map(lambda g: g if isinstance(g, list) else [UNKNOWN])
        exploded = pd.DataFrame({"g": genres.to_numpy(), "w": weight}).explode("g")
        vocabs["genres"] = from_counts("genres", exploded.groupby("g")["w"].sum(), cfg.min_count)
    if "action" in train_events:
        vocabs["action"] = from_counts("action", train_events["action"].value_counts(), cfg.min_count)
    if users is not None:
        seen = users[users["user_id"].isin(train_events["user_id"].unique())]
        for name in USER_FIELDS:
            if name in seen:
                vocabs[name] = from_counts(name, seen[name].dropna().astype(str).value_counts(), cfg.min_count)
    shared = {history_key(name): name for name in ("item_id", "category", "action") if name in vocabs}
    metadata = {"dataset": dataset, "protocol": cfg.protocol, "fit_events": int(len(train_events))}
    return FeatureMap(vocabs, shared=shared, metadata=metadata)


def _encode_events(events: pd.DataFrame, fm: FeatureMap) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Encoded flat events + the user table (offset/length per user_row) + each event's user_row."""
    user_codes, user_raw = pd.factorize(events["user_id"], sort=False)  # events are grouped by user already
    lengths = np.bincount(user_codes, minlength=len(user_raw))
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    encoded = pd.DataFrame({
        "item_id": fm["item_id"].encode(events["item_id"]),
        "category": fm["category"].encode(events["category"]) if "category" in fm else PAD_ID,
        "action": fm["action"].encode(events["action"]) if "action" in fm else PAD_ID,
        "timestamp": events["timestamp"].to_numpy(np.int64),
    })
    users = pd.DataFrame({"raw_user_id": np.asarray(user_raw, dtype=object),
                          "user_id": fm["user_id"].encode(pd.Series(user_raw, dtype=object)),
                          "offset": offsets.astype(np.int64), "length": lengths.astype(np.int64)})
    return encoded, users, user_codes


def _attach_user_fields(users: pd.DataFrame, raw_users: pd.DataFrame | None, fm: FeatureMap) -> pd.DataFrame:
    if raw_users is None:
        return users
    fields = raw_users.drop_duplicates("user_id").set_index("user_id").reindex(users["raw_user_id"].to_numpy())
    for name in USER_FIELDS:
        if name in fm and name in fields:
            users[name] = fm[name].encode(fields[name].astype(object).where(fields[name].notna(), None))
    return users


def _candidate_columns(raw_items: np.ndarray, side: pd.DataFrame | None, fm: FeatureMap) -> dict:
    """Encoded side features of candidate items, looked up by raw id (a new item keeps its genres).

    ``genres`` is an Arrow list column: encoded once per item, then gathered, with no per-row Python lists.
    """
    out = {"item_id": fm["item_id"].encode(pd.Series(raw_items, dtype=object))}
    if side is not None:
        # Row len(side) stands for items missing from the item table. The genre lists are encoded in one call,
        # flattened, and cut back into lists by their offsets.
        genre_lists = [*side["genres"], [UNKNOWN]]
        offsets = np.concatenate([[0], np.cumsum([len(g) for g in genre_lists])]).astype(np.int32)
        flat = fm["genres"].encode(pd.Series([g for gs in genre_lists for g in gs], dtype=object))
        item_genres = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.int64()))
        position = side.index.get_indexer(raw_items)
        position = np.where(position < 0, len(side), position)
        lookup = pd.DataFrame({"category": fm["category"].encode(side["category"]),
                               "year": fm["year"].encode(side["year"])})
        lookup.loc[len(side)] = [fm["category"].encode([UNKNOWN])[0], fm["year"].encode([UNKNOWN])[0]]
        out["category"] = lookup["category"].to_numpy()[position]
        out["year"] = lookup["year"].to_numpy()[position]
        genres = item_genres.take(pa.array(position))
        out["genres"] = pd.Series(genres, dtype=pd.ArrowDtype(pa.list_(pa.int64())))
    return out


def _check_ratings(events: pd.DataFrame, source: str) -> None:
    if "rating" not in events:
        raise HybridInputError(f"{source}: protocol 'ratings' needs a 'rating' column in the events")


# -- protocol A: last-item ------------------------------------------------------------------------------------

def _last_item(data: RawDataset, cfg: ProtocolConfig) -> PreparedData:
    side = _item_side(data)
    events = _attach_event_side(_sorted_events(data), side)
    user = events["user_id"].to_numpy()
    position = events.groupby("user_id", sort=False).cumcount().to_numpy()
    count = events.groupby("user_id", sort=False)["item_id"].transform("size").to_numpy()
    last_time = events.groupby("user_id", sort=False)["timestamp"].max()
    split_time = float(np.quantile(last_time.to_numpy(), cfg.user_split_quantile))
    valid_time = float(np.quantile(last_time.to_numpy(), cfg.user_split_quantile - cfg.validation_share))
    test_users = set(last_time.index[last_time.to_numpy() > split_time])
    held_out = last_time.to_numpy() > (valid_time if cfg.validation_share > 0 else split_time)
    valid_users = set(last_time.index[held_out]) - test_users
    # validation users are held out exactly like test users (their last event is an evaluation target)
    is_test_user = pd.Series(user).isin(test_users | valid_users).to_numpy()
    is_last = position == count - 1

    # Training data = what pretraining and CTR training may see: never a held-out user's last event, and
    # no held-out user's event at all when the setting is inductive.
    train_mask = ~is_test_user | (~is_last & cfg.transductive)
    fm = _fit_feature_map(events[train_mask], side, data.users, cfg, data.name)
    encoded, users, user_rows = _encode_events(events, fm)
    users = _attach_user_fields(users, data.users, fm)
    users["is_test"] = users["raw_user_id"].isin(test_users).to_numpy()
    users["is_valid"] = users["raw_user_id"].isin(valid_users).to_numpy()
    held = users["is_test"] | users["is_valid"]

    # Pretraining: each user's events except the last (the CTR target); the final element is the
    # second-to-last event (GPSD's target). Eval: test users' full sequence, last event held out.
    ends = users["offset"] + users["length"] - 1
    starts = np.maximum(users["offset"], ends - cfg.max_history)
    keep = (users["length"] >= 3) & (~held | cfg.transductive)
    pretrain_train = pd.DataFrame({"user_row": users.index[keep], "start": starts[keep], "end": ends[keep],
                                   "num_eval_targets": 0})
    eval_users = users["is_test"] & (users["length"] >= 2)
    eval_end = users["offset"] + users["length"]
    pretrain_eval = pd.DataFrame({"user_row": users.index[eval_users],
                                  "start": np.maximum(users["offset"], eval_end - cfg.max_history - 1)[eval_users],
                                  "end": eval_end[eval_users], "num_eval_targets": 1})

    # CTR: per user with history, the last item (label 1) and one uniform negative from the item vocab.
    rng = np.random.default_rng(cfg.seed)
    sample_users = users[users["length"] >= 2]
    last_pos = (sample_users["offset"] + sample_users["length"] - 1).to_numpy()
    pos_raw = events["item_id"].to_numpy()[last_pos]
    vocab = np.asarray(fm["item_id"].tokens, dtype=object)
    neg_raw = vocab[rng.integers(0, len(vocab), size=len(last_pos))]
    clash = neg_raw == pos_raw
    while clash.any():  # a negative that equals the positive would be a contradictory label
        neg_raw[clash] = vocab[rng.integers(0, len(vocab), size=int(clash.sum()))]
        clash = neg_raw == pos_raw
    hist_start = np.maximum(sample_users["offset"].to_numpy(), last_pos - cfg.max_history)
    # Rows alternate positive, negative per user.
    n = len(last_pos)
    cand = _candidate_columns(np.stack([pos_raw, neg_raw], axis=1).reshape(-1), side, fm)
    samples = pd.DataFrame({"user_row": np.repeat(sample_users.index.to_numpy(), 2),
                            "hist_start": np.repeat(hist_start, 2), "hist_end": np.repeat(last_pos, 2), **cand,
                            "timestamp": np.repeat(encoded["timestamp"].to_numpy()[last_pos], 2),
                            "click": np.tile(np.array([1.0, 0.0], dtype=np.float32), n)})
    is_test = np.repeat(sample_users["is_test"].to_numpy(), 2)
    is_valid = np.repeat(sample_users["is_valid"].to_numpy(), 2)
    ctr_train = samples[~is_test & ~is_valid].reset_index(drop=True)
    ctr_valid = samples[is_valid].reset_index(drop=True)
    ctr_test = samples[is_test].reset_index(drop=True)
    stats = {"split_time": split_time, "validation_time": valid_time if cfg.validation_share > 0 else None,
             "test_users": int(users["is_test"].sum()), "validation_users": int(users["is_valid"].sum())}
    return PreparedData(fm, encoded, users.drop(columns=["is_test", "is_valid"]), pretrain_train, pretrain_eval,
                        ctr_train, ctr_valid, ctr_test, stats)


# -- protocol B: ratings ------------------------------------------------------------------------------------

def _ratings(data: RawDataset, cfg: ProtocolConfig) -> PreparedData:
    _check_ratings(data.events, data.source or data.name)
    side = _item_side(data)
    events = _attach_event_side(_sorted_events(data), side)
    timestamps = events["timestamp"].to_numpy()
    cut = float(np.quantile(timestamps, cfg.time_cut_quantile))
    valid_cut = float(np.quantile(timestamps, cfg.time_cut_quantile - cfg.validation_share)) \
        if cfg.validation_share > 0 else cut
    # training = up to the validation cut: the feature map and pretraining never see a validation target
    is_train = timestamps <= valid_cut
    is_test = timestamps > cut
    fm = _fit_feature_map(events[is_train], side, data.users, cfg, data.name)
    encoded, users, user_rows = _encode_events(events, fm)
    users = _attach_user_fields(users, data.users, fm)
    position = np.arange(len(events)) - users["offset"].to_numpy()[user_rows]

    # Pretraining sees only training events; its eval target is each user's first event after them.
    n_train = np.bincount(user_rows, weights=is_train, minlength=len(users)).astype(np.int64)
    # Events are chronological per user, so a user's pre-cut events are the first n_train of them.
    train_end = users["offset"].to_numpy() + n_train
    keep = n_train >= 2
    pretrain_train = pd.DataFrame({"user_row": users.index[keep],
                                   "start": np.maximum(users["offset"].to_numpy(), train_end - cfg.max_history)[keep],
                                   "end": train_end[keep], "num_eval_targets": 0})
    has_next = (n_train >= 1) & (n_train < users["length"].to_numpy())
    eval_end = train_end + 1
    pretrain_eval = pd.DataFrame({"user_row": users.index[has_next],
                                  "start": np.maximum(users["offset"].to_numpy(), eval_end - cfg.max_history - 1)[has_next],
                                  "end": eval_end[has_next], "num_eval_targets": 1})

    # CTR: every event with at least one earlier event; history = the earlier events (with ratings).
    rows = np.flatnonzero(position >= 1)
    cand = _candidate_columns(events["item_id"].to_numpy()[rows], side, fm)
    rating = events["rating"].to_numpy(dtype=float)[rows]
    samples = pd.DataFrame({
        "user_row": user_rows[rows], "hist_start": np.maximum(rows - position[rows], rows - cfg.max_history),
        "hist_end": rows, **cand, "timestamp": encoded["timestamp"].to_numpy()[rows],
        "click": (rating >= cfg.positive_rating).astype(np.float32), "rating5": (rating >= 5).astype(np.float32)})
    train_rows, test_rows = is_train[rows], is_test[rows]
    valid_rows = ~train_rows & ~test_rows
    stats = {"time_cut": cut, "validation_cut": valid_cut if cfg.validation_share > 0 else None}
    return PreparedData(fm, encoded, users, pretrain_train, pretrain_eval,
                        samples[train_rows].reset_index(drop=True), samples[valid_rows].reset_index(drop=True),
                        samples[test_rows].reset_index(drop=True), stats)


def prepare(data: RawDataset, cfg: ProtocolConfig) -> PreparedData:
    """Apply a protocol to a dataset.

    Example:
        >>> from hybrid.data.readers import read_dataset
        >>> prepared = prepare(read_dataset("movielens-100k", ml100k_dir), ProtocolConfig(protocol="ratings"))
        >>> prepared.ctr_train.columns[:3].tolist()
        ['user_row', 'hist_start', 'hist_end']
    """
    if cfg.protocol not in PROTOCOLS:
        raise HybridInputError(f"unknown protocol '{cfg.protocol}' (expected one of: {', '.join(PROTOCOLS)})")
    started = time.perf_counter()
    prepared = (_last_item if cfg.protocol == "last-item" else _ratings)(data, cfg)
    prepared.stats = {**_statistics(data, prepared, cfg), **prepared.stats,
                      "prepare_seconds": round(time.perf_counter() - started, 3)}
    return prepared


def _statistics(data: RawDataset, p: PreparedData, cfg: ProtocolConfig) -> dict:
    events = data.events

    def ctr(frame: pd.DataFrame) -> dict:
        hist = (frame["hist_end"] - frame["hist_start"]).to_numpy()
        out = {"samples": int(len(frame)), "users": int(frame["user_row"].nunique()),
               "label_rate": round(float(frame["click"].mean()), 4) if len(frame) else None,
               "mean_history": round(float(hist.mean()), 2) if len(frame) else None}
        if len(frame):
            out["oov_candidates"] = int((frame["item_id"] < NUM_RESERVED_IDS).sum())
        return out

    def seqs(frame: pd.DataFrame) -> dict:
        lengths = (frame["end"] - frame["start"]).to_numpy()
        return {"sequences": int(len(frame)), "events": int(lengths.sum()),
                "mean_length": round(float(lengths.mean()), 2) if len(frame) else None}

    return {
        "dataset": data.name, "source": data.source, "protocol": cfg.protocol,
        "users": int(events["user_id"].nunique()), "items": int(events["item_id"].nunique()),
        "events": int(len(events)),
        "time_range": [int(events["timestamp"].min()), int(events["timestamp"].max())],
        "vocab_sizes": p.feature_map.vocab_sizes(),
        "pretrain_train": seqs(p.pretrain_train), "pretrain_eval": seqs(p.pretrain_eval),
        "ctr_train": ctr(p.ctr_train), "ctr_valid": ctr(p.ctr_valid), "ctr_test": ctr(p.ctr_test),
    }
