"""What a transfer does: the strategy (GPSD's five), the table map and the policies — one dataclass.

Strategies (GPSD, Wang et al. KDD 2025, Fig. 2; reference notes §1.5):

========  ===================  ===================  ======================
strategy  transformer (dense)  embeddings (sparse)  embeddings trainable?
========  ===================  ===================  ======================
``nt``    random               random               yes
``ft``    pretrained           pretrained           yes
``st``    random               pretrained           yes
``ft_sf`` pretrained           pretrained           **frozen**
``st_sf`` random               pretrained           **frozen**
========  ===================  ===================  ======================

Example:
    >>> cfg = TransferConfig(strategy="st_sf", checkpoint="runs/pretrain/checkpoints")
    >>> cfg.strategy.freezes_tables, cfg.strategy.moves_backbone
    (True, False)
    >>> cfg = TransferConfig(strategy="ft", checkpoint="ckpt", table_map={"t_item_id": "item_emb"},
    ...                      new_rows="mean")
    >>> cfg.strategy.moves_backbone, [t.path for t in cfg.table_map["t_item_id"]]      # one or more targets
    (True, ['item_emb'])
"""
from __future__ import annotations

import difflib
import enum
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from hybrid.core.errors import TransferError

NEW_ROW_POLICIES = ("keep", "mean", "zero")
PROJECTIONS = ("svd", "random")
EMBEDDING_SET_POLICIES = ("first", "all")


class Strategy(str, enum.Enum):
    """GPSD's transfer strategies (module docstring). Parse user text with :meth:`parse`."""

    NT = "nt"
    FT = "ft"
    ST = "st"
    FT_SF = "ft_sf"
    ST_SF = "st_sf"

    @classmethod
    def parse(cls, value: "Strategy | str") -> "Strategy":
        """``"ST&SF"``, ``"st-sf"``, ``"st_sf"``, ``Strategy.ST_SF`` → ``Strategy.ST_SF``; else a clear error."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            key = value.strip().lower().replace("&", "_").replace("-", "_").replace(" ", "")
            for member in cls:
                if member.value == key:
                    return member
        names = ", ".join(m.value for m in cls)
        hint = difflib.get_close_matches(str(value).lower(), [m.value for m in cls], n=1)
        raise TransferError(f"unknown transfer strategy {value!r}; expected one of {names} "
                            f"(GPSD: NT, FT, ST, FT&SF, ST&SF)" + (f" — did you mean {hint[0]!r}?" if hint else ""))

    @property
    def label(self) -> str:
        """GPSD's spelling: ``NT``, ``FT``, ``ST``, ``FT&SF``, ``ST&SF``."""
        return self.value.upper().replace("_", "&")

    @property
    def moves_tables(self) -> bool:
        return self is not Strategy.NT

    @property
    def moves_backbone(self) -> bool:
        return self in (Strategy.FT, Strategy.FT_SF)

    @property
    def freezes_tables(self) -> bool:
        return self in (Strategy.FT_SF, Strategy.ST_SF)


@dataclass(frozen=True)
class TableTarget:
    """Where one pretrained table goes in the target model.

    Args:
        path: a module path in the target model, one of
            ``"features.ec:t_item_id"`` — table ``t_item_id`` of the EmbeddingCollection /
            EmbeddingBagCollection at ``features.ec`` (sharded or not);
            ``"item_emb"`` — an ``nn.Embedding`` / ``nn.EmbeddingBag`` module, or a collection that has a
            table named like the pretrained one (or only one table);
            ``"t_item_id"`` — a table name: every collection table of that name (e.g. every expert's).
        feature: the target feature whose vocabulary indexes the table's rows (rows are aligned by raw
            value through it). Default: ``<x>`` for a target table named ``t_<x>``, else the pretrained
            table's feature.

    Example:
        >>> TableTarget("tower.item_table", feature="movie_id").feature
        'movie_id'
    """

    path: str
    feature: str | None = None


