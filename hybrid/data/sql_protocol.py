"""Both benchmark protocols defined once, as SQL over a few named views, for any engine with a :class:`Backend`.

The steps are the same on every engine; what differs is only how a query runs (:class:`Backend`'s
``table`` / ``view`` / ``fetch`` / ``write``) and a handful of functions whose spelling differs between
SQL dialects — identifier quoting, the text type, list literals, first element and length of a list,
splitting a string into a list, unnesting a list (with its positions), an ordered list aggregate. Each
backend spells those in its own dialect; every other clause (joins, windows, ``CASE``, ``greatest``,
``coalesce``, casts to ``BIGINT`` / ``FLOAT`` / ``DOUBLE``) is written once in the common subset of DuckDB
and Spark SQL. Engines: :mod:`hybrid.data.duckdb_engine` (one machine, out of core) and
:mod:`hybrid.data.spark_engine` (a cluster).

The input views (created by the engine's source loader): ``raw_events(rn, user_id, item_id, timestamp
[, rating][, behavior])`` with ``rn`` increasing in file order, optional ``raw_items(item_id, genres, year)``
and ``raw_users(user_id[, gender, age, occupation])``. The steps (each a table or view of the engine):

0. ``events_in``: ``raw_events``, checked for duplicate rows or without them (:mod:`hybrid.data.validation`;
   every later step reads it);
1. ``side``: item → genres list (``|``-split, empty → ``unknown``), ``category`` (the first genre), ``year``;
2. ``users0``: one row per user in raw-id order (``user_row``), its event count, first position, last time;
   ``ev``: every event with its absolute position (by user, then time, then file order), category, action;
3. the protocol's time rule → ``users1`` (held-out flags or training counts) and the ``train_ev`` view;
4. the feature map, fitted on ``train_ev`` with the reference's counting and id order
   (``vocab_<feature>(token, cnt, id)``);
5. the tables ``events``, ``users``, ``pretrain_*``, ``ctr_*`` (written by the backend), then the stats.

What comes back to Python: the vocabularies (one token per table row), the distribution of split times
(one count per distinct second) and, in ``last-item``, one positive id per user (for the sampled negative,
drawn in numpy with the reference's generator calls, and handed back as a view).

Example (a backend that prints what the ``side`` step asks of it):
    >>> class Printing(Backend):
    ...     def table(self, name, sql):
    ...         print(name, "=", " ".join(sql.split())[:60])
    >>> from hybrid.data.duckdb_sources import Source
    >>> build_side(Printing(), Source("demo", "", True, False, ("user_id", "item_id", "timestamp")))
    side = SELECT item_id, genres, genres[1] AS category, year FROM (...
"""
from __future__ import annotations

import time

import numpy as np

from hybrid.core.errors import HybridInputError
from hybrid.core.feature_map import NUM_RESERVED_IDS, OOV_ID, PAD_ID, FeatureMap, Vocabulary, history_key
from hybrid.data.duckdb_sources import Source
from hybrid.data.protocols import PROTOCOLS, UNKNOWN, USER_FIELDS, PreparedData, ProtocolConfig
from hybrid.data.validation import EVENTS, deduplicate, with_dropped


