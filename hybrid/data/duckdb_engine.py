"""Out-of-core preparation: both benchmark protocols as SQL on DuckDB, written straight to parquet.

The output is the prepared directory of :mod:`hybrid.data.store` with the same feature map, the same rows in
the same order and the same column types as the in-memory reference implementation
(:mod:`hybrid.data.protocols`, tested to agree on real ML-100K and on Taobao-shaped data), but the events
never become Python objects: DuckDB reads them (:mod:`hybrid.data.duckdb_sources`), sorts, joins and
aggregates within ``memory_limit`` — spilling to disk beyond it, on all cores — and writes the tables as
parquet with row groups of ``row_group_size`` rows, what a streaming reader takes at a time. Only what the
embedding tables need comes back to Python: the vocabularies (one token per table row), the distribution of
split times (one count per distinct second) and, in ``last-item``, one sampled negative per user.

The steps (each a table in a scratch database):

1. ``side``: item → genres list (``|``-split, empty → ``unknown``), ``category`` (the first genre), ``year``;
2. ``users0``: one row per user in raw-id order (``user_row``), its event count, first position, last time;
   ``ev``: every event with its absolute position (by user, then time, then file order), category, action;
3. the protocol's time rule → ``users1`` (held-out flags or training counts) and the ``train_ev`` view;
4. the feature map, fitted on ``train_ev`` with the reference's counting and id order
   (``vocab_<feature>(token, cnt, id)``);
5. the tables ``events``, ``users``, ``pretrain_*``, ``ctr_*`` (``COPY ... TO parquet``), then the stats.

Example:
    >>> import tempfile, duckdb
    >>> from hybrid.data.duckdb_sources import load_source
    >>> from hybrid.data.protocols import ProtocolConfig
    >>> with tempfile.TemporaryDirectory() as out:
    ...     con = duckdb.connect()
    ...     source = load_source(con, "movielens-100k", str(ml100k_dir))
    ...     fm, stats = run_protocol(con, source, ProtocolConfig(protocol="ratings"), Path(out))
    >>> stats["ctr_train"]["samples"], fm.vocab_sizes()["item_id"]
    (69327, 1575)
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from hybrid.core.errors import HybridInputError
from hybrid.core.feature_map import NUM_RESERVED_IDS, OOV_ID, PAD_ID, FeatureMap, Vocabulary, history_key
from hybrid.data.duckdb_sources import Source
from hybrid.data.protocols import PROTOCOLS, UNKNOWN, USER_FIELDS, PreparedData, ProtocolConfig

ENGINES = ("duckdb", "pandas")


@dataclass
class EngineConfig:
    """How ``hybrid data prepare`` computes a protocol.

    Args:
        name: ``duckdb`` (out of core; the default) or ``pandas`` (in memory; the reference implementation,
            fine up to a few million events).
        memory_limit: DuckDB's memory limit (``"4GB"``); what does not fit spills to ``temp_directory``.
        threads: DuckDB worker threads (0: one per core).
        temp_directory: where DuckDB keeps its scratch database and spills (default: a hidden directory
            beside the output, removed afterwards). It needs free disk of a few times the input's size.
        row_group_size: rows per parquet row group of the written tables.
    """

    name: str = "duckdb"
    memory_limit: str = "4GB"
    threads: int = 0
    temp_directory: str | None = None
    row_group_size: int = 1_000_000

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise ValueError(f"engine.name must be one of {', '.join(ENGINES)}, got {self.name!r}")
        if self.row_group_size < 1:
            raise ValueError(f"engine.row_group_size must be >= 1, got {self.row_group_size}")


def connect(engine: EngineConfig, scratch: Path) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection whose database and spill files live in ``scratch`` (which the caller removes)."""
    scratch.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(scratch / "prepare.duckdb"))
    con.execute("SET memory_limit = ?", [engine.memory_limit])
    con.execute("SET temp_directory = ?", [str(scratch / "spill")])
    if engine.threads:
        con.execute(f"SET threads = {int(engine.threads)}")
    con.execute("SET preserve_insertion_order = true")  # file order = rowid; ORDER BY survives into COPY
    con.execute("SET TimeZone = 'UTC'")  # naive date-times are UTC, as in the pandas readers
    return con


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


def _scalar(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None):
    return con.execute(sql, params or []).fetchone()[0]


