"""What a transfer did, PEFT-style: every table and module with its fate, and trainable/frozen counts.

``print(report)`` shows a table; ``report.to_dict()`` is the JSON artifact a job logs to MLflow, and
``report.metrics()`` the counts it logs as metrics. ``known`` is the share of the target's raw values that
the checkpoint's feature map knows too (:attr:`TableEntry.overlap`).

Example (``print(report)``)::

    Transfer ST&SF from runs/pretrain/checkpoints/step-00000400 (pretrain run 3f2a9c...)
      status    source             target                         rows aligned/new  known  new rows  trainable  why
      loaded    t_item_id 1684x16  features.ec:t_item_id 1618x16  1616 / 1          100 %  keep      frozen
      skipped   t_action 7x16      -                              no table named 't_action' in the model
      own init  -                  features.ec:t_user_id 945x16                                     yes        not in the transfer
    trainable params: 45,678 || frozen params: 27,000 || all params: 72,678 || trainable%: 62.85
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hybrid.adapters.config import Strategy

LOADED, SKIPPED, OWN_INIT = "loaded", "skipped", "own init"


def _shape(shape: tuple[int, ...] | list[int] | None) -> str:
    return "x".join(str(s) for s in shape) if shape else ""


@dataclass
class TableEntry:
    """The fate of one table.

    Args:
        status: ``loaded`` (pretrained rows written), ``skipped`` (a pretrained table not moved; ``reason``
            says why) or ``own init`` (a target table that keeps its own initialisation).
        source, target: pretrained table name / target ``path:table`` (empty when there is none).
        source_shape, target_shape: ``[rows, dim]``.
        feature: the target feature whose vocabulary aligned the rows.
        rows_aligned: target rows filled from the pretrained row of the same raw value.
        rows_new: target rows the pretrained map does not know (their raw value is new, plus the OOV row),
            initialised by ``new_rows``; the padding row is neither (it keeps the target's value).
        new_rows: the policy used for them (``keep`` / ``mean`` / ``zero``).
        projection: ``svd`` / ``random`` when the dims differed, else ``None``.
        frozen: the table gets no update during training.
        overlap: share of the target's known raw values that the pretrained feature map knows too (rows
            aligned through feature maps; ``None`` for rows given by ``alignments``). A transfer below
            ``TransferConfig.min_overlap`` is refused.
        reason: why it was skipped or keeps its init.
    """

    status: str
    source: str = ""
    target: str = ""
    source_shape: list[int] | None = None
    target_shape: list[int] | None = None
    feature: str | None = None
    rows_aligned: int = 0
    rows_new: int = 0
    new_rows: str | None = None
    projection: str | None = None
    frozen: bool = False
    reason: str = ""
    overlap: float | None = None


@dataclass
class ModuleEntry:
    """The fate of one dense module (a transformer backbone or its input projection).

    Args:
        status: ``loaded``, ``skipped`` or ``own init``.
        source: pretrained prefix (``backbone.*`` or ``input_proj``).
        target: module path in the target model ('' when there is none).
        tensors: tensors loaded (or that would have been).
        params: parameters of the target module.
        reason: why it was skipped or keeps its init.
    """

    status: str
    source: str
    target: str = ""
    tensors: int = 0
    params: int = 0
    reason: str = ""


@dataclass
class TransferReport:
    """Result of :func:`hybrid.adapters.apply_transfer`.

    Args:
        strategy: the strategy applied.
        checkpoint: the pretraining checkpoint directory read (``None`` for NT without one).
        pretrain_run_id: the pretraining MLflow run id from its manifest (``None`` if absent).
        tables: one entry per pretrained table × target, plus the target tables left to their own init.
        modules: backbone / input projection entries.
        trainable_params, frozen_params: parameter counts of the target after the transfer (global sizes
            for sharded tables).
        sharded: the target was a ``DistributedModelParallel``.
        notes: anything else worth knowing (e.g. frozen tables that hold new rows).
        other_params: parameters no entry covers (heads, towers, gates...): they keep their own init.
        config: the :class:`~hybrid.adapters.config.TransferConfig` applied, as a dict (what reproduces the transfer).
    """

    strategy: Strategy
    checkpoint: str | None = None
    pretrain_run_id: str | None = None
    tables: list[TableEntry] = field(default_factory=list)
    modules: list[ModuleEntry] = field(default_factory=list)
    trainable_params: int = 0
    frozen_params: int = 0
    sharded: bool = False
    notes: list[str] = field(default_factory=list)
    other_params: int = 0
    config: dict[str, Any] | None = None

    # -- views ---------------------------------------------------------------------------------------------
    @property
    def loaded_tables(self) -> list[str]:
        return [e.target for e in self.tables if e.status == LOADED]

    @property
    def frozen_tables(self) -> list[str]:
        return [e.target for e in self.tables if e.frozen]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """``(what, reason)`` of every skipped table and module."""
        return ([(e.source, e.reason) for e in self.tables if e.status == SKIPPED]
                + [(e.source, e.reason) for e in self.modules if e.status == SKIPPED])

    @property
    def loaded_modules(self) -> list[str]:
        return [e.target for e in self.modules if e.status == LOADED]

    @property
    def all_params(self) -> int:
        return self.trainable_params + self.frozen_params

    # -- logging -------------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Counts for MLflow (``transfer/...``): params, tables loaded/frozen/skipped, rows aligned/new."""
        out = {"transfer/trainable_params": float(self.trainable_params),
               "transfer/frozen_params": float(self.frozen_params),
               "transfer/tables_loaded": float(len(self.loaded_tables)),
               "transfer/tables_frozen": float(len(self.frozen_tables)),
               "transfer/tables_skipped": float(sum(e.status == SKIPPED for e in self.tables)),
               "transfer/modules_loaded": float(len(self.loaded_modules))}
        for e in self.tables:
            if e.status == LOADED:
                name = e.target.replace(":", "/")
                out[f"transfer/rows_aligned/{name}"] = float(e.rows_aligned)
                out[f"transfer/rows_new/{name}"] = float(e.rows_new)
                if e.overlap is not None:
                    out[f"transfer/overlap/{name}"] = float(e.overlap)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (the MLflow artifact); :meth:`from_dict` inverts it.

        Beside the entries it holds ``metrics`` (:meth:`metrics`) and ``tags`` (``strategy``,
        ``pretrain_run_id``, ``pretrain_checkpoint``), so a job that only sees the dict can log them.
        """
        return {"strategy": self.strategy.value, "checkpoint": self.checkpoint,
                "pretrain_run_id": self.pretrain_run_id, "sharded": self.sharded,
                "trainable_params": self.trainable_params, "frozen_params": self.frozen_params,
                "other_params": self.other_params, "config": self.config,
                "tables": [asdict(e) for e in self.tables], "modules": [asdict(e) for e in self.modules],
                "notes": list(self.notes), "metrics": self.metrics(), "tags": self.tags()}

    def tags(self) -> dict[str, str]:
        """MLflow tags linking a fine-tuning run to its source: strategy, pretraining run id and checkpoint."""
        out = {"strategy": self.strategy.value}
        if self.pretrain_run_id:
            out["pretrain_run_id"] = self.pretrain_run_id
        if self.checkpoint:
            out["pretrain_checkpoint"] = self.checkpoint
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TransferReport":
        return cls(strategy=Strategy.parse(data["strategy"]), checkpoint=data.get("checkpoint"),
                   pretrain_run_id=data.get("pretrain_run_id"), sharded=bool(data.get("sharded", False)),
                   trainable_params=int(data.get("trainable_params", 0)),
                   frozen_params=int(data.get("frozen_params", 0)),
                   tables=[TableEntry(**e) for e in data.get("tables", [])],
                   modules=[ModuleEntry(**e) for e in data.get("modules", [])], notes=list(data.get("notes", [])),
                   other_params=int(data.get("other_params", 0)), config=data.get("config"))

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON (atomically: a crash never leaves half a file)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TransferReport":
        return cls.from_dict(json.loads(Path(path).read_text()))

    # -- printing ------------------------------------------------------------------------------------------
    def rows(self) -> list[tuple[str, ...]]:
        """The printed table's rows (header first)."""
        out = [("status", "source", "target", "rows aligned/new", "known", "new rows", "trainable", "why")]
        for e in self.tables:
            source = f"{e.source} {_shape(e.source_shape)}".strip() or "-"
            target = f"{e.target} {_shape(e.target_shape)}".strip() or "-"
            trainable = "frozen" if e.frozen else "yes"
            if e.status == LOADED:
                policy = (e.new_rows or "") + (f", {e.projection} projection" if e.projection else "")
                known = "" if e.overlap is None else f"{100 * e.overlap:.0f} %"
                out.append((e.status, source, target, f"{e.rows_aligned} / {e.rows_new}", known, policy, trainable,
                            ""))
            elif e.status == SKIPPED:
                out.append((e.status, source, target, "", "", "", "", e.reason))
            else:
                out.append((e.status, source, target, "", "", "", trainable, e.reason))
        for m in self.modules:
            source = f"{m.source} ({m.tensors})" if m.tensors else m.source
            target = f"{m.target} {m.params:,} params" if m.target else "-"
            out.append((m.status, source, target, "", "", "", "yes" if m.target else "",
                        m.reason if m.status != LOADED else ""))
        if self.other_params:
            out.append((OWN_INIT, "-", f"all other parameters {self.other_params:,}", "", "", "", "yes",
                        "not listed above"))
        return out

    def __str__(self) -> str:
        head = f"Transfer {self.strategy.label}"
        if self.checkpoint:
            head += f" from {self.checkpoint}"
        if self.pretrain_run_id:
            head += f" (pretrain run {self.pretrain_run_id})"
        if self.sharded:
            head += " into a sharded model"
        rows = self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head]
        for r in rows:
            lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        total = self.all_params
        pct = 100.0 * self.trainable_params / total if total else 0.0
        lines.append(f"trainable params: {self.trainable_params:,} || frozen params: {self.frozen_params:,} || "
                     f"all params: {total:,} || trainable%: {pct:.2f}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
