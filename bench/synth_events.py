"""Seeded generator of Taobao-UserBehavior-shaped events at any size: the input for out-of-core prepare benchmarks.

Output is shaped like Tianchi's ``UserBehavior.csv``: no header, five columns
``user_id,item_id,category_id,behavior_type,timestamp`` (integer ids, behaviour one of ``pv``/``cart``/``fav``/``buy``,
unix seconds), so ``hybrid.data.readers.read_taobao`` reads it. With ``--format parquet`` (or a ``.parquet`` suffix)
the same columns go to parquet: ids and timestamp int64, ``behavior_type`` string, row groups of ~1M rows.

    python bench/synth_events.py --events 10000000 --out /tmp/ub.csv [--format csv|parquet] [--users N]
        [--items N] [--categories N] [--seed 0] [--chunk-events 2000000]

    from synth_events import generate          # with bench/ on sys.path
    summary = generate("/tmp/ub.csv", 1_000_000, seed=0)

How the events are drawn (the real file: 100M events, 988k users, 4.16M items, 9.4k categories, 9 days):

* **Sizes.** Defaults scale with ``events`` like the real file: users = events/101, items = events/24,
  categories = 4.63 * sqrt(items) capped at 9439 (equal to the real 9439 at 4.16M items, and still dozens of
  categories for a 20k-event file). Explicit values override; ``users`` may not exceed ``events``.
* **User activity.** Per-user event counts are lognormal (sigma 0.9): every user gets 1 event, and the other
  ``events - users`` are shared out in proportion to the lognormal weights (largest remainder), so the total is
  exactly ``events``.
* **Item popularity.** Zipf over item ranks (weight ``rank ** -1.0``), drawn by inverse CDF (``searchsorted`` on
  the cumulative weights). Ranks map to item ids through a random permutation of ``1..items``, so popularity
  is not id order; tail items may never occur (``items_seen`` in the summary counts those that do).
  A user re-visits: with probability 0.3 an event (not a user's first) copies the item of one of that user's
  earlier events, picked uniformly.
* **Categories.** Each item has exactly one category for the whole file, drawn once from a Zipf over category
  ranks (exponent 0.8; ids a permutation of ``1..categories``). Big categories hold many items.
* **Behaviour.** Independent per event: pv 89.5%, cart 5.5%, fav 2.9%, buy 2.1%.
* **Time.** Inside the real window 2017-11-25 00:00:00 .. 2017-12-03 23:59:59 China time (unix 1511539200 ..
  1512316799): a uniform day, an hour from a daily profile (quiet at night, peak at 20-22h China time), a
  uniform second. Each user's events are sorted by time (non-decreasing).
* **Order.** The file is grouped by user: each user's events are contiguous, users follow one another in a
  random order, and user ids are a random permutation of ``1..users`` (so the file is not sorted by id).

Memory and determinism: users are cut into fixed blocks of about ``BLOCK_EVENTS`` events (the number of users
per block depends only on ``events`` and ``users``); each block draws from its own generator,
``SeedSequence(seed, spawn_key=(1, block))``. Blocks are gathered into write chunks of about ``chunk_events``
and written one chunk at a time, so memory holds one chunk (plus the whole of any single user longer than
that) and per-user/per-item tables of ~40 bytes per item and ~16 per user -- never all events. The CSV bytes
depend only on (events, users, items, categories, seed), not on ``chunk_events``; parquet holds the same rows,
but its row-group layout follows the chunks. Files are written to a temporary file beside the output and
renamed into place at the end (removed on failure).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

COLUMNS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
BEHAVIORS = ("pv", "cart", "fav", "buy")
BEHAVIOR_SHARES = (0.895, 0.055, 0.029, 0.021)
WINDOW_START = 1511539200      # 2017-11-25 00:00:00 +08:00
WINDOW_DAYS = 9                # .. 2017-12-03 23:59:59 +08:00 = 1512316799
WINDOW_END = WINDOW_START + WINDOW_DAYS * 86400 - 1
# relative activity per China-time hour 0..23 (night low, evening peak)
HOUR_WEIGHTS = (4, 2, 1, 1, 1, 1, 2, 3, 4, 5, 6, 6, 6, 6, 6, 6, 6, 6, 6, 7, 9, 10, 9, 7)

EVENTS_PER_USER = 101          # real file: 100.15M events / 987,994 users
EVENTS_PER_ITEM = 24           # real file: 100.15M events / 4,162,024 items
MAX_CATEGORIES = 9439          # real file
CATEGORIES_PER_SQRT_ITEM = 4.63
USER_SIGMA = 0.9               # lognormal sigma of per-user activity
ITEM_EXPONENT = 1.0            # Zipf exponent over item ranks
CATEGORY_EXPONENT = 0.8        # Zipf exponent over category ranks (how many items each category holds)
REVISIT = 0.3                  # chance that an event re-uses one of the user's earlier items

BLOCK_EVENTS = 1 << 18         # events per generation block (fixed: part of the determinism, not an option)
DEFAULT_CHUNK_EVENTS = 2_000_000
ROW_GROUP_ROWS = 1_000_000
SUFFIX_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}

SCHEMA = pa.schema([
    ("user_id", pa.int64()),
    ("item_id", pa.int64()),
    ("category_id", pa.int64()),
    ("behavior_type", pa.string()),
    ("timestamp", pa.int64()),
])


def default_sizes(events: int) -> tuple[int, int, int]:
    """(users, items, categories) scaled from ``events`` like the real file (see the module docstring)."""
    users = max(1, round(events / EVENTS_PER_USER))
    items = max(1, round(events / EVENTS_PER_ITEM))
    categories = max(1, min(MAX_CATEGORIES, items, round(CATEGORIES_PER_SQRT_ITEM * math.sqrt(items))))
    return users, items, categories


def cdf_of(weights: np.ndarray) -> np.ndarray:
    """Cumulative probabilities of ``weights`` (any positive scale); the last entry is exactly 1."""
    cdf = np.cumsum(np.asarray(weights, dtype=np.float64))
    cdf /= cdf[-1]
    cdf[-1] = 1.0
    return cdf


def zipf_cdf(n: int, exponent: float) -> np.ndarray:
    """Cumulative probabilities of ranks 1..n under weight ``rank ** -exponent``."""
    return cdf_of(np.arange(1, n + 1, dtype=np.float64) ** -exponent)


def draw(cdf: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` indices 0..len(cdf)-1 drawn by inverse CDF."""
    return np.searchsorted(cdf, rng.random(n), side="right")