def _build_side(con: duckdb.DuckDBPyConnection, source: Source) -> None:
    if not source.has_items:
        return
    con.execute(f"""
        CREATE TABLE side AS
        SELECT item_id, genres, genres[1] AS category, year FROM (
            SELECT item_id,
                   CASE WHEN len(g) = 0 THEN ['{UNKNOWN}'] ELSE g END AS genres,
                   coalesce(year, '{UNKNOWN}') AS year
            FROM (SELECT item_id, list_filter(string_split(coalesce(genres, ''), '|'), lambda x: x <> '') AS g, year
                  FROM raw_items))""")


def _build_events(con: duckdb.DuckDBPyConnection, source: Source) -> None:
    con.execute("""
        CREATE TABLE users0 AS
        SELECT user_id, CAST(row_number() OVER (ORDER BY user_id) - 1 AS BIGINT) AS user_row, length, last_time,
               CAST(sum(length) OVER (ORDER BY user_id ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) - length
                    AS BIGINT) AS first_pos
        FROM (SELECT user_id, count(*) AS length, max(timestamp) AS last_time FROM raw_events GROUP BY user_id)""")
    columns = source.event_columns
    category = f"coalesce(s.category, '{UNKNOWN}')" if source.has_items else "CAST(NULL AS VARCHAR)"
    if "rating" in columns:  # the action token: the rating as text ("4", "3.5"), else the behaviour
        action = ("CASE WHEN e.rating = round(e.rating) THEN CAST(CAST(e.rating AS BIGINT) AS VARCHAR) "
                  "ELSE CAST(e.rating AS VARCHAR) END")
    elif "behavior" in columns:
        action = "e.behavior"
    else:
        action = "CAST(NULL AS VARCHAR)"
    rating = ", e.rating" if "rating" in columns else ""
    side_join = "LEFT JOIN side s ON s.item_id = e.item_id" if source.has_items else ""
    con.execute(f"""
        CREATE TABLE ev AS
        SELECT u.user_row, u.first_pos + row_number() OVER (PARTITION BY e.user_id ORDER BY e.timestamp, e.rn) - 1
                   AS pos,
               e.user_id, e.item_id, e.timestamp, {category} AS category, {action} AS action{rating}
        FROM raw_events e JOIN users0 u ON u.user_id = e.user_id {side_join}""")


def _vocabulary(con: duckdb.DuckDBPyConnection, name: str, counts_sql: str, min_count: int) -> Vocabulary:
    """``vocab_<name>(token, cnt, id)`` from ``counts_sql`` (columns ``token``, ``cnt``), in the reference's
    id order: frequency descending, then raw value (byte order of UTF-8 = code point order, as Python sorts)."""
    con.execute(f"""
        CREATE TABLE vocab_{name} AS
        SELECT token, cnt, CAST(row_number() OVER (ORDER BY cnt DESC, token) + {NUM_RESERVED_IDS - 1} AS BIGINT) AS id
        FROM ({counts_sql}) WHERE token IS NOT NULL AND cnt >= {int(min_count)}""")
    table = con.execute(f"SELECT token, cnt FROM vocab_{name} ORDER BY id").fetchnumpy()
    return Vocabulary(name, table["token"].tolist(), [int(c) for c in table["cnt"]])