class Backend:
    """An engine as the protocol steps see it: how to run a query, and the few functions whose spelling
    differs between dialects. This base class spells them in DuckDB's dialect; a backend for another dialect
    overrides the spelling methods, every backend implements the execution methods.

    Args (of the spelling methods): SQL expressions as text.
    """

    #: the SQL type of text columns
    text = "VARCHAR"

    # -- spelling ------------------------------------------------------------------------------------------
    def q(self, name: str) -> str:
        """A quoted identifier (``end`` and ``offset`` are keywords)."""
        return '"' + name.replace('"', '""') + '"'

    def list_of(self, *items: str) -> str:
        """A list literal of SQL expressions."""
        return "[" + ", ".join(items) + "]"

    def bigint_list(self, *values: int) -> str:
        """A literal list of BIGINT."""
        return f"CAST([{', '.join(str(int(v)) for v in values)}] AS BIGINT[])"

    def first(self, items: str) -> str:
        """The first element of a list."""
        return f"{items}[1]"

    def size(self, items: str) -> str:
        return f"len({items})"

    def split_nonempty(self, text: str, sep: str) -> str:
        """``text`` split at the literal character ``sep``, empty parts dropped."""
        return f"list_filter(string_split({text}, '{sep}'), lambda x: x <> '')"

    def unnest(self, items: str) -> str:
        """A select-list item: one row per element of ``items``."""
        return f"unnest({items})"

    def unnest_indexed(self, items: str, value: str, index: str) -> str:
        """A select-list fragment: one row per element of ``items``, as ``value`` and its position ``index``
        (increasing along the list)."""
        return f"unnest({items}) AS {value}, generate_subscripts({items}, 1) AS {index}"

    def ordered_list(self, value: str, key: str) -> str:
        """An aggregate: the list of ``value`` ordered by ``key``."""
        return f"list({value} ORDER BY {key})"

    # -- execution ---------------------------------------------------------------------------------------------
    def table(self, name: str, sql: str) -> None:
        """Materialise ``sql`` as table ``name`` (it is read several times)."""
        raise NotImplementedError

    def view(self, name: str, sql: str) -> None:
        """Name ``sql`` (a view: computed where it is read)."""
        raise NotImplementedError

    def fetch(self, sql: str) -> dict[str, np.ndarray]:
        """The result of ``sql`` on the driver, one numpy array per column (text as object arrays), in the
        query's order. Only for small results (vocabularies, per-second counts, one row per user)."""
        raise NotImplementedError

    def row(self, sql: str) -> tuple:
        """The first row of ``sql``."""
        raise NotImplementedError

    def columns(self, relation: str) -> list[str]:
        """The column names of a table or view."""
        raise NotImplementedError

    def register(self, name: str, columns: dict[str, np.ndarray]) -> None:
        """Make numpy columns (made on the driver) a view ``name``."""
        raise NotImplementedError

    def write(self, table: str, sql: str) -> None:
        """Write ``sql`` (its ``ORDER BY`` kept) as the prepared table ``<out>/<table>.parquet``."""
        raise NotImplementedError

    def written(self, table: str) -> str:
        """A relation over a table already written by :meth:`write` (for the stats)."""
        raise NotImplementedError

    def scalar(self, sql: str):
        return self.row(sql)[0]


def quantile_from_counts(values: np.ndarray, counts: np.ndarray, q: float) -> float:
    """``np.quantile(np.repeat(values, counts), q)`` (the default ``linear`` method, bit for bit) without
    materialising the repeated array: ``values`` sorted and distinct, ``counts`` how often each occurs.

    Example:
        >>> quantile_from_counts(np.array([1, 5, 9]), np.array([2, 1, 3]), 0.7) == float(np.quantile([1, 1, 5, 9, 9, 9], 0.7))
        True
    """
    n = int(counts.sum())
    if n == 0:
        raise ValueError("quantile of an empty distribution")
    cumulative = np.cumsum(counts)

    def kth(k: int):  # the k-th smallest value, 0-based
        return values[int(np.searchsorted(cumulative, k, side="right"))]

    virtual = np.float64(n - 1) * np.float64(q)  # numpy's virtual index for 'linear'
    if virtual >= n - 1:
        return float(values[-1])
    if virtual < 0:
        return float(values[0])
    previous = np.floor(virtual)
    gamma = virtual - previous
    a, b = np.asarray(kth(int(previous))), np.asarray(kth(int(previous) + 1))
    diff = b - a  # numpy's _lerp, same operations in the same order
    result = a + diff * gamma
    if gamma >= 0.5:
        result = b - diff * (1 - gamma)
    return float(result)


# -- steps ------------------------------------------------------------------------------------------------------

def _double(value: float) -> str:
    """An exact DOUBLE literal (repr round-trips; views and COPY take no parameters)."""
    return f"CAST('{float(value)!r}' AS DOUBLE)"