def redraw_ids(kjt, rng: np.random.Generator, item_cdf: np.ndarray, item_perm: np.ndarray, item_keys: tuple[str, ...],
               users: int = 0, user_keys: tuple[str, ...] = ()):
    """``kjt`` (a ``KeyedJaggedTensor`` of real batches) at Taobao scale: the ids of ``item_keys`` drawn from the
    Zipf popularity ``item_cdf`` over ranks permuted by ``item_perm``, those of ``user_keys`` uniform over
    ``users`` rows; the reserved ids (padding, OOV) and every other key kept, the lengths unchanged."""
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from hybrid.core.feature_map import NUM_RESERVED_IDS

    values = []
    for key, jt in kjt.to_dict().items():
        v = jt.values().clone()
        real = v >= NUM_RESERVED_IDS
        n = int(real.sum())
        if key in item_keys:
            v[real] = torch.from_numpy(item_perm[draw(item_cdf, rng, n)] + NUM_RESERVED_IDS)
        elif key in user_keys:
            v[real] = torch.from_numpy(rng.integers(NUM_RESERVED_IDS, users + NUM_RESERVED_IDS, n))
        values.append(v)
    return KeyedJaggedTensor.from_lengths_sync(keys=kjt.keys(), values=torch.cat(values), lengths=kjt.lengths())


