"""Scoring: a fine-tuned ranker applied to new data with raw ids — ``hybrid score`` and :class:`Predictor`.

Input: behaviour events with raw ids (``user_id``, ``item_id``, ``timestamp``, optionally ``rating`` or
``behavior``), as a CSV/TSV/parquet events file or any dataset ``hybrid data prepare`` reads. Every row is a
candidate; its history is the same user's earlier rows of the input (by time, then file order — the rule of
protocol ``ratings``), cut to the model's ``train.max_history``. With ``since``, only rows at or after that time
are scored and the earlier ones are history only: hand it a log and the candidates together.

Ids are encoded with the feature map saved in the checkpoint: an id the model never saw becomes OOV, and the
report counts the unknown users and candidate items. Item side fields (``category``, ``genres``, ``year``) and
user fields come from the input's own side tables (``--items`` / ``--users``, or a dataset that has them), else
from the side tables of the dataset the model was trained on; a ranker that reads them and finds neither is
refused. The batches are built by the training code — :class:`~hybrid.data.batching.CTRBatchConverter` over the
protocol's own encoding steps — so a sample scores exactly as the evaluation scored it during fine-tuning.

``hybrid score`` streams: DuckDB sorts the input by user out of core (within ``memory_limit``) and hands it over
in chunks of whole users, so memory is bounded by the chunk size and the longest user, whatever the input size.
Under ``torchrun`` each rank scores the users that hash to it; rank 0 joins the parts, in input order, into one
file. The output appears only when complete: a failed run leaves no partial file.

Output columns: ``row`` (0-based data row of the input), ``user_id``, ``item_id``, ``timestamp``,
``history_length`` (events the model saw), ``score_<task>`` (probability, one column per task). The report is
printed and stored in the parquet file's key-value metadata (``hybrid_score_report``).

Example:
    >>> predictor = Predictor.load("runs/ml1m/finetune-dcn_v2/checkpoints/best")    # doctest: +SKIP
    >>> events = pd.DataFrame({"user_id": ["1", "1"], "item_id": ["1193", "661"],
    ...                        "timestamp": [978300760, 978302109]})
    >>> predictor.predict(events)      # doctest: +SKIP
       score_click  history_length
    0     0.61...                0
    1     0.58...                1
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml

from hybrid.core.errors import HybridInputError
from hybrid.core.feature_map import OOV_ID, FeatureMap

if TYPE_CHECKING:
    from hybrid.core import CTRBatch

ROW = "row"
SCORE_PREFIX = "score_"
#: KJT keys that need the item side table / the user table
ITEM_SIDE_KEYS = ("category", "year", "genres", "hist_category")
USER_SIDE_FIELDS = ("gender", "age", "occupation")
REPORT_KEY = "hybrid_score_report"
UNKNOWN_ACTION = "<no action column>"  # not a token of any action vocabulary: encodes as OOV
PARITY_ATOL = 1e-5  # exported vs eager logits on the example batch (bit-identical on CPU in the tests)


@dataclass
class ScoreReport:
    """What a scoring run saw.

    Args:
        rows: input rows read.
        scored: rows scored (all of them without ``since``).
        users: distinct users with a scored row.
        unknown_users: of those, users the model's feature map does not know (scored as the OOV user).
        unknown_items: scored rows whose candidate item the feature map does not know (OOV item).
        empty_history: scored rows with no earlier event of their user in the input.
        side_tables: where the item / user side fields came from.
    """

    rows: int = 0
    scored: int = 0
    users: int = 0
    unknown_users: int = 0
    unknown_items: int = 0
    empty_history: int = 0
    side_tables: dict[str, str] = field(default_factory=dict)

    def add(self, other: "ScoreReport") -> None:
        for f in fields(self):
            if f.name != "side_tables":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (f"scored {self.scored} of {self.rows} rows ({self.users} users): {self.unknown_users} users and "
                f"{self.unknown_items} candidate items unknown to the model's feature map (scored as OOV), "
                f"{self.empty_history} rows with an empty history")


def side_tables_of_prepared(prepared_dir: str | Path) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The item and user side tables of the dataset a prepared directory was built from (its ``config.yaml``);
    ``(None, None)`` when the directory or the tables are not there (Taobao has no item table: its categories
    travel in the events)."""
    from hybrid.config import from_mapping
    from hybrid.data.duckdb_sources import read_side_files
    from hybrid.jobs.prepare import DataConfig

    config_file = Path(prepared_dir) / "config.yaml"
    if not config_file.is_file():
        return None, None
    raw = yaml.safe_load(config_file.read_text()) or {}
    data = from_mapping(DataConfig, raw.get("data") or {}, prefix="data.", source=str(config_file))
    if data.dataset == "events":
        return read_side_files(data.items_path, data.users_path, data.columns)
    if data.dataset == "taobao" or not Path(data.path).exists():
        return None, None
    dataset = data.read()
    return dataset.items, dataset.users