def build_side(db: Backend, source: Source) -> None:
    """Step 1: ``side(item_id, genres, category, year)`` from ``raw_items``."""
    if not source.has_items:
        return
    db.table("side", f"""
        SELECT item_id, genres, {db.first('genres')} AS category, year FROM (
            SELECT item_id,
                   CASE WHEN {db.size('g')} = 0 THEN {db.list_of(f"'{UNKNOWN}'")} ELSE g END AS genres,
                   coalesce(year, '{UNKNOWN}') AS year
            FROM (SELECT item_id, {db.split_nonempty("coalesce(genres, '')", '|')} AS g, year
                  FROM raw_items) r) s""")


def build_events(db: Backend, source: Source) -> None:
    """Step 2: ``users0`` (one row per user, raw-id order) and ``ev`` (every event, with its position)."""
    db.table("users0", f"""
        SELECT user_id, CAST(row_number() OVER (ORDER BY user_id) - 1 AS BIGINT) AS user_row, length, last_time,
               CAST(sum(length) OVER (ORDER BY user_id ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) - length
                    AS BIGINT) AS first_pos
        FROM (SELECT user_id, count(*) AS length, max(timestamp) AS last_time FROM {EVENTS} GROUP BY user_id) c""")
    columns = source.event_columns
    category = f"coalesce(s.category, '{UNKNOWN}')" if source.has_items else f"CAST(NULL AS {db.text})"
    if "rating" in columns:  # the action token: the rating as text ("4", "3.5"), else the behaviour
        action = (f"CASE WHEN e.rating = round(e.rating) THEN CAST(CAST(e.rating AS BIGINT) AS {db.text}) "
                  f"ELSE CAST(e.rating AS {db.text}) END")
    elif "behavior" in columns:
        action = "e.behavior"
    else:
        action = f"CAST(NULL AS {db.text})"
    rating = ", e.rating" if "rating" in columns else ""
    side_join = "LEFT JOIN side s ON s.item_id = e.item_id" if source.has_items else ""
    db.table("ev", f"""
        SELECT u.user_row, u.first_pos + row_number() OVER (PARTITION BY e.user_id ORDER BY e.timestamp, e.rn) - 1
                   AS pos,
               e.user_id, e.item_id, e.timestamp, {category} AS category, {action} AS action{rating}
        FROM {EVENTS} e JOIN users0 u ON u.user_id = e.user_id {side_join}""")


def _vocabulary(db: Backend, name: str, counts_sql: str, min_count: int) -> Vocabulary:
    """``vocab_<name>(token, cnt, id)`` from ``counts_sql`` (columns ``token``, ``cnt``), in the reference's
    id order: frequency descending, then raw value (byte order of UTF-8 = code point order, as Python sorts)."""
    db.table(f"vocab_{name}", f"""
        SELECT token, cnt, CAST(row_number() OVER (ORDER BY cnt DESC, token) + {NUM_RESERVED_IDS - 1} AS BIGINT) AS id
        FROM ({counts_sql}) t WHERE token IS NOT NULL AND cnt >= {int(min_count)}""")
    table = db.fetch(f"SELECT token, cnt FROM vocab_{name} ORDER BY id")
    return Vocabulary(name, table["token"].tolist(), [int(c) for c in table["cnt"]])


def fit_feature_map(db: Backend, source: Source, cfg: ProtocolConfig) -> FeatureMap:
    """Step 4: the reference's ``_fit_feature_map`` over the ``train_ev`` view (see it for the counting rules)."""
    m = cfg.min_count
    db.table("item_counts", "SELECT item_id, count(*) AS cnt FROM train_ev GROUP BY item_id")
    vocabs = {"item_id": _vocabulary(db, "item_id", "SELECT item_id AS token, cnt FROM item_counts", m),
              "user_id": _vocabulary(db, "user_id", "SELECT user_id AS token, count(*) AS cnt FROM train_ev "
                                                    "GROUP BY user_id", m)}
    if source.has_items:
        known = "FROM item_counts c LEFT JOIN side s ON s.item_id = c.item_id"
        for name in ("category", "year"):
            vocabs[name] = _vocabulary(db, name, f"SELECT coalesce(s.{name}, '{UNKNOWN}') AS token, "
                                                 f"sum(c.cnt) AS cnt {known} GROUP BY coalesce(s.{name}, '{UNKNOWN}')",
                                       m)
        unknown_list = db.list_of(f"'{UNKNOWN}'")
        vocabs["genres"] = _vocabulary(db, "genres", f"""
            SELECT token, sum(cnt) AS cnt FROM (
                SELECT {db.unnest(f'coalesce(s.genres, {unknown_list})')} AS token, c.cnt {known}) x
            GROUP BY token""", m)
    if "rating" in source.event_columns or "behavior" in source.event_columns:
        vocabs["action"] = _vocabulary(db, "action", "SELECT action AS token, count(*) AS cnt FROM train_ev "
                                                     "GROUP BY action", m)
    if source.has_users:
        present = set(db.columns("raw_users"))
        for name in USER_FIELDS:
            if name in present:
                vocabs[name] = _vocabulary(db, name, f"""
                    SELECT {name} AS token, count(*) AS cnt FROM raw_users
                    WHERE user_id IN (SELECT DISTINCT user_id FROM train_ev) GROUP BY {name}""", m)
    shared = {history_key(name): name for name in ("item_id", "category", "action") if name in vocabs}
    metadata = {"dataset": source.name, "protocol": cfg.protocol,
                "fit_events": int(db.scalar("SELECT count(*) FROM train_ev"))}
    return FeatureMap(vocabs, shared=shared, metadata=metadata)


