"""The canonical in-memory shape of a behaviour dataset, shared by every reader and protocol.

Readers (``hybrid.data.readers``) turn MovieLens, RecBole atomic files, Taobao UserBehavior or a generic
events table into a :class:`RawDataset`; protocols (``hybrid.data.protocols``) never look at file formats.

Raw ids are kept as strings (``str`` dtype ``object``): the feature map keys its vocabularies by raw value,
JSON stores them as strings, and ids from two datasets can then be aligned by value.

Columns
-------
events (required): ``user_id`` str, ``item_id`` str, ``timestamp`` int64 (unix seconds), and optionally
``rating`` float64 (explicit feedback) and ``behavior`` str (e.g. Taobao ``pv``/``cart``/``fav``/``buy``).
items (optional): ``item_id`` str (unique), ``title`` str, ``genres`` str (``|``-separated, first = the
category), ``year`` str (``"unknown"`` when absent).
users (optional): ``user_id`` str (unique), ``gender`` str, ``age`` str, ``occupation`` str, ``zip`` str.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

EVENT_COLUMNS = ("user_id", "item_id", "timestamp")
OPTIONAL_EVENT_COLUMNS = ("rating", "behavior")
ITEM_COLUMNS = ("item_id", "title", "genres", "year")
USER_COLUMNS = ("user_id", "gender", "age", "occupation", "zip")


@dataclass
class RawDataset:
    """Events plus optional item and user side tables, in the canonical columns above.

    Args:
        name: short dataset name (``movielens-100k``, ``movielens-1m``, ``taobao``, ...).
        events: one row per behaviour event.
        items: one row per item, or ``None`` when the source has no item side table.
        users: one row per user, or ``None``.
        source: where it was read from (a path), for messages and the stats file.
        origin: the events file and its row numbering (``None``: events from several files, or unknown).
    """

    name: str
    events: pd.DataFrame
    items: pd.DataFrame | None = None
    users: pd.DataFrame | None = None
    source: str = ""
    origin: RowOrigin | None = None


@dataclass(frozen=True)
class RowOrigin:
    """Where a reader's events come from, to name one of them in a message: the events file and how its data
    rows are numbered (``events`` row ``i`` is data row ``i``; blank lines, which readers skip, are not counted).

    Args:
        path: the events file.
        first_line: the line (or row) number of data row 0: 1 without a header row, 2 with one.
        unit: ``line`` (text files) or ``row`` (parquet).

    Example:
        >>> RowOrigin("u.data").at(4)
        'u.data, line 5'
    """

    path: str
    first_line: int = 1
    unit: str = "line"

    def at(self, row: int) -> str:
        return f"{self.path}, {self.unit} {int(row) + self.first_line}"