@dataclass
class _ChunkSamples:
    """A chunk's candidates, ready to batch: the converter (``None`` when no row is a candidate) and what the
    report needs (the candidate rows, each row's position in its user's history, the users and encoded items)."""

    chunk: pd.DataFrame
    rows: np.ndarray
    position: np.ndarray
    user_codes: np.ndarray
    users: pd.DataFrame
    item_ids: np.ndarray | None
    converter: Any


class Predictor:
    """A fine-tuned ranker, loaded once, that scores raw-id events (see the module docstring for the rules).

    Args:
        model: the ranker (eval mode, CPU).
        manifest: its checkpoint manifest (``feature_map``, ``config``, ``task_names``).
        items, users: default side tables for inputs that carry none (``None``: those of the training data,
            read when first needed).

    Example:
        >>> predictor = Predictor.load(checkpoint)                         # doctest: +SKIP
        >>> scores = predictor.predict(events, since="2000-12-01")         # doctest: +SKIP
        >>> list(scores.columns)                                           # doctest: +SKIP
        ['score_click', 'history_length']
    """

    def __init__(self, model, manifest: dict[str, Any], *, items: pd.DataFrame | None = None,
                 users: pd.DataFrame | None = None, source: str = "") -> None:
        self.model = model.eval()
        self.manifest = manifest
        self.source = source
        self.feature_map = FeatureMap.from_dict(manifest["feature_map"], source=f"{source}/manifest.json")
        self.task_names = tuple(model.task_names)
        self.fields = list(model.spec.kjt_keys)
        self.max_history = int(model.spec.max_len)
        self.needs_items = any(k in self.fields for k in ITEM_SIDE_KEYS)
        self.needs_users = any(k in self.fields for k in USER_SIDE_FIELDS)
        self._defaults: tuple[pd.DataFrame | None, pd.DataFrame | None] | None = None
        if items is not None or users is not None:
            self._defaults = (items, users)

    @classmethod
    def load(cls, checkpoint: str | Path, **kwargs) -> "Predictor":
        """From a fine-tuning checkpoint (a ``step-…`` directory or a ``best`` / ``last`` root)."""
        from hybrid.jobs.finetune import load_finetuned

        model, manifest = load_finetuned(checkpoint)
        return cls(model, manifest, source=str(checkpoint), **kwargs)

    @property
    def score_columns(self) -> list[str]:
        return [SCORE_PREFIX + t for t in self.task_names]

    def training_side_tables(self) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
        """The side tables of the data the model was fine-tuned on (cached)."""
        if self._defaults is None:
            prepared = (self.manifest.get("config") or {}).get("data") or ""
            self._defaults = side_tables_of_prepared(prepared) if prepared else (None, None)
        return self._defaults

    def check_side(self, has_items: bool, has_users: bool, where: str) -> None:
        """Refuse an input without the side fields the ranker reads (one line saying which and how to add them)."""
        if self.needs_items and not has_items:
            raise HybridInputError(f"{where}: the ranker reads item fields "
                                   f"{[k for k in self.fields if k in ITEM_SIDE_KEYS]} but there is no items table "
                                   "(neither with the input nor from the training data): pass one with --items")
        if self.needs_users and not has_users:
            raise HybridInputError(f"{where}: the ranker reads user fields "
                                   f"{[k for k in self.fields if k in USER_SIDE_FIELDS]} but there is no users "
                                   "table (neither with the input nor from the training data): pass one with --users")

    # -- the one scoring step ----------------------------------------------------------------------------------

    def _samples(self, chunk: pd.DataFrame) -> "_ChunkSamples":
        """A sorted chunk of whole users (see :meth:`score_sorted`) → the converter over its candidates."""
        from hybrid.data.batching import CTRBatchConverter
        from hybrid.data.protocols import (
            PreparedData,
            _attach_event_side,
            _attach_user_fields,
            _candidate_columns,
            _encode_events,
            item_side_table,
        )

        fm = self.feature_map
        chunk = chunk.reset_index(drop=True)
        side = item_side_table(chunk[["item_id", "genres", "year"]]) if "genres" in chunk else None
        events = _attach_event_side(chunk, side)
        if "action" in fm and "action" not in events:
            # No rating / behaviour column in the input: the history's action tokens are unknown (OOV), as for any
            # action the model never saw. The candidate's own action is never read.
            events["action"] = UNKNOWN_ACTION
        encoded, users, user_codes = _encode_events(events, fm)
        present = [c for c in USER_SIDE_FIELDS if c in chunk]
        users = _attach_user_fields(users, chunk[["user_id", *present]] if present else None, fm)
        position = np.arange(len(chunk)) - users["offset"].to_numpy()[user_codes]
        rows = np.flatnonzero(chunk["score"].to_numpy(dtype=bool))
        if len(rows) == 0:
            return _ChunkSamples(chunk, rows, position, user_codes, users, None, None)
        cand = _candidate_columns(chunk["item_id"].to_numpy()[rows], side, fm)
        samples = pd.DataFrame({
            "user_row": user_codes[rows], "hist_start": np.maximum(rows - position[rows], rows - self.max_history),
            "hist_end": rows, **cand, "timestamp": encoded["timestamp"].to_numpy()[rows],
            **{t: np.zeros(len(rows), dtype=np.float32) for t in self.task_names}})
        empty = pd.DataFrame()
        prepared = PreparedData(fm, encoded, users, empty, empty, empty, empty, samples)
        converter = CTRBatchConverter(prepared, "ctr_test", max_history=self.max_history, fields=self.fields,
                                      task_names=self.task_names)
        return _ChunkSamples(chunk, rows, position, user_codes, users, cand["item_id"], converter)

    def score_sorted(self, chunk: pd.DataFrame, batch_size: int = 1024) -> tuple[pd.DataFrame, ScoreReport]:
        """Score a chunk of whole users, sorted by user, time, row.

        Args:
            chunk: ``row``, ``user_id``, ``item_id`` (raw ids as text), ``timestamp`` (int64 seconds), optional
                ``rating`` / ``behavior`` (the history's action tokens), item side ``genres`` / ``year`` and user
                fields (``None`` where unknown), and ``score`` (bool: a candidate; else history only).

        Returns:
            ``(frame of the scored rows: row, user_id, item_id, timestamp, history_length, score_<task>...,
            report)``.
        """
        from hybrid.ctr_models.trainer import predict
        from hybrid.data.batching import make_loader

        s = self._samples(chunk)
        rows, position = s.rows, s.position
        report = ScoreReport(rows=len(s.chunk), scored=len(rows))
        keys = ["row", "user_id", "item_id", "timestamp"]
        if s.converter is None:
            return pd.DataFrame(columns=[*keys, "history_length", *self.score_columns]), report
        _, logits, _ = predict(self.model, make_loader(s.converter, batch_size=batch_size, shuffle=False))
        scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        scored_users = np.unique(s.user_codes[rows])
        report.users = len(scored_users)
        report.unknown_users = int((s.users["user_id"].to_numpy()[scored_users] == OOV_ID).sum())
        report.unknown_items = int((s.item_ids == OOV_ID).sum())
        report.empty_history = int((position[rows] == 0).sum())
        out = s.chunk.loc[rows, keys].reset_index(drop=True)
        out["history_length"] = np.minimum(position[rows], self.max_history).astype(np.int32)
        for i, column in enumerate(self.score_columns):
            out[column] = scores[:, i].astype(np.float32)
        return out, report

    # -- in memory --------------------------------------------------------------------------------------------

    def predict(self, events: pd.DataFrame, *, items: pd.DataFrame | None = None, users: pd.DataFrame | None = None,
                since: int | str | None = None, batch_size: int = 1024) -> pd.DataFrame:
        """Scores of ``events`` (a DataFrame with raw ids), aligned to its index.

        Args:
            events: ``user_id``, ``item_id``, ``timestamp`` (int seconds), optional ``rating`` / ``behavior``, and
                optionally the side columns ``genres`` / ``year`` / user fields themselves.
            items, users: side tables (canonical columns); default: the columns of ``events``, else the training
                data's.
            since: score only rows at or after this time (unix seconds or a date); earlier rows are history.

        Returns:
            ``score_<task>`` per task (NaN for rows before ``since``) and ``history_length``.

        Raises:
            HybridInputError: a missing column, an empty or non-integer value, or side fields the ranker needs
                and cannot find.
        """
        frame = self._with_side(events, items, users, since)
        order = np.lexsort((frame[ROW].to_numpy(), frame["timestamp"].to_numpy(), frame["user_id"].to_numpy()))
        scored, _ = self.score_sorted(frame.iloc[order], batch_size=batch_size)
        result = pd.DataFrame(index=range(len(frame)), columns=[*self.score_columns, "history_length"], dtype=float)
        result.loc[scored[ROW].to_numpy(), self.score_columns] = scored[self.score_columns].to_numpy()
        result.loc[scored[ROW].to_numpy(), "history_length"] = scored["history_length"].to_numpy()
        result.index = events.index
        return result

    def _with_side(self, events: pd.DataFrame, items: pd.DataFrame | None, users: pd.DataFrame | None,
                   since: int | str | None) -> pd.DataFrame:
        """``events`` checked, joined with the side tables the ranker reads, and marked ``score`` (a candidate)."""
        frame = _check_events_frame(events)
        defaults = None
        if "genres" not in frame:
            if items is None:
                defaults = self.training_side_tables()
                items = defaults[0]
            if items is not None:
                side = items.drop_duplicates("item_id")[["item_id", "genres", *(["year"] if "year" in items else [])]]
                frame = frame.merge(side.astype({"item_id": str}), on="item_id", how="left")
        if not any(c in frame for c in USER_SIDE_FIELDS):
            if users is None:
                users = (defaults or self.training_side_tables())[1]
            if users is not None:
                present = [c for c in USER_SIDE_FIELDS if c in users]
                frame = frame.merge(users.drop_duplicates("user_id")[["user_id", *present]].astype({"user_id": str}),
                                    on="user_id", how="left")
        self.check_side("genres" in frame, any(c in frame for c in USER_SIDE_FIELDS), "events")
        start = parse_since(since)
        frame["score"] = True if start is None else frame["timestamp"].to_numpy() >= start
        return frame

    def batches(self, events: pd.DataFrame, *, items: pd.DataFrame | None = None, users: pd.DataFrame | None = None,
                since: int | str | None = None, batch_size: int = 1024) -> Iterator[CTRBatch]:
        """The ``CTRBatch`` es :meth:`predict` feeds the model (same arguments), candidates sorted by user, time,
        row: to run the model yourself, or as the example batch of an export."""
        from hybrid.data.batching import make_loader

        frame = self._with_side(events, items, users, since)
        order = np.lexsort((frame[ROW].to_numpy(), frame["timestamp"].to_numpy(), frame["user_id"].to_numpy()))
        samples = self._samples(frame.iloc[order])
        if samples.converter is None:
            raise HybridInputError("events: no row to score" + (f" at or after since={since}" if since else ""))
        yield from make_loader(samples.converter, batch_size=batch_size, shuffle=False)

    def export(self, path: str | Path, example: CTRBatch) -> dict[str, Any]:
        """Export the ranker for serving (:func:`hybrid.ctr_models.export.save_exported`), traced on ``example``
        (a batch of :meth:`batches`); the feature map that encodes raw ids for it is written beside it
        (``<path stem>.feature_map.json``). The files appear only when complete.

        Example:
            >>> meta = predictor.export("ranker.pt2", next(predictor.batches(events)))   # doctest: +SKIP
            >>> meta["feature_map"], meta["inputs"][0]["name"]                          # doctest: +SKIP
            ('ranker.feature_map.json', 'single_ids')

        Returns:
            the serving metadata (also in the ``.json`` sidecar), with ``feature_map`` naming the map's file.
        """
        import torch

        from hybrid.ctr_models.export import load_exported, save_exported, serving_inputs

        path = Path(path)
        if path.suffix != ".pt2":
            raise HybridInputError(f"{path}: the exported program is written as a .pt2 file")
        work = path.parent / f".{path.name}.tmp"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            save_exported(self.model, example, work / path.name)
            program, meta = load_exported(work / path.name)  # check the program as written, before it is published
            with torch.no_grad():
                diff = float((program.module()(*serving_inputs(self.model, example)) - self.model(example)).abs().max())
            if not diff <= PARITY_ATOL:
                raise RuntimeError(f"export: the program's logits differ from the eager model's by {diff:.3g} on the "
                                   "example batch; please report this with the checkpoint's ranker config")
            fm_file = path.with_name(path.stem + ".feature_map.json")
            meta = {**meta, "feature_map": fm_file.name, "model": self.source,
                    "parity": {"example_rows": int(len(example.labels)), "max_abs_diff": diff}}
            (work / path.with_suffix(".json").name).write_text(json.dumps(meta, indent=2) + "\n")
            (work / fm_file.name).write_text(json.dumps(self.manifest["feature_map"]) + "\n")
            for name in (fm_file.name, path.with_suffix(".json").name, path.name):  # the program last
                os.replace(work / name, path.parent / name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return meta


def _check_events_frame(events: pd.DataFrame) -> pd.DataFrame:
    """The canonical columns of an events DataFrame as scoring needs them (raw ids as text), with a ``row``."""
    missing = [c for c in ("user_id", "item_id", "timestamp") if c not in events]
    if missing:
        raise HybridInputError(f"events: missing required column {missing[0]!r}; columns present: "
                               f"{', '.join(map(str, events.columns))}")
    frame = events.reset_index(drop=True).copy()
    for column in ("user_id", "item_id", "timestamp", "rating"):
        if column in frame and frame[column].isna().any():
            raise HybridInputError(f"events, row {int(np.flatnonzero(frame[column].isna())[0])}, column {column!r}: "
                                   "empty value; every row needs one")
    for column in ("user_id", "item_id"):
        values = frame[column]
        if pd.api.types.is_float_dtype(values) and (values == np.round(values)).all():
            values = values.astype(np.int64)  # 1.0 is the id "1", as the file readers read it
        frame[column] = values.astype(str)
    if not pd.api.types.is_integer_dtype(frame["timestamp"]):
        raise HybridInputError(f"events, column 'timestamp': expected integer unix seconds, got "
                               f"{frame['timestamp'].dtype}")
    if "rating" in frame:
        rating = pd.to_numeric(frame["rating"], errors="coerce")
        bad = ~np.isfinite(rating.to_numpy(dtype=float))
        if bad.any():
            raise HybridInputError(f"events, row {int(np.flatnonzero(bad)[0])}, column 'rating': expected a finite "
                                   f"number, got {frame['rating'].iloc[int(np.flatnonzero(bad)[0])]!r}")
        frame["rating"] = rating.astype(float)
    frame[ROW] = np.arange(len(frame), dtype=np.int64)
    return frame


def parse_since(since: int | str | None) -> int | None:
    """``since`` as unix seconds: an int, a digit string, or a date / date-time (UTC)."""
    if since is None:
        return None
    if isinstance(since, (int, np.integer)) or (isinstance(since, str) and since.strip().lstrip("-").isdigit()):
        return int(since)
    try:
        stamp = pd.Timestamp(since)
    except (ValueError, TypeError):
        raise HybridInputError(f"--since {since!r}: expected unix seconds or a date such as 2000-12-01") from None
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return int(stamp.timestamp())


# -- the command --------------------------------------------------------------------------------------------------

@dataclass
class ScoreConfig:
    """``hybrid score``.

    Args:
        model: a fine-tuning checkpoint (``<finetune out>/checkpoints/best`` or a ``step-…`` directory).
        input: events with raw ids: a CSV/TSV/parquet file (``dataset: events``) or a dataset of ``dataset``.
        out: the scores' parquet file (replaced atomically).
        dataset: the input's reader (``events``, ``taobao``, ``movielens-100k``, ...); default ``events`` for a
            file, else the dataset kind the model was trained on.
        columns: ``events`` only: canonical column → column in the file.
        items_path, users_path: ``events`` only: side tables (default: the training data's).
        since: score rows at or after this time only (unix seconds or a date); earlier rows are history.
        batch_size: samples per forward pass.
        chunk_rows: input rows handed over per chunk (memory scales with it; whole users are kept together).
        memory_limit: DuckDB's memory for sorting the input (spills beyond it).
    """

    model: str = ""
    input: str = ""
    out: str = "scores.parquet"
    dataset: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    items_path: str | None = None
    users_path: str | None = None
    since: str | None = None
    batch_size: int = 1024
    chunk_rows: int = 200_000
    memory_limit: str = "2GB"

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.chunk_rows < 1:
            raise HybridInputError(f"batch_size and chunk_rows must be >= 1, got {self.batch_size}, {self.chunk_rows}")


def _chunks_of_whole_users(reader, frame_of) -> Iterator[pd.DataFrame]:
    """Record batches sorted by user → DataFrames holding whole users (a user cut by a batch boundary is carried
    into the next one)."""
    carry: pd.DataFrame | None = None
    for batch in reader:
        frame = frame_of(batch)
        if carry is not None and len(carry):
            frame = pd.concat([carry, frame], ignore_index=True)
        if frame.empty:
            continue
        user = frame["user_id"].to_numpy()
        cut = int(np.argmax(user == user[-1]))  # the last user's rows are contiguous: its first row
        carry = frame.iloc[cut:]
        if cut:
            yield frame.iloc[:cut]
    if carry is not None and len(carry):
        yield carry


def _open_input(con, cfg: ScoreConfig, predictor: Predictor, dataset: str, since: int | None, rank: int,
                world_size: int):
    """The input (with the side tables the ranker reads) as a reader of Arrow batches sorted by user, time, row —
    this rank's users only — and where each side table came from."""
    from hybrid.data.duckdb_sources import load_side_frames, load_source, quote

    source_path = Path(cfg.input)
    source = load_source(con, dataset, str(source_path), columns=cfg.columns or None,
                         items_path=cfg.items_path, users_path=cfg.users_path)
    side = {"items": "input" if source.has_items else "none", "users": "input" if source.has_users else "none"}
    has_items, has_users = source.has_items, source.has_users
    if (predictor.needs_items and not has_items) or (predictor.needs_users and not has_users):
        items, users = predictor.training_side_tables()
        load_side_frames(con, items if not has_items else None, users if not has_users else None)
        if not has_items and items is not None:
            has_items, side["items"] = True, "training data"
        if not has_users and users is not None:
            has_users, side["users"] = True, "training data"
    predictor.check_side(has_items, has_users, str(source_path))

    optional = [c for c in ("rating", "behavior") if c in source.event_columns]
    select = ["e.rn AS row", "e.user_id", "e.item_id", "e.timestamp", *(f"e.{quote(c)}" for c in optional)]
    joins = ""
    if has_items:
        select += ["i.genres", "i.year"]
        joins += " LEFT JOIN raw_items i ON e.item_id = i.item_id"
    if has_users:
        user_columns = [r[0] for r in con.execute("DESCRIBE raw_users").fetchall()]
        select += [f"u.{quote(c)}" for c in USER_SIDE_FIELDS if c in user_columns]
        joins += " LEFT JOIN raw_users u ON e.user_id = u.user_id"
    select.append("TRUE AS score" if since is None else f"e.timestamp >= {int(since)} AS score")
    where = f" WHERE hash(e.user_id) % {world_size} = {rank}" if world_size > 1 else ""
    sql = (f"SELECT {', '.join(select)} FROM raw_events e{joins}{where} "
           "ORDER BY e.user_id, e.timestamp, e.rn")
    reader = con.sql(sql).to_arrow_reader(cfg.chunk_rows)
    return reader, side


def _resolve(cfg: ScoreConfig, command: str, out_kind: str) -> tuple[Predictor, str, int | None, Path]:
    """The checks ``score`` and ``export`` share: the model loaded, the input's reader, ``since``, ``out``."""
    if not cfg.model or not cfg.input:
        raise HybridInputError(f"{command}: set --model (a fine-tuning checkpoint) and --input (events with raw ids)")
    predictor = Predictor.load(cfg.model)
    source_path = Path(cfg.input)
    if not source_path.exists():
        raise HybridInputError(f"{source_path}: input not found")
    dataset = cfg.dataset
    if dataset is None:
        trained_on = ((predictor.manifest.get("config") or {}).get("data") or "")
        dataset = "events" if source_path.is_file() else _dataset_of_prepared(trained_on) or "events"
    since = parse_since(cfg.since)
    out = Path(cfg.out)
    if out.is_dir():
        raise HybridInputError(f"{out}: is a directory; --out names {out_kind}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise HybridInputError(f"{out.parent}: not writable")
    return predictor, dataset, since, out


def run_export(cfg: ScoreConfig) -> dict[str, Any]:
    """``hybrid export``: the ranker of ``cfg.model`` as a ``torch.export`` program at ``cfg.out`` (``.pt2``),
    traced on the first batch of ``cfg.input`` (read as ``hybrid score`` reads it), with its JSON sidecar and
    feature map (:meth:`Predictor.export`: the written program is run on that batch and compared with the eager
    model before it is published).

    Returns:
        the serving metadata (``parity``: the example's rows and the largest logit difference) plus ``out``.
    """
    import tempfile

    from hybrid.data.batching import make_loader
    from hybrid.data.duckdb_engine import EngineConfig, connect

    predictor, dataset, since, out = _resolve(cfg, "export", "the program's .pt2 file")
    if out.suffix != ".pt2":
        raise HybridInputError(f"{out}: the exported program is written as a .pt2 file")
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as work:
        con = connect(EngineConfig(memory_limit=cfg.memory_limit), Path(work))
        reader, _ = _open_input(con, cfg, predictor, dataset, since, 0, 1)
        samples = None
        for chunk in _chunks_of_whole_users(reader, lambda b: b.to_pandas()):
            samples = predictor._samples(chunk)
            if samples.converter is not None:
                break
        con.close()
    if samples is None or samples.converter is None:
        raise HybridInputError(f"{cfg.input}: no row to score" + (f" at or after --since {cfg.since}" if since else "")
                               + ": the export needs one example batch")
    example = next(iter(make_loader(samples.converter, batch_size=cfg.batch_size, shuffle=False)))
    meta = predictor.export(out, example)
    return {**meta, "out": str(out)}


def run_score(cfg: ScoreConfig) -> dict[str, Any]:
    """Score ``cfg.input`` with ``cfg.model`` into ``cfg.out`` (see the module docstring).

    Returns:
        the report (:class:`ScoreReport` as a dict) plus ``out``, ``seconds`` and ``rows_per_s``.

    Raises:
        HybridInputError: a bad checkpoint, input (file, line, column), side tables the ranker needs and cannot
            find, or an input none of whose ids the model knows. Nothing is written then.
    """
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    from hybrid.core.training import init_distributed
    from hybrid.data.duckdb_engine import EngineConfig, connect

    started = time.perf_counter()
    predictor, dataset, since, out = _resolve(cfg, "score", "the scores' parquet file")
    source_path = Path(cfg.input)

    import torch.distributed as dist

    started_group = not dist.is_initialized()
    ctx = init_distributed(device="cpu")
    work = out.parent / f".{out.name}.parts"  # shared by the ranks: one part file each, joined by rank 0
    if ctx.rank == 0:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
    _barrier(ctx)
    try:
        con = connect(EngineConfig(memory_limit=cfg.memory_limit), work / f"rank-{ctx.rank}")
        reader, side = _open_input(con, cfg, predictor, dataset, since, ctx.rank, ctx.world_size)

        report = ScoreReport()
        part = work / f"part-{ctx.rank:05d}.parquet"
        writer = None
        for chunk in _chunks_of_whole_users(reader, lambda b: b.to_pandas()):
            scored, counts = predictor.score_sorted(chunk, batch_size=cfg.batch_size)
            report.add(counts)
            if len(scored):
                table = pa.Table.from_pandas(scored, preserve_index=False)
                writer = writer or pq.ParquetWriter(part, table.schema)
                writer.write_table(table)
        if writer is not None:
            writer.close()
        con.close()
        (work / f"report-{ctx.rank:05d}.json").write_text(json.dumps(report.to_dict()))
        _barrier(ctx)

        total = ScoreReport(side_tables=side)
        for r in range(ctx.world_size):
            total.add(ScoreReport(**json.loads((work / f"report-{r:05d}.json").read_text())))
        if total.scored and total.unknown_items == total.scored and total.unknown_users == total.users:
            name = (predictor.manifest.get("feature_map") or {}).get("metadata", {}).get("dataset", "?")
            raise HybridInputError(f"{source_path}: none of its {total.users} users and none of its candidate items "
                                   f"is in the model's feature map (trained on {name}): is this input from another "
                                   "dataset?")
        if total.scored == 0:
            raise HybridInputError(f"{source_path}: no row to score"
                                   + (f" at or after --since {cfg.since}" if since is not None else ""))
        if ctx.rank == 0:
            _join_parts(work, out, total, predictor)
        _barrier(ctx)
    finally:
        if ctx.rank == 0:
            shutil.rmtree(work, ignore_errors=True)
        if started_group and dist.is_initialized():
            dist.destroy_process_group()
    seconds = time.perf_counter() - started
    return {**total.to_dict(), "out": str(out), "seconds": round(seconds, 2),
            "rows_per_s": round(total.scored / max(seconds, 1e-9), 1)}


def _join_parts(work: Path, out: Path, report: ScoreReport, predictor: Predictor) -> None:
    """The ranks' part files → ``out`` in input order, with the report as key-value metadata; atomic."""
    import duckdb

    tmp = work / out.name
    meta = json.dumps({**report.to_dict(), "model": predictor.source, "tasks": list(predictor.task_names)})
    con = duckdb.connect()
    con.execute("SET preserve_insertion_order = true")
    con.execute("SET temp_directory = ?", [str(work / "join-spill")])
    glob = str(work / "part-*.parquet").replace("'", "''")
    con.execute(f"COPY (SELECT * FROM read_parquet('{glob}') ORDER BY row) TO '{str(tmp).replace(chr(39), chr(39) * 2)}' "
                f"(FORMAT parquet, KV_METADATA {{{REPORT_KEY}: '{meta.replace(chr(39), chr(39) * 2)}'}})")
    con.close()
    os.replace(tmp, out)


def _dataset_of_prepared(prepared_dir: str) -> str | None:
    config_file = Path(prepared_dir) / "config.yaml" if prepared_dir else None
    if config_file is None or not config_file.is_file():
        return None
    return ((yaml.safe_load(config_file.read_text()) or {}).get("data") or {}).get("dataset")


def _barrier(ctx) -> None:
    if ctx.is_distributed:
        import torch.distributed as dist

        dist.barrier()


def read_score_report(path: str | Path) -> dict[str, Any]:
    """The report stored in a scores file's metadata."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(path).metadata or {}
    raw = metadata.get(REPORT_KEY.encode())
    if raw is None:
        raise HybridInputError(f"{path}: no {REPORT_KEY} metadata (not written by hybrid score)")
    return json.loads(raw)