def _encoded(feature: str, column: str, fm: FeatureMap) -> str:
    """SQL for a raw column's id: missing → padding, unknown → OOV (needs ``LEFT JOIN vocab_<feature>``)."""
    if feature not in fm:
        return f"CAST({PAD_ID} AS BIGINT)"
    return f"CASE WHEN {column} IS NULL THEN {PAD_ID} ELSE coalesce(v_{feature}.id, {OOV_ID}) END"


def _join(feature: str, column: str, fm: FeatureMap) -> str:
    return f"LEFT JOIN vocab_{feature} v_{feature} ON v_{feature}.token = {column}" if feature in fm else ""


def write_events_and_users(db: Backend, fm: FeatureMap, source: Source) -> None:
    """Step 5 (both protocols): the encoded ``events`` (by position) and ``users`` (by user row)."""
    db.write("events", f"""
        SELECT {_encoded('item_id', 'ev.item_id', fm)} AS item_id, {_encoded('category', 'ev.category', fm)} AS category,
               {_encoded('action', 'ev.action', fm)} AS action, ev.timestamp
        FROM ev {_join('item_id', 'ev.item_id', fm)} {_join('category', 'ev.category', fm)}
             {_join('action', 'ev.action', fm)}
        ORDER BY ev.pos""")
    fields = [name for name in USER_FIELDS if name in fm] if source.has_users else []
    select = "".join(f", {_encoded(name, f'ru.{name}', fm)} AS {name}" for name in fields)
    joins = " ".join(_join(name, f"ru.{name}", fm) for name in fields)
    users_join = "LEFT JOIN raw_users ru ON ru.user_id = u.user_id" if fields else ""
    db.write("users", f"""
        SELECT u.user_id AS raw_user_id, {_encoded('user_id', 'u.user_id', fm)} AS user_id,
               u.first_pos AS {db.q('offset')}, u.length{select}
        FROM users0 u {_join('user_id', 'u.user_id', fm)} {users_join} {joins}
        ORDER BY u.user_row""")


def build_side_encoded(db: Backend, source: Source, fm: FeatureMap) -> dict[str, int] | None:
    """``side_enc``: each item's encoded category, year and genres; returns the ids of an item without side
    information (``unknown`` encoded), or None without an item table."""
    if not source.has_items:
        return None
    db.table("side_enc", f"""
        SELECT s.item_id, coalesce(v_category.id, {OOV_ID}) AS category, coalesce(v_year.id, {OOV_ID}) AS year,
               g.genres
        FROM side s
        LEFT JOIN vocab_category v_category ON v_category.token = s.category
        LEFT JOIN vocab_year v_year ON v_year.token = s.year
        JOIN (SELECT x.item_id, {db.ordered_list(f'coalesce(v.id, {OOV_ID})', 'x.k')} AS genres
              FROM (SELECT item_id, {db.unnest_indexed('genres', 'token', 'k')} FROM side) x
              LEFT JOIN vocab_genres v ON v.token = x.token GROUP BY x.item_id) g ON g.item_id = s.item_id""")
    return {name: int(fm[name].encode([UNKNOWN])[0]) for name in ("category", "year", "genres")}


