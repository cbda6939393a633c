"""Prepared samples → model batches: one converter per batch type, one length-bucketing loader.

The converters read the window layout of :class:`~hybrid.data.protocols.PreparedData` (every history or
pretraining sequence is ``[start, end)`` into one flat events table) and gather each batch with a few
vectorised numpy calls into a :class:`~torchrec.KeyedJaggedTensor` — no padding on the sparse side. The
same converter serves training, evaluation and inference.

Example:
    >>> from hybrid.data.store import load_prepared
    >>> converter = CTRBatchConverter(load_prepared(prepared_dir), "ctr_train", max_history=50)
    >>> loader = make_loader(converter, batch_size=256, shuffle=True, seed=0)
    >>> batch = next(iter(loader))          # a CTRBatch
    >>> batch.batch_size, int(batch.sparse["hist_item_id"].lengths().max()) <= 50
    (256, True)
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hybrid.core.batch import CTRBatch, SequenceBatch
from hybrid.core.errors import HybridInputError
from hybrid.core.feature_map import history_key
from hybrid.data.columns import as_table
from hybrid.data.protocols import USER_FIELDS, PreparedData

SEQUENCE_FEATURES = ("item_id", "category", "action")
CANDIDATE_FIELDS = ("item_id", "category", "year")


def _window_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Positions of the concatenated windows ``[s, s + n)``: ``[s0, s0+1, ..., s1, s1+1, ...]``."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return shift + np.arange(total, dtype=np.int64)


def _clip_windows(starts: np.ndarray, ends: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the most recent ``max_len`` events of each window (int64 positions and lengths, whatever width
    the columns are stored in)."""
    starts, ends = starts.astype(np.int64, copy=False), ends.astype(np.int64, copy=False)
    starts = np.maximum(starts, ends - max_len)
    return starts, ends - starts


def _kjt(keys: list[str], values: list[np.ndarray], lengths: list[np.ndarray]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(np.concatenate(values).astype(np.int64)),
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)),
    )


class _Converter(torch.utils.data.Dataset):
    """A map-style dataset whose ``__getitems__`` returns a whole batch (the DataLoader then passes it on)."""

    def __getitem__(self, index: int):
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]):
        raise NotImplementedError


class CTRBatchConverter(_Converter):
    """Rows of a CTR split → :class:`~hybrid.core.batch.CTRBatch`.

    Args:
        prepared: the output of a protocol (or :func:`hybrid.data.store.load_prepared`).
        split: ``ctr_train``, ``ctr_valid`` or ``ctr_test``.
        max_history: most recent history events kept per sample.
        fields: sparse fields to include (default: every field the data has). History fields are named
            ``hist_<feature>``.
        task_names: label columns, in order (``click``, ``rating5``).
    """

    def __init__(self, prepared: PreparedData, split: str, max_history: int = 200,
                 fields: Sequence[str] | None = None, task_names: Sequence[str] = ("click",)) -> None:
        if split not in PreparedData.CTR_SPLITS:
            raise HybridInputError(f"unknown CTR split '{split}' (expected one of: {', '.join(PreparedData.CTR_SPLITS)})")
        samples = as_table(getattr(prepared, split), split)
        users, events = as_table(prepared.users, "users"), as_table(prepared.events, "events")
        self.num_samples = len(samples)
        self.max_history = max_history
        self.task_names = tuple(task_names)
        missing = [t for t in self.task_names if t not in samples]
        if missing:
            raise HybridInputError(f"{split}: no label column {missing[0]!r} (has: {', '.join(samples.names)})")
        # Columns are views (memory-mapped or of the DataFrame): each batch gathers its rows, nothing is
        # copied per sample up front. User fields are looked up through the sample's user row.
        self.user_row = samples["user_row"]
        self.per_user = {name: users[name] for name in ("user_id", *USER_FIELDS) if name in users}
        self.per_sample = {name: samples[name] for name in CANDIDATE_FIELDS if name in samples}
        self.multi: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if "genres" in samples:
            self.multi["genres"] = samples.list_column("genres")
        self.history = {history_key(name): events[name]
                        for name in SEQUENCE_FEATURES if name in events and name in prepared.feature_map}
        available = [*self.per_user, *self.per_sample, *self.multi, *self.history]
        self.fields = list(fields) if fields is not None else available
        unknown = [f for f in self.fields if f not in available]
        if unknown:
            raise HybridInputError(f"{split}: unknown sparse field {unknown[0]!r} (available: {', '.join(available)})")

        self.hist_start = samples["hist_start"]
        self.hist_end = samples["hist_end"]
        self.event_time = events["timestamp"]
        self.timestamps = samples["timestamp"]
        self.labels = [samples[t] for t in self.task_names]
    def __len__(self) -> int:
        return self.num_samples

    def history_lengths(self) -> np.ndarray:
        """History length of each sample after truncation (what the loader buckets by)."""
        return np.minimum(self.hist_end - self.hist_start, self.max_history)

    def __getitems__(self, indices: Sequence[int]) -> CTRBatch:
        idx = np.asarray(indices, dtype=np.int64)
        n = len(idx)
        starts, hist_len = _clip_windows(self.hist_start[idx], self.hist_end[idx], self.max_history)
        hist_pos = _window_index(starts, hist_len)
        user_row = self.user_row[idx]
        ones = np.ones(n, dtype=np.int64)
        values, lengths = [], []
        for name in self.fields:
            if name in self.per_user:
                values.append(self.per_user[name][user_row])
                lengths.append(ones)
            elif name in self.per_sample:
                values.append(self.per_sample[name][idx])
                lengths.append(ones)
            elif name in self.multi:
                offsets, flat = self.multi[name]
                m_len = offsets[idx + 1] - offsets[idx]
                values.append(flat[_window_index(offsets[idx], m_len)])
                lengths.append(m_len)
            else:
                values.append(self.history[name][hist_pos])
                lengths.append(hist_len)
        labels = np.stack([column[idx] for column in self.labels], axis=1).astype(np.float32, copy=False)
        return CTRBatch(
            sparse=_kjt(self.fields, values, lengths),
            dense=torch.zeros(n, 0),
            labels=torch.from_numpy(labels),
            timestamps=torch.from_numpy(self.timestamps[idx].astype(np.int64, copy=False)),
            hist_timestamps=torch.from_numpy(self.event_time[hist_pos].astype(np.int64, copy=False)),
            # gAUC groups by the raw user: the prepared data's user row (one per raw user). The encoded
            # user_id would merge every user the feature map does not know into the one OOV id.
            user_index=torch.from_numpy(user_row.astype(np.int64, copy=False)),
            task_names=self.task_names,
        )