@dataclass(frozen=True)
class TransferConfig:
    """One transfer: which strategy, from which checkpoint, onto which tables, with which policies.

    Args:
        strategy: ``nt`` | ``ft`` | ``st`` | ``ft_sf`` | ``st_sf`` (or GPSD's spelling ``FT&SF``).
        checkpoint: a pretraining checkpoint directory (``.../step-00000400``) or a checkpoint root holding
            ``LATEST``. May be ``None`` only for ``nt``.
        table_map: pretrained table → target: a path string or :class:`TableTarget` (see there), or a list
            of them to fill several target tables from one pretrained table. ``None`` (default): by name —
            each pretrained table (``t_item_id``, ``t_category``, ``t_action``) goes to every TorchRec
            collection table of the same name; pretrained tables with no namesake are reported skipped.
            Built-in rankers need nothing else; a model with plain ``nn.Embedding`` tables needs a map.
        tables: only these pretrained tables (default: all the map covers). GPSD's public ST&SF configs
            move the item table only: ``tables=("t_item_id",)``.
        new_rows: init of target rows whose raw value the pretrained map lacks, and of the OOV row:
            ``"keep"`` (the target's own init), ``"mean"`` (mean of the pretrained known rows) or
            ``"zero"``. The padding row always keeps the target's value.
        backbone_paths: FT only: target module paths that receive the pretrained ``backbone.*`` (and,
            where the parent has one, ``input_proj``). ``None``: every ``hybrid.core`` backbone module
            in the model (the GPSD ranker's ``backbone``, a transformer history encoder's).
        projection: when a pretrained table is wider or narrower than its target: ``None`` refuses with a
            message naming table and shapes; ``"svd"`` keeps the top right-singular directions of the
            pretrained rows (dot products best preserved; zero-padded when the target is wider);
            ``"random"`` multiplies by a seeded Gaussian ``[D_src, D_tgt] / sqrt(D_tgt)``.
        seed: seed of the ``"random"`` projection (the same on every rank).
        embedding_sets: a model with several embedding sets has several namesakes of one table (the
            multi-embedding MoE: ``experts.<k>.input.features.ec:t_item_id``). By name (no ``table_map``),
            ``"first"`` (default) fills the first set only and the others keep their own init, so the K sets
            stay different — the diversity the multi-embedding paradigm relies on; with a freezing strategy
            only that set is frozen. ``"all"`` fills (and freezes) every set with the same rows: K identical
            sets. A ``table_map`` says exactly which tables to fill and is not affected.
        min_overlap: the least share (0..1) of a target table's known raw values that the pretrained
            feature map must also know, per table aligned through feature maps; below it the transfer is
            refused (a checkpoint pretrained on another dataset shares raw ids with the target only by
            accident: ML-100K movie id 42 is not ML-1M movie id 42, and its row would fill the wrong movie).
            ``0.0`` accepts any overlap (``hybrid finetune --allow-foreign-ids``). A feature map holds
            vocabularies only, no per-item attributes, so the raw-id overlap is what is checked; the report
            shows it per table (``TableEntry.overlap``) and notes when the two maps were fitted on
            differently named datasets. Tables given by ``alignments`` are not checked.

    Raises:
        TransferError: unknown strategy, policy or projection; no checkpoint for a strategy that needs one.
    """

    strategy: Strategy | str = Strategy.ST_SF
    checkpoint: str | Path | None = None
    table_map: Mapping[str, Any] | None = None
    tables: tuple[str, ...] | None = None
    new_rows: str = "keep"
    backbone_paths: tuple[str, ...] | None = None
    projection: str | None = None
    seed: int = 0
    embedding_sets: str = "first"
    min_overlap: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategy", Strategy.parse(self.strategy))
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", str(self.checkpoint))  # one form, so configs compare equal
        if self.new_rows not in NEW_ROW_POLICIES:
            raise TransferError(f"TransferConfig.new_rows: unknown policy {self.new_rows!r}; expected one of "
                                f"{', '.join(NEW_ROW_POLICIES)}")
        if self.embedding_sets not in EMBEDDING_SET_POLICIES:
            raise TransferError(f"TransferConfig.embedding_sets: unknown policy {self.embedding_sets!r}; expected one "
                                f"of {', '.join(EMBEDDING_SET_POLICIES)}")
        if isinstance(self.min_overlap, bool) or not isinstance(self.min_overlap, (int, float)) \
                or not 0.0 <= float(self.min_overlap) <= 1.0:
            raise TransferError(f"TransferConfig.min_overlap: expected a share between 0 and 1 (0.5 = half of the "
                                f"target's raw values known to the checkpoint), got {self.min_overlap!r}")
        object.__setattr__(self, "min_overlap", float(self.min_overlap))
        if self.projection is not None and self.projection not in PROJECTIONS:
            raise TransferError(f"TransferConfig.projection: unknown {self.projection!r}; expected None or one of "
                                f"{', '.join(PROJECTIONS)}")
        if self.strategy is not Strategy.NT and self.checkpoint is None:
            raise TransferError(f"TransferConfig.checkpoint: strategy {self.strategy.label} needs a pretraining "
                                "checkpoint")
        for name in ("tables", "backbone_paths"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TransferError(f"TransferConfig.{name}: expected a list of names, got the string {value!r}")
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        if self.table_map is not None:
            if not isinstance(self.table_map, Mapping):
                raise TransferError(f"TransferConfig.table_map: expected a mapping pretrained table → target, got "
                                    f"{type(self.table_map).__name__}")
            object.__setattr__(self, "table_map", {str(k): _targets(k, v) for k, v in self.table_map.items()})

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for MLflow params and manifests); :meth:`from_dict` inverts it."""
        table_map = None
        if self.table_map is not None:
            table_map = {k: [{"path": t.path, "feature": t.feature} for t in v] for k, v in self.table_map.items()}
        checkpoint = None if self.checkpoint is None else str(self.checkpoint)
        return {"strategy": self.strategy.value, "checkpoint": checkpoint,
                "table_map": table_map, "tables": list(self.tables) if self.tables is not None else None,
                "new_rows": self.new_rows, "projection": self.projection,
                "backbone_paths": list(self.backbone_paths) if self.backbone_paths is not None else None,
                "seed": self.seed, "embedding_sets": self.embedding_sets, "min_overlap": self.min_overlap}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TransferConfig":
        """Build from a mapping (YAML / JSON); an unknown key is an error that names it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            hints = {k: difflib.get_close_matches(k, sorted(known), n=1) for k in unknown}
            text = ", ".join(k + (f" (did you mean {hints[k][0]}?)" if hints[k] else "") for k in unknown)
            raise TransferError(f"TransferConfig: unknown key(s) {text}; known: {', '.join(sorted(known))}")
        return cls(**dict(data))


def _targets(source: str, value: Any) -> tuple[TableTarget, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, TableTarget):
            out.append(item)
        elif isinstance(item, str) and item:
            out.append(TableTarget(item))
        elif isinstance(item, Mapping) and set(item) <= {"path", "feature"} and "path" in item:
            out.append(TableTarget(str(item["path"]), item.get("feature")))
        else:
            raise TransferError(f"TransferConfig.table_map[{source!r}]: expected a module path, TableTarget or "
                                f"{{path, feature}}, got {item!r}")
    if not out:
        raise TransferError(f"TransferConfig.table_map[{source!r}]: no target given")
    return tuple(out)