def _fit_feature_map(con: duckdb.DuckDBPyConnection, source: Source, cfg: ProtocolConfig) -> FeatureMap:
    """The reference's ``_fit_feature_map`` over the ``train_ev`` view (see it for the counting rules)."""
    m = cfg.min_count
    con.execute("CREATE TABLE item_counts AS SELECT item_id, count(*) AS cnt FROM train_ev GROUP BY item_id")
    vocabs = {"item_id": _vocabulary(con, "item_id", "SELECT item_id AS token, cnt FROM item_counts", m),
              "user_id": _vocabulary(con, "user_id", "SELECT user_id AS token, count(*) AS cnt FROM train_ev "
                                                     "GROUP BY user_id", m)}
    if source.has_items:
        known = "FROM item_counts c LEFT JOIN side s ON s.item_id = c.item_id"
        for name in ("category", "year"):
            vocabs[name] = _vocabulary(con, name, f"SELECT coalesce(s.{name}, '{UNKNOWN}') AS token, "
                                                  f"sum(c.cnt) AS cnt {known} GROUP BY 1", m)
        vocabs["genres"] = _vocabulary(con, "genres", f"""
            SELECT token, sum(cnt) AS cnt FROM (
                SELECT unnest(coalesce(s.genres, ['{UNKNOWN}'])) AS token, c.cnt {known}) GROUP BY token""", m)
    if "rating" in source.event_columns or "behavior" in source.event_columns:
        vocabs["action"] = _vocabulary(con, "action", "SELECT action AS token, count(*) AS cnt FROM train_ev "
                                                      "GROUP BY action", m)
    if source.has_users:
        present = {d[0] for d in con.execute("SELECT * FROM raw_users LIMIT 0").description}
        for name in USER_FIELDS:
            if name in present:
                vocabs[name] = _vocabulary(con, name, f"""
                    SELECT {name} AS token, count(*) AS cnt FROM raw_users
                    WHERE user_id IN (SELECT DISTINCT user_id FROM train_ev) GROUP BY 1""", m)
    shared = {history_key(name): name for name in ("item_id", "category", "action") if name in vocabs}
    metadata = {"dataset": source.name, "protocol": cfg.protocol,
                "fit_events": int(_scalar(con, "SELECT count(*) FROM train_ev"))}
    return FeatureMap(vocabs, shared=shared, metadata=metadata)


def _encoded(feature: str, column: str, fm: FeatureMap) -> str:
    """SQL for a raw column's id: missing → padding, unknown → OOV (needs ``LEFT JOIN vocab_<feature>``)."""
    if feature not in fm:
        return f"CAST({PAD_ID} AS BIGINT)"
    return f"CASE WHEN {column} IS NULL THEN {PAD_ID} ELSE coalesce(v_{feature}.id, {OOV_ID}) END"


def _join(feature: str, column: str, fm: FeatureMap) -> str:
    return f"LEFT JOIN vocab_{feature} v_{feature} ON v_{feature}.token = {column}" if feature in fm else ""


class _Writer:
    """``COPY (query) TO <out>/<table>.parquet``, the query's ORDER BY kept."""

    def __init__(self, con: duckdb.DuckDBPyConnection, out: Path, row_group_size: int):
        self.con, self.out, self.row_group_size = con, out, row_group_size

    def __call__(self, table: str, query: str) -> None:
        path = str(self.out / f"{table}.parquet").replace("'", "''")
        self.con.execute(f"COPY ({query}) TO '{path}' (FORMAT parquet, ROW_GROUP_SIZE {self.row_group_size})")


def _write_events_and_users(con: duckdb.DuckDBPyConnection, write: _Writer, fm: FeatureMap, source: Source) -> None:
    write("events", f"""
        SELECT {_encoded('item_id', 'ev.item_id', fm)} AS item_id, {_encoded('category', 'ev.category', fm)} AS category,
               {_encoded('action', 'ev.action', fm)} AS action, ev.timestamp
        FROM ev {_join('item_id', 'ev.item_id', fm)} {_join('category', 'ev.category', fm)}
             {_join('action', 'ev.action', fm)}
        ORDER BY ev.pos""")
    fields = [name for name in USER_FIELDS if name in fm] if source.has_users else []
    select = "".join(f", {_encoded(name, f'ru.{name}', fm)} AS {name}" for name in fields)
    joins = " ".join(_join(name, f"ru.{name}", fm) for name in fields)
    users_join = "LEFT JOIN raw_users ru ON ru.user_id = u.user_id" if fields else ""
    write("users", f"""
        SELECT u.user_id AS raw_user_id, {_encoded('user_id', 'u.user_id', fm)} AS user_id,
               u.first_pos AS "offset", u.length{select}
        FROM users0 u {_join('user_id', 'u.user_id', fm)} {users_join} {joins}
        ORDER BY u.user_row""")


def _build_side_encoded(con: duckdb.DuckDBPyConnection, source: Source, fm: FeatureMap) -> dict[str, int] | None:
    """``side_enc``: each item's encoded category, year and genres; returns the ids of an item without side
    information (``unknown`` encoded), or None without an item table."""
    if not source.has_items:
        return None
    con.execute(f"""
        CREATE TABLE side_enc AS
        SELECT s.item_id, coalesce(v_category.id, {OOV_ID}) AS category, coalesce(v_year.id, {OOV_ID}) AS year,
               g.genres
        FROM side s
        LEFT JOIN vocab_category v_category ON v_category.token = s.category
        LEFT JOIN vocab_year v_year ON v_year.token = s.year
        JOIN (SELECT x.item_id, list(coalesce(v.id, {OOV_ID}) ORDER BY x.k) AS genres
              FROM (SELECT item_id, unnest(genres) AS token, generate_subscripts(genres, 1) AS k FROM side) x
              LEFT JOIN vocab_genres v ON v.token = x.token GROUP BY x.item_id) g ON g.item_id = s.item_id""")
    return {name: int(fm[name].encode([UNKNOWN])[0]) for name in ("category", "year", "genres")}