class SequenceBatchConverter(_Converter):
    """Pretraining windows → :class:`~hybrid.core.batch.SequenceBatch`.

    Args:
        prepared: the output of a protocol.
        split: ``pretrain_train`` or ``pretrain_eval``.
        max_len: most recent events kept per sequence (held-out targets included).
        features: sequence features to include (default: those the data has, of item_id/category/action).
    """

    def __init__(self, prepared: PreparedData, split: str, max_len: int = 200,
                 features: Sequence[str] | None = None) -> None:
        if split not in ("pretrain_train", "pretrain_eval"):
            raise HybridInputError(f"unknown pretraining split '{split}' (expected pretrain_train or pretrain_eval)")
        windows = as_table(getattr(prepared, split), split)
        events = as_table(prepared.events, "events")
        available = [f for f in SEQUENCE_FEATURES if f in events and f in prepared.feature_map]
        self.features = list(features) if features is not None else available
        unknown = [f for f in self.features if f not in available]
        if unknown:
            raise HybridInputError(f"{split}: unknown sequence feature {unknown[0]!r} (available: {', '.join(available)})")
        self.columns = {f: events[f] for f in self.features}  # views: each batch gathers its positions
        self.event_time = events["timestamp"]
        self.user_row = windows["user_row"]
        self.start = windows["start"]
        self.end = windows["end"]
        targets = np.unique(windows["num_eval_targets"]) if len(windows) else np.array([0])
        if len(targets) != 1:
            raise HybridInputError(f"{split}: mixed num_eval_targets {sorted(targets)} in one split")
        self.num_eval_targets = int(targets[0])
        self.max_len = max_len

    def __len__(self) -> int:
        return len(self.start)

    def sequence_lengths(self) -> np.ndarray:
        return np.minimum(self.end - self.start, self.max_len)

    def __getitems__(self, indices: Sequence[int]) -> SequenceBatch:
        idx = np.asarray(indices, dtype=np.int64)
        starts, lengths = _clip_windows(self.start[idx], self.end[idx], self.max_len)
        pos = _window_index(starts, lengths)
        kjt = _kjt(self.features, [self.columns[f][pos] for f in self.features], [lengths] * len(self.features))
        return SequenceBatch(features=kjt, timestamps=torch.from_numpy(self.event_time[pos].astype(np.int64, copy=False)),
                             lengths=torch.from_numpy(lengths), num_eval_targets=self.num_eval_targets)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar length, so padded attention pays little for padding.

    Shuffles, cuts the order into pools of ``pool_batches`` batches, sorts each pool by length, splits it
    into batches and shuffles the batches. Deterministic for a given ``seed`` and :meth:`set_epoch`.

    **Data parallelism (``num_replicas`` W > 1).** ``batch_size`` is the per-rank batch (the jobs pass
    ``train.batch_size // W``). The sampler forms the *global* batches of ``batch_size * W`` samples exactly
    as one process with that batch size would — the same pools, the same order — and deals each one over the
    ranks, rank ``r`` taking its samples ``r, r + W, ...``. Since a global batch is a run of length-sorted
    samples, every rank gets the same mix of lengths: a step waits for the slowest rank, and dealing whole
    per-rank batches instead (one rank the short sequences, another the long ones) made the 2-rank step up
    to 2x slower than its work. So:

    - a W-rank run sees, step for step, the same samples as a 1-rank run of ``train.batch_size``;
    - an epoch is ``ceil(N / train.batch_size)`` steps whatever W (``floor`` with ``drop_last``), every
      sample seen once; only a final global batch with fewer samples than ranks repeats one on the ranks
      that would get none (an empty batch cannot be stepped on).

    Args:
        lengths: ``[N]`` length of each sample.
        batch_size: samples per batch (per rank).
        shuffle: ``False`` keeps index order (evaluation), still in batches of ``batch_size``.
        seed: base seed; the epoch is added to it.
        pool_batches: how many (global) batches are sorted together (1 = no bucketing).
        drop_last: drop a final short (global) batch.
        num_replicas, rank: data parallelism.
        rows: sample only these rows (ascending; ``None``: all); the batches hold row numbers.

    Example:
        >>> lengths = np.array([5, 1, 4, 2, 3, 6, 8, 7])
        >>> [BucketBatchSampler(lengths, 2, shuffle=False, num_replicas=2, rank=r).global_batches()[0].tolist()
        ...  for r in (0, 1)]
        [[0, 1, 2, 3], [0, 1, 2, 3]]
        >>> [list(BucketBatchSampler(lengths, 2, shuffle=False, num_replicas=2, rank=r))[0] for r in (0, 1)]
        [[0, 2], [1, 3]]
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, shuffle: bool = True, seed: int = 0,
                 pool_batches: int = 50, drop_last: bool = False, num_replicas: int = 1, rank: int = 0,
                 rows: np.ndarray | None = None) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.lengths = np.asarray(lengths) if self.rows is None else np.asarray(lengths)[self.rows]
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.pool_batches, self.drop_last = pool_batches, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[np.ndarray]:
        """This epoch's global batches (``batch_size * num_replicas`` samples each; the last may be short)."""
        n, size = len(self.lengths), self.batch_size * self.num_replicas
        if not self.shuffle:
            order = np.arange(n)
            batches = [order[i:i + size] for i in range(0, n, size)]
        else:
            rng = np.random.default_rng((self.seed, self.epoch))
            order = rng.permutation(n)
            pool = size * self.pool_batches
            batches = []
            for p in range(0, n, pool):
                chunk = order[p:p + pool]
                chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
                batches += [chunk[i:i + size] for i in range(0, len(chunk), size)]
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.drop_last:
            batches = [b for b in batches if len(b) == size]
        return batches

    def _batches(self) -> list[np.ndarray]:
        w, r = self.num_replicas, self.rank
        if w == 1:
            return self.global_batches()
        # length-sorted within a global batch (shuffled mode): dealing round-robin balances the ranks
        return [g[r::w] if len(g) > r else g[r % len(g):r % len(g) + 1] for g in self.global_batches()]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._batches():
            yield (batch if self.rows is None else self.rows[batch]).tolist()

    def __len__(self) -> int:
        return len(self.global_batches())


