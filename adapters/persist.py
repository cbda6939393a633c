"""Save and re-apply what a transfer owns, PEFT-style: its tables' values, which are frozen, and its report.

A ``state_dict`` round trip does not carry a transfer: a freshly built model that loads one has every table
trainable again. :func:`save_transfer` writes only what the transfer owns — the values of the tables (and
backbone modules) it loaded, the keys it froze, the :class:`~hybrid.adapters.report.TransferReport` — as a
``hybrid.core.checkpoint`` checkpoint (so it is verified on load, works sharded or not, and reshards);
:func:`load_transfer` writes those values into another instance of the model and freezes the same tables.

Example:
    >>> report = apply_transfer(model, TransferConfig("st_sf", "runs/pre/checkpoints"), fm)   # doctest: +SKIP
    >>> save_transfer(model, report, "runs/my-transfer")                                       # doctest: +SKIP
    >>> fresh = build_ranker("dcn_v2", None, fm.vocab_sizes(), ("click",))                     # doctest: +SKIP
    >>> load_transfer(fresh, "runs/my-transfer").frozen_tables                                 # doctest: +SKIP
    ['input.features.ec:t_item_id', 'input.features.ec:t_category', 'input.features.ec:t_action']
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from hybrid.adapters import guard
from hybrid.adapters.config import TransferError
from hybrid.adapters.report import LOADED, TransferReport
from hybrid.adapters.targets import TableSlot, all_table_slots
from hybrid.core.checkpoint import load_checkpoint, read_manifest, resolve_checkpoint, save_checkpoint
from hybrid.core.training import unwrap_dmp

#: ``manifest["kind"]`` of a saved transfer (a pretraining or fine-tuning checkpoint is refused by name)
KIND = "hybrid.transfer"


def save_transfer(model: nn.Module, report: TransferReport, path: str | os.PathLike) -> Path:
    """Write the transfer's tables, frozen keys and report under ``path`` (a checkpoint root).

    Every rank calls it under DMP (each writes its shards). Returns the checkpoint directory.
    """
    inner = unwrap_dmp(model)
    slots = _slots_by_name(inner)
    state = inner.state_dict()
    keys, frozen = [], []
    for entry in report.tables:
        if entry.status != LOADED:
            continue
        slot = slots.get(entry.target)
        if slot is None:
            raise TransferError(f"save_transfer: the report's table {entry.target} is not in this model")
        keys.append(slot.key)
        if entry.frozen:
            frozen.append(slot.key)
    for entry in report.modules:
        if entry.status == LOADED:
            keys += [k for k in state if k.startswith(f"{entry.target}.")]
    return save_checkpoint(path, 0, {"transfer": {k: state[k] for k in keys}},
                           {"kind": KIND, "keys": keys, "frozen": frozen, "transfer_report": report.to_dict()})


def load_transfer(model: nn.Module, path: str | os.PathLike) -> TransferReport:
    """Write a saved transfer into ``model`` (another instance of the same architecture and vocabularies) and
    freeze what it froze; call it where you would call ``apply_transfer`` (before optimizers and sharding).

    Raises:
        TransferError: ``path`` is not a saved transfer, the model lacks one of its tables or modules, or a
            table cannot be frozen where it is. ``CheckpointError``: a corrupt file, or shapes that differ.
    """
    directory = resolve_checkpoint(path)
    if directory is None:
        raise TransferError(f"{path}: no saved transfer (no complete checkpoint there)")
    manifest = read_manifest(directory)
    if manifest.get("kind") != KIND:
        raise TransferError(f"{directory}: not a saved transfer (a {manifest.get('kind', 'training')} checkpoint); "
                            "save one with hybrid.adapters.save_transfer")
    inner = unwrap_dmp(model)
    slots = {slot.key: slot for slot in _slots_by_name(inner).values()}
    for key in manifest["keys"]:
        if key in slots and slots[key].is_meta:
            slots[key].materialize()
    state = inner.state_dict()
    missing = [k for k in manifest["keys"] if k not in state]
    if missing:
        raise TransferError(f"{directory}: the model has no {', '.join(missing)} (saved from another architecture?)")
    load_checkpoint(directory, {"transfer": {k: state[k] for k in manifest["keys"]}})
    for key in manifest["frozen"]:
        problem = slots[key].freeze_problem(model)
        if problem:
            raise TransferError(f"load_transfer: {problem}")
        slots[key].freeze()
    guard.arm(inner, [slots[k] for k in manifest["keys"] if k in slots], set(manifest["frozen"]))
    return TransferReport.from_dict(manifest["transfer_report"])


def _slots_by_name(inner: nn.Module) -> dict[str, TableSlot]:
    """Every table of the model by report name: collection tables and ``nn.Embedding`` / ``EmbeddingBag``."""
    slots = {slot.name: slot for slot in all_table_slots(inner)}
    for path, module in inner.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            slots[path] = TableSlot(path, None, module, False)
    return slots