def _candidate(raw: str, fm: FeatureMap, unknown: dict[str, int] | None) -> tuple[str, str]:
    """(select list, joins) of a candidate item's encoded columns, looked up by its raw id ``raw``."""
    select = f"coalesce(v_item_id.id, {OOV_ID}) AS item_id"
    joins = f"LEFT JOIN vocab_item_id v_item_id ON v_item_id.token = {raw}"
    if unknown is not None:
        select += (f", coalesce(se.category, {unknown['category']}) AS category, "
                   f"coalesce(se.year, {unknown['year']}) AS year, "
                   f"coalesce(se.genres, CAST([{unknown['genres']}] AS BIGINT[])) AS genres")
        joins += f" LEFT JOIN side_enc se ON se.item_id = {raw}"
    return select, joins


# -- protocol A: last-item ----------------------------------------------------------------------------------------

def _last_item(con, source: Source, cfg: ProtocolConfig, write: _Writer) -> tuple[FeatureMap, dict]:
    times = con.execute("SELECT last_time, count(*) AS n FROM users0 GROUP BY 1 ORDER BY 1").fetchnumpy()
    split_time = quantile_from_counts(times["last_time"], times["n"], cfg.user_split_quantile)
    valid_time = quantile_from_counts(times["last_time"], times["n"], cfg.user_split_quantile - cfg.validation_share)
    held_cut = valid_time if cfg.validation_share > 0 else split_time
    con.execute(f"""CREATE TABLE users1 AS SELECT *, last_time > {_double(split_time)} AS is_test,
                    last_time > {_double(held_cut)} AND NOT last_time > {_double(split_time)} AS is_valid FROM users0""")
    # Training data: never a held-out user's last event, and none of their events when inductive.
    con.execute(f"""CREATE VIEW train_ev AS SELECT ev.* FROM ev JOIN users1 u ON u.user_row = ev.user_row
                    WHERE NOT (u.is_test OR u.is_valid)
                       OR (ev.pos <> u.first_pos + u.length - 1 AND {str(cfg.transductive).lower()})""")
    fm = _fit_feature_map(con, source, cfg)
    _write_events_and_users(con, write, fm, source)
    h = cfg.max_history
    write("pretrain_train", f"""
        SELECT user_row, greatest(first_pos, first_pos + length - 1 - {h}) AS start, first_pos + length - 1 AS "end",
               CAST(0 AS BIGINT) AS num_eval_targets
        FROM users1 WHERE length >= 3 AND (NOT (is_test OR is_valid) OR {str(cfg.transductive).lower()})
        ORDER BY user_row""")
    write("pretrain_eval", f"""
        SELECT user_row, greatest(first_pos, first_pos + length - {h} - 1) AS start, first_pos + length AS "end",
               CAST(1 AS BIGINT) AS num_eval_targets
        FROM users1 WHERE is_test AND length >= 2 ORDER BY user_row""")

    # CTR: per user with history, the last item (label 1) and one uniform negative from the item vocabulary,
    # drawn in numpy with the reference's generator calls (ids, not raw values: the same draws).
    con.execute("""CREATE TABLE last_events AS
                   SELECT u.user_row, u.first_pos, u.is_test, u.is_valid, ev.pos, ev.item_id, ev.timestamp
                   FROM users1 u JOIN ev ON ev.pos = u.first_pos + u.length - 1 WHERE u.length >= 2""")
    positives = con.execute(f"""SELECT l.user_row, coalesce(v.id, {OOV_ID}) AS id FROM last_events l
                                LEFT JOIN vocab_item_id v ON v.token = l.item_id ORDER BY l.user_row""").fetchnumpy()
    rng = np.random.default_rng(cfg.seed)
    vocab_size = len(fm["item_id"].tokens)
    negative = rng.integers(0, vocab_size, size=len(positives["id"])) + NUM_RESERVED_IDS
    clash = negative == positives["id"]
    while clash.any():  # a negative that equals the positive would be a contradictory label
        negative[clash] = rng.integers(0, vocab_size, size=int(clash.sum())) + NUM_RESERVED_IDS
        clash = negative == positives["id"]
    con.register("_negatives", pd.DataFrame({"user_row": positives["user_row"], "id": negative}))
    unknown = _build_side_encoded(con, source, fm)
    select, joins = _candidate("c.raw", fm, unknown)
    con.execute(f"""
        CREATE TABLE samples AS
        WITH c AS (SELECT user_row, 0 AS k, item_id AS raw FROM last_events
                   UNION ALL
                   SELECT n.user_row, 1 AS k, v.token AS raw FROM _negatives n JOIN vocab_item_id v ON v.id = n.id)
        SELECT l.user_row, greatest(l.first_pos, l.pos - {h}) AS hist_start, l.pos AS hist_end, {select},
               l.timestamp, CAST(1 - c.k AS FLOAT) AS click,
               CASE WHEN l.is_test THEN 2 WHEN l.is_valid THEN 1 ELSE 0 END AS split, c.k
        FROM c JOIN last_events l ON l.user_row = c.user_row {joins}""")
    con.unregister("_negatives")
    _write_splits(con, write, order="user_row, k", helpers=("k",))
    stats = {"split_time": split_time, "validation_time": valid_time if cfg.validation_share > 0 else None,
             "test_users": int(_scalar(con, "SELECT count(*) FROM users1 WHERE is_test")),
             "validation_users": int(_scalar(con, "SELECT count(*) FROM users1 WHERE is_valid"))}
    return fm, stats