def _passthrough(batch):
    return batch


def user_subset(user_row: np.ndarray, max_users: int | None, seed: int = 0) -> np.ndarray | None:
    """Rows (ascending) of a split whose user is one of a seeded random ``max_users`` of the split's users.

    ``None`` when ``max_users`` is ``None`` or covers every user: the whole split. The same seed and the same
    users give the same subset, so every evaluation of a run (and of a resumed run) sees the same rows.

    Example:
        >>> user_subset(np.array([0, 0, 1, 2, 2, 3]), max_users=2, seed=0)
        array([3, 4, 5])
    """
    if max_users is None:
        return None
    users = np.unique(user_row)
    if max_users >= len(users):
        return None
    chosen = np.random.default_rng(seed).choice(users, size=max_users, replace=False)
    return np.flatnonzero(np.isin(user_row, chosen))


def make_loader(converter: CTRBatchConverter | SequenceBatchConverter, batch_size: int, shuffle: bool,
                seed: int = 0, num_workers: int = 0, pool_batches: int = 50, drop_last: bool = False,
                num_replicas: int = 1, rank: int = 0, max_users: int | None = None,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader of whole batches, bucketed by history / sequence length.

    ``max_users`` keeps only the rows of a seeded random subset of that many users (:func:`user_subset`):
    how evaluation stays affordable on a split of a million users scored against a catalogue of millions.
    ``pin_memory``: the loader puts each batch in page-locked memory (``CTRBatch.pin_memory`` /
    ``SequenceBatch.pin_memory``), for a non-blocking copy to CUDA
    (``hybrid.core.precision.pin_memory(device)`` says when; CPU runs leave it off).
    """
    lengths = (converter.history_lengths() if isinstance(converter, CTRBatchConverter)
               else converter.sequence_lengths())
    rows = user_subset(converter.user_row, max_users, seed=seed)
    sampler = BucketBatchSampler(lengths, batch_size, shuffle=shuffle, seed=seed, pool_batches=pool_batches,
                                 drop_last=drop_last, num_replicas=num_replicas, rank=rank, rows=rows)
    return DataLoader(converter, batch_sampler=sampler, collate_fn=_passthrough, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=pin_memory)