def _candidate(db: Backend, raw: str, fm: FeatureMap, unknown: dict[str, int] | None) -> tuple[str, str]:
    """(select list, joins) of a candidate item's encoded columns, looked up by its raw id ``raw``."""
    select = f"coalesce(v_item_id.id, {OOV_ID}) AS item_id"
    joins = f"LEFT JOIN vocab_item_id v_item_id ON v_item_id.token = {raw}"
    if unknown is not None:
        select += (f", coalesce(se.category, {unknown['category']}) AS category, "
                   f"coalesce(se.year, {unknown['year']}) AS year, "
                   f"coalesce(se.genres, {db.bigint_list(unknown['genres'])}) AS genres")
        joins += f" LEFT JOIN side_enc se ON se.item_id = {raw}"
    return select, joins


def _write_splits(db: Backend, order: str, helpers: tuple[str, ...]) -> None:
    """``ctr_train`` / ``ctr_valid`` / ``ctr_test`` from table ``samples`` (its ``split`` = 0 / 1 / 2)."""
    columns = ", ".join(db.q(n) for n in db.columns("samples") if n not in ("split", *helpers))
    for split, table in enumerate(PreparedData.CTR_SPLITS):
        db.write(table, f"SELECT {columns} FROM samples WHERE split = {split} ORDER BY {order}")


# -- protocol A: last-item ----------------------------------------------------------------------------------------

def _last_item(db: Backend, source: Source, cfg: ProtocolConfig) -> tuple[FeatureMap, dict]:
    times = db.fetch("SELECT last_time, count(*) AS n FROM users0 GROUP BY last_time ORDER BY last_time")
    split_time = quantile_from_counts(times["last_time"], times["n"], cfg.user_split_quantile)
    valid_time = quantile_from_counts(times["last_time"], times["n"], cfg.user_split_quantile - cfg.validation_share)
    held_cut = valid_time if cfg.validation_share > 0 else split_time
    db.table("users1", f"""SELECT *, last_time > {_double(split_time)} AS is_test,
                   last_time > {_double(held_cut)} AND NOT last_time > {_double(split_time)} AS is_valid FROM users0""")
    # Training data: never a held-out user's last event, and none of their events when inductive.
    db.view("train_ev", f"""SELECT ev.* FROM ev JOIN users1 u ON u.user_row = ev.user_row
                   WHERE NOT (u.is_test OR u.is_valid)
                      OR (ev.pos <> u.first_pos + u.length - 1 AND {str(cfg.transductive).lower()})""")
    fm = fit_feature_map(db, source, cfg)
    write_events_and_users(db, fm, source)
    h, end = cfg.max_history, db.q("end")
    db.write("pretrain_train", f"""
        SELECT user_row, greatest(first_pos, first_pos + length - 1 - {h}) AS start, first_pos + length - 1 AS {end},
               CAST(0 AS BIGINT) AS num_eval_targets
        FROM users1 WHERE length >= 3 AND (NOT (is_test OR is_valid) OR {str(cfg.transductive).lower()})
        ORDER BY user_row""")
    db.write("pretrain_eval", f"""
        SELECT user_row, greatest(first_pos, first_pos + length - {h} - 1) AS start, first_pos + length AS {end},
               CAST(1 AS BIGINT) AS num_eval_targets
        FROM users1 WHERE is_test AND length >= 2 ORDER BY user_row""")

    # CTR: per user with history, the last item (label 1) and one uniform negative from the item vocabulary,
    # drawn in numpy with the reference's generator calls (ids, not raw values: the same draws).
    db.table("last_events", """
        SELECT u.user_row, u.first_pos, u.is_test, u.is_valid, ev.pos, ev.item_id, ev.timestamp
        FROM users1 u JOIN ev ON ev.pos = u.first_pos + u.length - 1 WHERE u.length >= 2""")
    positives = db.fetch(f"""SELECT l.user_row, coalesce(v.id, {OOV_ID}) AS id FROM last_events l
                             LEFT JOIN vocab_item_id v ON v.token = l.item_id ORDER BY l.user_row""")
    rng = np.random.default_rng(cfg.seed)
    vocab_size = len(fm["item_id"].tokens)
    negative = rng.integers(0, vocab_size, size=len(positives["id"])) + NUM_RESERVED_IDS
    clash = negative == positives["id"]
    while clash.any():  # a negative that equals the positive would be a contradictory label
        negative[clash] = rng.integers(0, vocab_size, size=int(clash.sum())) + NUM_RESERVED_IDS
        clash = negative == positives["id"]
    db.register("negatives", {"user_row": np.asarray(positives["user_row"], dtype=np.int64),
                              "id": negative.astype(np.int64)})
    unknown = build_side_encoded(db, source, fm)
    select, joins = _candidate(db, "c.raw", fm, unknown)
    db.table("samples", f"""
        WITH c AS (SELECT user_row, 0 AS k, item_id AS raw FROM last_events
                   UNION ALL
                   SELECT n.user_row, 1 AS k, v.token AS raw FROM negatives n JOIN vocab_item_id v ON v.id = n.id)
        SELECT l.user_row, greatest(l.first_pos, l.pos - {h}) AS hist_start, l.pos AS hist_end, {select},
               l.timestamp, CAST(1 - c.k AS FLOAT) AS click,
               CASE WHEN l.is_test THEN 2 WHEN l.is_valid THEN 1 ELSE 0 END AS split, c.k
        FROM c JOIN last_events l ON l.user_row = c.user_row {joins}""")
    _write_splits(db, order="user_row, k", helpers=("k",))
    stats = {"split_time": split_time, "validation_time": valid_time if cfg.validation_share > 0 else None,
             "test_users": int(db.scalar("SELECT count(*) FROM users1 WHERE is_test")),
             "validation_users": int(db.scalar("SELECT count(*) FROM users1 WHERE is_valid"))}
    return fm, stats