def _write_splits(con: duckdb.DuckDBPyConnection, write: _Writer, order: str, helpers: tuple[str, ...]) -> None:
    """``ctr_train`` / ``ctr_valid`` / ``ctr_test`` from table ``samples`` (its ``split`` = 0 / 1 / 2)."""
    names = [d[0] for d in con.execute("SELECT * FROM samples LIMIT 0").description]
    columns = ", ".join(f'"{n}"' for n in names if n not in ("split", *helpers))
    for split, table in enumerate(PreparedData.CTR_SPLITS):
        write(table, f"SELECT {columns} FROM samples WHERE split = {split} ORDER BY {order}")


# -- protocol B: ratings ------------------------------------------------------------------------------------------

def _ratings(con, source: Source, cfg: ProtocolConfig, write: _Writer) -> tuple[FeatureMap, dict]:
    times = con.execute("SELECT timestamp, count(*) AS n FROM raw_events GROUP BY 1 ORDER BY 1").fetchnumpy()
    cut = quantile_from_counts(times["timestamp"], times["n"], cfg.time_cut_quantile)
    valid_cut = (quantile_from_counts(times["timestamp"], times["n"], cfg.time_cut_quantile - cfg.validation_share)
                 if cfg.validation_share > 0 else cut)
    # training = up to the validation cut: the feature map and pretraining never see a validation target
    con.execute(f"CREATE VIEW train_ev AS SELECT * FROM ev WHERE timestamp <= {_double(valid_cut)}")
    fm = _fit_feature_map(con, source, cfg)
    _write_events_and_users(con, write, fm, source)
    # A user's training events are a time prefix of their events: the first n_train of them.
    con.execute("""CREATE TABLE users1 AS SELECT u.*, coalesce(t.n, 0) AS n_train FROM users0 u
                   LEFT JOIN (SELECT user_row, count(*) AS n FROM train_ev GROUP BY user_row) t
                   ON t.user_row = u.user_row""")
    h = cfg.max_history
    write("pretrain_train", f"""
        SELECT user_row, greatest(first_pos, first_pos + n_train - {h}) AS start, first_pos + n_train AS "end",
               CAST(0 AS BIGINT) AS num_eval_targets
        FROM users1 WHERE n_train >= 2 ORDER BY user_row""")
    write("pretrain_eval", f"""
        SELECT user_row, greatest(first_pos, first_pos + n_train + 1 - {h} - 1) AS start,
               first_pos + n_train + 1 AS "end", CAST(1 AS BIGINT) AS num_eval_targets
        FROM users1 WHERE n_train >= 1 AND n_train < length ORDER BY user_row""")

    # CTR: every event with at least one earlier event; its history = the earlier events.
    unknown = _build_side_encoded(con, source, fm)
    select, joins = _candidate("ev.item_id", fm, unknown)
    con.execute(f"""
        CREATE TABLE samples AS
        SELECT ev.user_row, greatest(u.first_pos, ev.pos - {h}) AS hist_start, ev.pos AS hist_end, {select},
               ev.timestamp, CAST(ev.rating >= {float(cfg.positive_rating)!r} AS FLOAT) AS click,
               CAST(ev.rating >= 5 AS FLOAT) AS rating5,
               CASE WHEN ev.timestamp <= {_double(valid_cut)} THEN 0 WHEN ev.timestamp > {_double(cut)} THEN 2
                    ELSE 1 END AS split, ev.pos
        FROM ev JOIN users0 u ON u.user_row = ev.user_row {joins}
        WHERE ev.pos > u.first_pos""")
    _write_splits(con, write, order="pos", helpers=("pos",))
    stats = {"time_cut": cut, "validation_cut": valid_cut if cfg.validation_share > 0 else None}
    return fm, stats