def user_event_counts(users: int, events: int, rng: np.random.Generator) -> np.ndarray:
    """Per-user event counts: lognormal weights, each at least 1, summing exactly to ``events``."""
    weights = rng.lognormal(0.0, USER_SIGMA, users)
    share = weights / weights.sum() * (events - users)
    counts = np.floor(share).astype(np.int64)
    short = (events - users) - int(counts.sum())           # 0 <= short < users
    if short:
        top = np.argpartition(counts - share, short - 1)[:short]   # largest fractional parts first
        counts[top] += 1
    return counts + 1


@dataclass
class World:
    """What every block shares: per-user counts and ids, item popularity and categories."""

    counts: np.ndarray          # [users] events per user, in file order
    user_ids: np.ndarray        # [users] id of the user at each file position
    item_cdf: np.ndarray        # [items] inverse-CDF table over popularity ranks
    item_by_rank: np.ndarray    # [items] item id at each rank
    item_category: np.ndarray   # [items + 1] category id of each item id (entry 0 unused)
    users_per_block: int

    @property
    def blocks(self) -> int:
        return -(-len(self.counts) // self.users_per_block)


def make_world(events: int, users: int, items: int, categories: int, seed: int) -> World:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    counts = user_event_counts(users, events, rng)
    user_ids = rng.permutation(np.arange(1, users + 1, dtype=np.int64))
    item_by_rank = rng.permutation(np.arange(1, items + 1, dtype=np.int64))
    category_by_rank = rng.permutation(np.arange(1, categories + 1, dtype=np.int64))
    item_category = np.zeros(items + 1, dtype=np.int64)
    item_category[1:] = category_by_rank[draw(zipf_cdf(categories, CATEGORY_EXPONENT), rng, items)]
    users_per_block = max(1, BLOCK_EVENTS * users // events)
    return World(counts, user_ids, zipf_cdf(items, ITEM_EXPONENT), item_by_rank, item_category, users_per_block)


def make_block(world: World, block: int, seed: int) -> pa.Table:
    """The events of one block of users, as an Arrow table with :data:`SCHEMA` (file order)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, block)))
    u0 = block * world.users_per_block
    counts = world.counts[u0:u0 + world.users_per_block]
    n = int(counts.sum())
    user = np.repeat(np.arange(len(counts), dtype=np.int64), counts)     # local user index of each event
    start = np.cumsum(counts) - counts                                   # first event of each local user

    # time: day, hour from the daily profile, second; then sorted within each user (user is the high key)
    hour = draw(cdf_of(HOUR_WEIGHTS), rng, n)
    offset = rng.integers(0, WINDOW_DAYS, n) * 86400 + hour * 3600 + rng.integers(0, 3600, n)
    key = (user << 20) | offset                                          # offset < 2**20
    key.sort()
    timestamp = (key & ((1 << 20) - 1)) + WINDOW_START

    # items: a Zipf draw, or a re-visit of one of this user's earlier draws
    fresh = world.item_by_rank[draw(world.item_cdf, rng, n)]
    position = np.arange(n, dtype=np.int64) - start[user]                # 0 for a user's first event
    revisit = (rng.random(n) < REVISIT) & (position > 0)
    source = start[user] + (rng.random(n) * position).astype(np.int64)  # an earlier event of the same user
    item = np.where(revisit, fresh[source], fresh)

    behavior = pa.array(BEHAVIORS).take(pa.array(draw(cdf_of(BEHAVIOR_SHARES), rng, n)))
    arrays = [pa.array(world.user_ids[u0 + user]), pa.array(item), pa.array(world.item_category[item]),
              behavior, pa.array(timestamp)]
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def format_for(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in ("csv", "parquet"):
            raise ValueError(f"format must be 'csv' or 'parquet', not {fmt!r}")
        return fmt
    suffix = path.suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        raise ValueError(f"{path}: cannot tell the format from suffix {suffix or '(none)'!r}; "
                         f"use .csv/.parquet or pass fmt ('csv' or 'parquet')")
    return SUFFIX_FORMATS[suffix]


def generate(path: str | Path, events: int, *, users: int | None = None, items: int | None = None,
             categories: int | None = None, seed: int = 0, fmt: str | None = None,
             chunk_events: int = DEFAULT_CHUNK_EVENTS, progress: bool = False) -> dict:
    """Write ``events`` synthetic Taobao events to ``path`` (atomically) and return summary stats.

    Args:
        path: output file; its directory must exist.
        events: total number of events (rows), exactly.
        users, items, categories: sizes; None scales with ``events`` (:func:`default_sizes`).
        seed: the same seed and sizes give the same rows (CSV: the same bytes, whatever ``chunk_events``).
        fmt: ``"csv"`` or ``"parquet"``; None takes it from the suffix.
        chunk_events: about how many events are held and written at once.
        progress: print one line per written chunk to stderr.

    Returns:
        ``{"path", "format", "events", "users", "items", "categories", "items_seen", "max_user_events",
        "seed", "bytes", "seconds"}``.
    """
    began = time.perf_counter()
    path = Path(path)
    fmt = format_for(path, fmt)
    if events < 1:
        raise ValueError(f"events must be >= 1, not {events}")
    default_users, default_items, default_categories = default_sizes(events)
    users = default_users if users is None else users
    items = default_items if items is None else items
    categories = default_categories if categories is None else categories
    if not 1 <= users <= events:
        raise ValueError(f"users must be between 1 and events ({events}), not {users}")
    if items < 1 or categories < 1:
        raise ValueError(f"items and categories must be >= 1, not {items} and {categories}")
    if chunk_events < 1:
        raise ValueError(f"chunk_events must be >= 1, not {chunk_events}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: output directory {path.parent} does not exist (or is not a directory)")

    world = make_world(events, users, items, categories, seed)
    seen = np.zeros(items + 1, dtype=bool)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if fmt == "csv":
            sink = pa.OSFile(tmp, "wb")
            options = pa_csv.WriteOptions(include_header=False, quoting_style="none")
            writer = pa_csv.CSVWriter(sink, SCHEMA, write_options=options)
        else:
            sink = None
            writer = pq.ParquetWriter(tmp, SCHEMA)
        try:
            pending, pending_events, written = [], 0, 0
            for block in range(world.blocks):
                table = make_block(world, block, seed)
                seen[table.column("item_id").to_numpy()] = True
                pending.append(table)
                pending_events += table.num_rows
                if pending_events >= chunk_events or block == world.blocks - 1:
                    table = pa.concat_tables(pending)                    # no copy: one chunk per block
                    pending, pending_events = [], 0
                    if fmt == "csv":
                        writer.write_table(table)
                    else:
                        writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
                    written += table.num_rows
                    del table
                    if progress:
                        print(f"{written:,}/{events:,} events, {time.perf_counter() - began:.1f}s",
                              file=sys.stderr, flush=True)
        finally:
            writer.close()
            if sink is not None:
                sink.close()
        if written != events:
            raise RuntimeError(f"wrote {written} events, expected {events}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                                    # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {
        "path": str(path),
        "format": fmt,
        "events": events,
        "users": users,
        "items": items,
        "categories": categories,
        "items_seen": int(seen.sum()),
        "max_user_events": int(world.counts.max()),
        "seed": seed,
        "bytes": path.stat().st_size,
        "seconds": round(time.perf_counter() - began, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--events", type=int, required=True, help="total events (rows)")
    parser.add_argument("--out", type=Path, required=True, help="output file (.csv or .parquet)")
    parser.add_argument("--format", choices=("csv", "parquet"), default=None, help="default: from the --out suffix")
    parser.add_argument("--users", type=int, default=None, help="default: events/101")
    parser.add_argument("--items", type=int, default=None, help="default: events/24")
    parser.add_argument("--categories", type=int, default=None, help="default: min(9439, 4.63*sqrt(items))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-events", type=int, default=DEFAULT_CHUNK_EVENTS, help="events held/written at once")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    try:
        summary = generate(args.out, args.events, users=args.users, items=args.items, categories=args.categories,
                           seed=args.seed, fmt=args.format, chunk_events=args.chunk_events, progress=not args.quiet)
    except (ValueError, OSError) as exc:
        print(f"synth_events: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