# -- protocol B: ratings ------------------------------------------------------------------------------------------

def _ratings(db: Backend, source: Source, cfg: ProtocolConfig) -> tuple[FeatureMap, dict]:
    times = db.fetch(f"SELECT timestamp, count(*) AS n FROM {EVENTS} GROUP BY timestamp ORDER BY timestamp")
    cut = quantile_from_counts(times["timestamp"], times["n"], cfg.time_cut_quantile)
    valid_cut = (quantile_from_counts(times["timestamp"], times["n"], cfg.time_cut_quantile - cfg.validation_share)
                 if cfg.validation_share > 0 else cut)
    # training = up to the validation cut: the feature map and pretraining never see a validation target
    db.view("train_ev", f"SELECT * FROM ev WHERE timestamp <= {_double(valid_cut)}")
    fm = fit_feature_map(db, source, cfg)
    write_events_and_users(db, fm, source)
    # A user's training events are a time prefix of their events: the first n_train of them.
    db.table("users1", """SELECT u.*, coalesce(t.n, 0) AS n_train FROM users0 u
                  LEFT JOIN (SELECT user_row, count(*) AS n FROM train_ev GROUP BY user_row) t
                  ON t.user_row = u.user_row""")
    h, end = cfg.max_history, db.q("end")
    db.write("pretrain_train", f"""
        SELECT user_row, greatest(first_pos, first_pos + n_train - {h}) AS start, first_pos + n_train AS {end},
               CAST(0 AS BIGINT) AS num_eval_targets
        FROM users1 WHERE n_train >= 2 ORDER BY user_row""")
    db.write("pretrain_eval", f"""
        SELECT user_row, greatest(first_pos, first_pos + n_train + 1 - {h} - 1) AS start,
               first_pos + n_train + 1 AS {end}, CAST(1 AS BIGINT) AS num_eval_targets
        FROM users1 WHERE n_train >= 1 AND n_train < length ORDER BY user_row""")

    # CTR: every event with at least one earlier event; its history = the earlier events.
    unknown = build_side_encoded(db, source, fm)
    select, joins = _candidate(db, "ev.item_id", fm, unknown)
    db.table("samples", f"""
        SELECT ev.user_row, greatest(u.first_pos, ev.pos - {h}) AS hist_start, ev.pos AS hist_end, {select},
               ev.timestamp, CAST(ev.rating >= {_double(cfg.positive_rating)} AS FLOAT) AS click,
               CAST(ev.rating >= 5 AS FLOAT) AS rating5,
               CASE WHEN ev.timestamp <= {_double(valid_cut)} THEN 0 WHEN ev.timestamp > {_double(cut)} THEN 2
                    ELSE 1 END AS split, ev.pos
        FROM ev JOIN users0 u ON u.user_row = ev.user_row {joins}
        WHERE ev.pos > u.first_pos""")
    _write_splits(db, order="pos", helpers=("pos",))
    stats = {"time_cut": cut, "validation_cut": valid_cut if cfg.validation_share > 0 else None}
    return fm, stats