# -- entry point ------------------------------------------------------------------------------------------------

def run_protocol(con: duckdb.DuckDBPyConnection, source: Source, cfg: ProtocolConfig, out: Path,
                 row_group_size: int = 1_000_000) -> tuple[FeatureMap, dict]:
    """Apply ``cfg``'s protocol to the ``raw_*`` tables in ``con``; write the tables of
    :attr:`PreparedData.TABLES` as parquet into ``out``. Returns the feature map and the stats (the same
    keys and values as :func:`hybrid.data.protocols.prepare`'s)."""
    if cfg.protocol not in PROTOCOLS:
        raise HybridInputError(f"unknown protocol '{cfg.protocol}' (expected one of: {', '.join(PROTOCOLS)})")
    started = time.perf_counter()
    if cfg.protocol == "ratings" and "rating" not in source.event_columns:
        raise HybridInputError(f"{source.source or source.name}: protocol 'ratings' needs a 'rating' column in the events")
    if _scalar(con, "SELECT count(*) FROM raw_events") == 0:
        raise HybridInputError(f"{source.source or source.name}: no events")
    _build_side(con, source)
    _build_events(con, source)
    write = _Writer(con, out, row_group_size)
    fm, protocol_stats = (_last_item if cfg.protocol == "last-item" else _ratings)(con, source, cfg, write)
    stats = {**_statistics(con, source, fm, cfg, out), **protocol_stats,
             "prepare_seconds": round(time.perf_counter() - started, 3)}
    return fm, stats


def _statistics(con: duckdb.DuckDBPyConnection, source: Source, fm: FeatureMap, cfg: ProtocolConfig, out: Path) -> dict:
    """The reference's ``_statistics``, computed over the raw events and the written tables."""
    def table(name: str) -> str:
        return "read_parquet('" + str(out / f"{name}.parquet").replace("'", "''") + "')"

    def ctr(name: str) -> dict:
        n, users, rate, hist, oov = con.execute(f"""
            SELECT count(*), count(DISTINCT user_row), avg(click), avg(hist_end - hist_start),
                   count(*) FILTER (WHERE item_id < {NUM_RESERVED_IDS}) FROM {table(name)}""").fetchone()
        result = {"samples": int(n), "users": int(users), "label_rate": round(float(rate), 4) if n else None,
                  "mean_history": round(float(hist), 2) if n else None}
        if n:
            result["oov_candidates"] = int(oov)
        return result

    def seqs(name: str) -> dict:
        n, events, mean = con.execute(f'SELECT count(*), sum("end" - start), avg("end" - start) FROM {table(name)}').fetchone()
        return {"sequences": int(n), "events": int(events or 0), "mean_length": round(float(mean), 2) if n else None}

    users, items, events, first, last = con.execute(
        "SELECT count(DISTINCT user_id), count(DISTINCT item_id), count(*), min(timestamp), max(timestamp) "
        "FROM raw_events").fetchone()
    return {
        "dataset": source.name, "source": source.source, "protocol": cfg.protocol,
        "users": int(users), "items": int(items), "events": int(events), "time_range": [int(first), int(last)],
        "vocab_sizes": fm.vocab_sizes(),
        "pretrain_train": seqs("pretrain_train"), "pretrain_eval": seqs("pretrain_eval"),
        **{name: ctr(name) for name in PreparedData.CTR_SPLITS},
    }
