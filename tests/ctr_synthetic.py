"""Synthetic, learnable CTR batches built by hand — for tests and smoke runs of the rankers.

Every sample has MovieLens-like fields (``user_id``, ``gender``, ``age``, ``occupation``, ``item_id``,
``category``, ``year``, multi-valued ``genres``) and a chronological history (``hist_item_id``,
``hist_category``, ``hist_action`` + timestamps). Labels are deterministic functions of the sample, so a
working model reaches a high AUC quickly:

* ``"in_history"`` — 1 iff the candidate item occurs in the history (needs history × candidate interaction);
* ``"recent"`` — 1 iff the candidate is among the ``recent_k`` most recent events (needs order/time);
* ``"parity"`` — 1 iff the candidate item id is odd (needs the item embedding only).

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> batch = make_synthetic_batch(64, g, tasks=("in_history", "parity"))
    >>> batch.labels.shape, batch.task_names
    (torch.Size([64, 2]), ('in_history', 'parity'))
"""
from __future__ import annotations

import torch
from torchrec import KeyedJaggedTensor

from hybrid.core import NUM_RESERVED_IDS, CTRBatch

NUM_ITEMS = 200
SYNTHETIC_VOCAB_SIZES: dict[str, int] = {
    "user_id": 100 + NUM_RESERVED_IDS,
    "gender": 2 + NUM_RESERVED_IDS,
    "age": 7 + NUM_RESERVED_IDS,
    "occupation": 21 + NUM_RESERVED_IDS,
    "item_id": NUM_ITEMS + NUM_RESERVED_IDS,
    "category": 10 + NUM_RESERVED_IDS,
    "year": 20 + NUM_RESERVED_IDS,
    "genres": 18 + NUM_RESERVED_IDS,
    "action": 5 + NUM_RESERVED_IDS,
}
TASKS = ("in_history", "recent", "parity")
_SINGLE = ("user_id", "gender", "age", "occupation", "item_id", "category", "year")


def _category(item: torch.Tensor) -> torch.Tensor:
    return NUM_RESERVED_IDS + item % 10


def make_synthetic_batch(batch_size: int, generator: torch.Generator, tasks: tuple[str, ...] = ("in_history",),
                         max_hist: int = 12, recent_k: int = 3, num_dense: int = 0) -> CTRBatch:
    """One synthetic :class:`CTRBatch` (see the module docstring for the label definitions).

    Args:
        batch_size: ``B``.
        generator: seeded ``torch.Generator`` (reproducible batches).
        tasks: label columns, any of ``"in_history"``, ``"recent"``, ``"parity"``.
        max_hist: histories have 0..``max_hist`` events (about 1 in 8 empty).
        recent_k: window of the ``"recent"`` task.
        num_dense: width of ``dense`` (standard-normal noise).
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"make_synthetic_batch.tasks: unknown {unknown}; expected some of {list(TASKS)}")
    g = generator
    B = batch_size
    lo = NUM_RESERVED_IDS
    lengths = torch.randint(0, max_hist + 1, (B,), generator=g)
    hist_items = [torch.randint(lo, lo + NUM_ITEMS, (int(n),), generator=g) for n in lengths]
    cand = torch.randint(lo, lo + NUM_ITEMS, (B,), generator=g)
    # Half of the samples with a history take their candidate from it; half of those from the recent window.
    pick = torch.rand(B, generator=g)
    for b in range(B):
        n = int(lengths[b])
        if n > 0 and pick[b] < 0.5:
            start = max(0, n - recent_k) if pick[b] < 0.25 else 0
            j = int(torch.randint(start, n, (1,), generator=g))
            cand[b] = hist_items[b][j]

    labels = []
    for task in tasks:
        if task == "in_history":
            y = [float(bool((h == c).any())) for h, c in zip(hist_items, cand.tolist())]
        elif task == "recent":
            y = [float(bool((h[-recent_k:] == c).any())) for h, c in zip(hist_items, cand.tolist())]
        else:
            y = (cand % 2).float().tolist()
        labels.append(torch.tensor(y))
    label_tensor = torch.stack(labels, 1) if labels else torch.zeros(B, 0)

    single = {
        "user_id": torch.randint(lo, SYNTHETIC_VOCAB_SIZES["user_id"], (B,), generator=g),
        "gender": torch.randint(lo, SYNTHETIC_VOCAB_SIZES["gender"], (B,), generator=g),
        "age": torch.randint(lo, SYNTHETIC_VOCAB_SIZES["age"], (B,), generator=g),
        "occupation": torch.randint(lo, SYNTHETIC_VOCAB_SIZES["occupation"], (B,), generator=g),
        "item_id": cand,
        "category": _category(cand),
        "year": lo + cand % 20,
    }
    genre_lengths = 1 + cand % 3
    genres = torch.tensor([lo + (int(cand[b]) + 7 * k) % 18 for b in range(B)
                           for k in range(int(genre_lengths[b]))], dtype=torch.long)
    hist_item = torch.cat(hist_items) if hist_items else torch.zeros(0, dtype=torch.long)
    hist_action = torch.randint(lo, SYNTHETIC_VOCAB_SIZES["action"], (hist_item.numel(),), generator=g)

    keys, values, key_lengths = [], [], []
    for k in _SINGLE:
        keys.append(k), values.append(single[k]), key_lengths.append(torch.ones(B, dtype=torch.long))
    keys.append("genres"), values.append(genres), key_lengths.append(genre_lengths)
    for k, v in (("hist_item_id", hist_item), ("hist_category", _category(hist_item)),
                 ("hist_action", hist_action)):
        keys.append(k), values.append(v), key_lengths.append(lengths)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values).long(),
                                              lengths=torch.cat(key_lengths).int())

    # Candidate at t0; history events at strictly increasing earlier times, gaps of minutes to days.
    t0 = 1_700_000_000 + torch.randint(0, 10**6, (B,), generator=g)
    hist_ts = []
    for b in range(B):
        n = int(lengths[b])
        gaps = torch.randint(60, 86_400 * 3, (n,), generator=g)
        hist_ts.append(t0[b] - gaps.flip(0).cumsum(0).flip(0))
    hist_timestamps = torch.cat(hist_ts) if hist_ts else torch.zeros(0, dtype=torch.long)
    return CTRBatch(sparse=kjt, dense=torch.randn(B, num_dense, generator=g), labels=label_tensor,
                    timestamps=t0, hist_timestamps=hist_timestamps.long(), user_index=single["user_id"] - lo,
                    task_names=tuple(tasks))