# -- entry point ------------------------------------------------------------------------------------------------

def run(db: Backend, source: Source, cfg: ProtocolConfig, duplicates: str | None = None) -> tuple[FeatureMap, dict]:
    """Apply ``cfg``'s protocol to the ``raw_*`` views of ``db``; the backend writes the tables of
    :attr:`PreparedData.TABLES`. Returns the feature map and the stats (the same keys and values as
    :func:`hybrid.data.protocols.prepare`'s). ``duplicates``: ``error`` refuses duplicate events, ``drop``
    keeps the first of each (the stats then count the others, ``duplicates_dropped``), ``None`` takes every
    row unchecked (:func:`hybrid.data.validation.deduplicate`)."""
    if cfg.protocol not in PROTOCOLS:
        raise HybridInputError(f"unknown protocol '{cfg.protocol}' (expected one of: {', '.join(PROTOCOLS)})")
    started = time.perf_counter()
    if cfg.protocol == "ratings" and "rating" not in source.event_columns:
        raise HybridInputError(f"{source.source or source.name}: protocol 'ratings' needs a 'rating' column in the events")
    if db.scalar("SELECT count(*) FROM raw_events") == 0:
        raise HybridInputError(f"{source.source or source.name}: no events")
    dropped = deduplicate(db, source, duplicates)
    build_side(db, source)
    build_events(db, source)
    fm, protocol_stats = (_last_item if cfg.protocol == "last-item" else _ratings)(db, source, cfg)
    stats = {**statistics(db, source, fm, cfg), **protocol_stats,
             "prepare_seconds": round(time.perf_counter() - started, 3)}
    return fm, (with_dropped(stats, dropped) if duplicates is not None else stats)


def statistics(db: Backend, source: Source, fm: FeatureMap, cfg: ProtocolConfig) -> dict:
    """The reference's ``_statistics``, computed over the raw events and the written tables."""
    def ctr(name: str) -> dict:
        n, users, rate, hist, oov = db.row(f"""
            SELECT count(*), count(DISTINCT user_row), avg(click), avg(hist_end - hist_start),
                   count(CASE WHEN item_id < {NUM_RESERVED_IDS} THEN 1 END) FROM {db.written(name)} t""")
        result = {"samples": int(n), "users": int(users), "label_rate": round(float(rate), 4) if n else None,
                  "mean_history": round(float(hist), 2) if n else None}
        if n:
            result["oov_candidates"] = int(oov)
        return result

    def seqs(name: str) -> dict:
        end = db.q("end")
        n, events, mean = db.row(f"SELECT count(*), sum({end} - start), avg({end} - start) FROM {db.written(name)} t")
        return {"sequences": int(n), "events": int(events or 0), "mean_length": round(float(mean), 2) if n else None}

    users, items, events, first, last = db.row(
        "SELECT count(DISTINCT user_id), count(DISTINCT item_id), count(*), min(timestamp), max(timestamp) "
        f"FROM {EVENTS}")
    return {
        "dataset": source.name, "source": source.source, "protocol": cfg.protocol,
        "users": int(users), "items": int(items), "events": int(events), "time_range": [int(first), int(last)],
        "vocab_sizes": fm.vocab_sizes(),
        "pretrain_train": seqs("pretrain_train"), "pretrain_eval": seqs("pretrain_eval"),
        **{name: ctr(name) for name in PreparedData.CTR_SPLITS},
    }

