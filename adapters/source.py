"""The pretraining checkpoint as a transfer source: what it holds, and loading just the parts asked for.

The checkpoint's key layout is :mod:`hybrid.pretrain.layout`'s (tables possibly written as row-wise
``ShardedTensor``; optimizer and RNG state are never read here). DCP stores tensors by global layout, so reading them into
plain full tensors works whatever the number of ranks that wrote them (the resharding the adapters rely on).

Example:
    >>> source = PretrainedCheckpoint.open("runs/pretrain/checkpoints")   # doctest: +SKIP
    >>> source.tables                           # doctest: +SKIP
    {'t_item_id': (1684, 64), 't_category': (21, 64), ...}
    >>> tensors = source.load(["model.embeddings.embeddings.t_item_id.weight"])   # doctest: +SKIP

(a pretraining checkpoint is what ``hybrid pretrain`` writes; ``tests/test_adapters.py`` opens real ones.)
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybrid.adapters.config import TransferError
from hybrid.core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
)
from hybrid.pretrain.layout import (
    BACKBONE_PREFIX,
    INPUT_PROJ_KEY,
    TABLE_PREFIX,
    key_table,
)


@dataclass
class PretrainedCheckpoint:
    """A readable pretraining checkpoint.

    Args:
        path: the checkpoint directory (holds ``manifest.json`` and the DCP files).
        manifest: its manifest.
        shapes: every tensor key of the DCP state → global shape.
    """

    path: Path
    manifest: dict[str, Any]
    shapes: dict[str, tuple[int, ...]] = field(repr=False)

    @classmethod
    def open(cls, path: str | Path) -> "PretrainedCheckpoint":
        """Open a checkpoint directory, or the one a checkpoint root's ``LATEST`` names; verify it first.

        Raises:
            TransferError: no checkpoint there, or not a pretraining checkpoint (names the path).
            CheckpointError: a corrupt or incomplete checkpoint (names the file and what is wrong:
                :func:`~hybrid.core.checkpoint.verify_checkpoint`).
        """
        path = Path(path)
        resolved = resolve_checkpoint(path)
        if resolved is None:
            raise TransferError(f"{path}: not a pretraining checkpoint (no manifest.json, and no LATEST "
                                "pointer to a complete checkpoint)")
        path = resolved
        manifest = verify_checkpoint(path)  # before any read: a truncated / changed file is one line
        try:
            from torch.distributed.checkpoint import FileSystemReader
            from torch.distributed.checkpoint.metadata import TensorStorageMetadata

            metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        except (CheckpointError, OSError, ValueError) as err:
            raise TransferError(f"{path}: unreadable checkpoint ({err})") from None
        shapes = {k: tuple(v.size) for k, v in metadata.items() if isinstance(v, TensorStorageMetadata)}
        source = cls(path=path, manifest=manifest, shapes=shapes)
        if not source.tables:
            raise TransferError(f"{path}: holds no pretrained tables (no '{TABLE_PREFIX}t_<feature>.weight' "
                                "keys); is it a pretraining checkpoint?")
        return source

    @property
    def tables(self) -> dict[str, tuple[int, int]]:
        """Pretrained table name → ``(rows, dim)``."""
        out = {key_table(key): shape for key, shape in self.shapes.items() if key_table(key) is not None}
        return dict(sorted(out.items()))

    @property
    def backbone_shapes(self) -> dict[str, tuple[int, ...]]:
        """``backbone.*`` parameter name (relative to the backbone) → shape."""
        return {k[len(BACKBONE_PREFIX):]: s for k, s in self.shapes.items() if k.startswith(BACKBONE_PREFIX)}

    @property
    def input_proj_shape(self) -> tuple[int, ...] | None:
        return self.shapes.get(INPUT_PROJ_KEY)

    @property
    def feature_map(self) -> dict[str, Any] | None:
        """The feature map (dict form) the pretrained tables are indexed by, if the manifest has one."""
        return self.manifest.get("feature_map")

    @property
    def run_id(self) -> str | None:
        """The MLflow run id of the pretraining run, if it was logged."""
        run = self.manifest.get("mlflow_run_id")
        return str(run) if run else None

    @property
    def backbone_config(self) -> dict[str, Any] | None:
        model = self.manifest.get("model")
        return model.get("backbone") if isinstance(model, Mapping) else None

    def load(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read the tensors ``keys`` (full, unsharded, CPU) in one DCP call.

        Under a process group every rank must call it with the same keys (DCP's load is collective);
        each rank gets the full tensors.
        """
        keys = sorted(set(keys))
        missing = [k for k in keys if k not in self.shapes]
        if missing:
            raise TransferError(f"{self.path}: the checkpoint has no {', '.join(missing)}")
        if not keys:
            return {}
        nested: dict[str, Any] = {}
        flat: dict[str, torch.Tensor] = {}
        for key in keys:
            tensor = torch.empty(self.shapes[key])
            flat[key] = tensor
            node = nested
            head, _, rest = key.partition(".")
            # DCP flattens one level of nesting per dict; the model state is one dict under "model"
            node.setdefault(head, {})[rest] = tensor
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed\.checkpoint")
            load_checkpoint(self.path, nested)
        return flat

    def describe(self) -> str:
        tables = ", ".join(f"{t} {r}x{d}" for t, (r, d) in self.tables.items())
        return f"{self.path} ({tables}; {len(self.backbone_shapes)} backbone tensors)"
