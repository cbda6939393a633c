"""What ``hybrid data prepare`` refuses before it writes a prepared directory, and what the training jobs check
in one before they build a model.

The readers refuse cells that are not finite numbers, timestamps that are no point in time and rows with extra
fields (one line: file, line or row, column). Here, over the events as read (``raw_events`` of an out-of-core
engine, in its own SQL, or the in-memory frame of the pandas engine):

- **duplicate rows** — the same user, item, timestamp and every other field — are refused by default, naming
  the first row that repeats an earlier one; ``data.duplicates: drop`` keeps the first of each and the stats
  count the others (``duplicates_dropped``);
- **empty splits**: a protocol whose time split leaves no CTR training, validation or test sample, or no
  pretraining sequence to train or evaluate on (all events at one timestamp, say), is refused with the counts,
  instead of a prepared directory that fine-tuning dies on later.

Errors are :class:`PreparedDataError` (a :class:`~hybrid.core.errors.HybridInputError`): one line, exit code 2.

Example:
    >>> check_samples({"ctr_train": {"samples": 4}, "ctr_valid": {"samples": 0}, "ctr_test": {"samples": 2},
    ...                "pretrain_train": {"sequences": 3}, "pretrain_eval": {"sequences": 1},
    ...                "events": 9, "time_range": [5, 5]}, "u.data", ProtocolConfig(protocol="ratings"))
    Traceback (most recent call last):
    hybrid.data.validation.PreparedDataError: u.data, column 'timestamp': all 9 events are at the same time (5), \
so the ratings protocol's time split leaves no CTR validation samples (CTR samples: 4 train / 0 validation / 2 test; \
pretraining sequences: 3 train / 1 eval); later stages need events at different times
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pandas as pd

from hybrid.core.errors import HybridInputError
from hybrid.data.protocols import ProtocolConfig
from hybrid.data.schema import EVENT_COLUMNS, OPTIONAL_EVENT_COLUMNS, RawDataset

Duplicates = Literal["error", "drop"]
DUPLICATES = ("error", "drop")
#: the relation of the events the protocol steps read: ``raw_events``, or its rows without duplicates
EVENTS = "events_in"

# (stats key, count key, what it is, the stages that need it)
_NEEDED = (
    ("ctr_train", "samples", "CTR training samples", ("finetune",)),
    ("ctr_valid", "samples", "CTR validation samples", ("finetune",)),
    ("ctr_test", "samples", "CTR test samples", ("finetune",)),
    ("pretrain_train", "sequences", "pretraining sequences", ("pretrain",)),
    ("pretrain_eval", "sequences", "pretraining evaluation sequences", ("pretrain",)),
)


class PreparedDataError(HybridInputError):
    """Data that a later stage cannot use: duplicate events, or a split that the protocol leaves empty."""


# -- duplicates ---------------------------------------------------------------------------------------------------

def _duplicate_message(first_dup: str, original: str, columns: tuple[str, ...], count: int) -> str:
    rows = "row" if count == 1 else "rows"
    return (f"{first_dup}: duplicate of {original} (same {', '.join(columns)}); {count} duplicate {rows} in all. "
            "Set data.duplicates: drop (--set data.duplicates=drop) to keep the first of each")


def deduplicate(db, source, duplicates: Duplicates | None) -> int:
    """Create :data:`EVENTS` from ``raw_events`` in an engine's backend (a :class:`~hybrid.data.sql_protocol.Backend`):
    ``None`` takes every row unchecked; ``error`` refuses a duplicate row (one line naming it and the row it
    repeats); ``drop`` keeps the first of each. Returns how many rows were dropped.

    The check is one aggregation (``count(*)`` vs the distinct rows); only data with duplicates pays a window."""
    if duplicates is not None and duplicates not in DUPLICATES:
        raise HybridInputError(f"data.duplicates must be one of {', '.join(DUPLICATES)}, got {duplicates!r}")
    columns = tuple(source.event_columns)
    cols = ", ".join(db.q(c) for c in columns)
    dropped = 0
    if duplicates is not None:
        total = int(db.scalar("SELECT count(*) FROM raw_events"))
        dropped = total - int(db.scalar(f"SELECT count(*) FROM (SELECT DISTINCT {cols} FROM raw_events) d"))
    if dropped == 0:
        db.view(EVENTS, "SELECT * FROM raw_events")
        return 0
    ranked = (f"SELECT rn, {cols}, row_number() OVER (PARTITION BY {cols} ORDER BY rn) AS k, "
              f"min(rn) OVER (PARTITION BY {cols}) AS first_rn FROM raw_events")
    if duplicates == "error":
        rn, first_rn = db.row(f"SELECT rn, first_rn FROM ({ranked}) r WHERE k > 1 ORDER BY rn LIMIT 1")
        file = source.file()
        raise PreparedDataError(_duplicate_message(source.row(rn), source.row(first_rn).removeprefix(f"{file}, "),
                                                   columns, dropped))
    db.table(EVENTS, f"SELECT rn, {cols} FROM ({ranked}) r WHERE k = 1")
    return dropped


def deduplicate_frame(data: RawDataset, duplicates: Duplicates) -> tuple[RawDataset, int]:
    """:func:`deduplicate` for the in-memory (pandas) engine: ``(data without duplicate events, dropped)``."""
    if duplicates not in DUPLICATES:
        raise HybridInputError(f"data.duplicates must be one of {', '.join(DUPLICATES)}, got {duplicates!r}")
    events = data.events.reset_index(drop=True)
    columns = tuple(c for c in (*EVENT_COLUMNS, *OPTIONAL_EVENT_COLUMNS) if c in events)
    repeated = events.duplicated(list(columns), keep="first").to_numpy()
    dropped = int(repeated.sum())
    if dropped == 0:
        return data, 0
    if duplicates == "error":
        row = int(repeated.argmax())
        original = _first_equal(events, row, columns)
        where = data.origin.at if data.origin else (lambda i: f"{data.source or data.name}, event {i + 1}")
        file = data.origin.path if data.origin else (data.source or data.name)
        raise PreparedDataError(_duplicate_message(where(row), where(original).removeprefix(f"{file}, "),
                                                   columns, dropped))
    kept = events[~repeated].reset_index(drop=True)
    return RawDataset(data.name, kept, data.items, data.users, data.source, data.origin), dropped


def _first_equal(events: pd.DataFrame, row: int, columns: tuple[str, ...]) -> int:
    """The position of the first event equal to event ``row`` in ``columns``."""
    same = pd.Series(True, index=events.index)
    for c in columns:
        same &= events[c] == events[c].iloc[row]
    return int(same.to_numpy().argmax())


# -- splits -------------------------------------------------------------------------------------------------------

def _counts(stats: dict) -> str:
    def n(key: str, count: str) -> int:
        return int(stats[key][count])

    return (f"CTR samples: {n('ctr_train', 'samples')} train / {n('ctr_valid', 'samples')} validation / "
            f"{n('ctr_test', 'samples')} test; pretraining sequences: {n('pretrain_train', 'sequences')} train / "
            f"{n('pretrain_eval', 'sequences')} eval")


def check_samples(stats: dict, events_file: str, cfg: ProtocolConfig) -> None:
    """Refuse a protocol's output (its ``stats``) that leaves a split some later stage needs empty: CTR train,
    validation (unless ``validation_share`` is 0: no validation split asked for) and test samples, pretraining
    train and eval sequences. ``events_file`` names the input in the message."""
    empty = [what for key, count, what, _ in _NEEDED
             if int(stats[key][count]) == 0 and not (key == "ctr_valid" and cfg.validation_share == 0)]
    if not empty:
        return
    first, last = stats["time_range"]
    if first == last:
        why = f"all {stats['events']} events are at the same time ({first}), so "
        fix = "later stages need events at different times"
    else:
        why = ""
        knob = "user_split_quantile" if cfg.protocol == "last-item" else "time_cut_quantile"
        fix = (f"later stages need at least one of each: more events at distinct times, or other "
               f"protocol.{knob} / protocol.validation_share")
    raise PreparedDataError(f"{events_file}, column 'timestamp': {why}the {cfg.protocol} protocol's time split leaves "
                            f"no {', no '.join(empty)} ({_counts(stats)}); {fix}")


def check_prepared_stats(path: str | Path, stage: str) -> None:
    """Before a training job builds a model: refuse a prepared directory whose ``stats.json`` shows no sample
    of a split ``stage`` (``finetune`` or ``pretrain``) trains or evaluates on. A directory without
    ``stats.json``, or written by an older version without some of its keys, is let through (the job's own
    checks then apply)."""
    try:
        stats = json.loads((Path(path) / "stats.json").read_text())
    except (OSError, ValueError):
        return
    if not isinstance(stats, dict):
        return
    for key, count, what, stages in _NEEDED:
        entry = stats.get(key)
        if stage in stages and isinstance(entry, dict) and entry.get(count) == 0:
            if key == "ctr_valid":  # the words of run_finetune's own check of the table
                raise PreparedDataError(f"{path}: the prepared data has no validation samples (ctr_valid); "
                                        "fine-tuning selects its checkpoint on validation: prepare it with "
                                        "protocol.validation_share > 0")
            raise PreparedDataError(f"{path}: the prepared data has no {what} ({key}, stats.json: {count} = 0); "
                                    f"`hybrid {stage}` needs them: prepare it again with more events at distinct "
                                    "times or other protocol settings")


def with_dropped(stats: dict, dropped: int) -> dict:
    """``stats`` with ``duplicates_dropped`` after ``events`` (the same place for every engine)."""
    out = {}
    for key, value in stats.items():
        if key != "duplicates_dropped":
            out[key] = value
        if key == "events":
            out["duplicates_dropped"] = int(dropped)
    return out
