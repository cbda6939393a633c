"""Checkpoints: a ``torch.distributed.checkpoint`` (DCP) directory plus a JSON manifest, written atomically.

Layout of a run's checkpoint root::

    <root>/step-00000400/      DCP shards (.distcp + .metadata) and manifest.json
    <root>/step-00000800/
    <root>/LATEST              the name of the newest *complete* checkpoint

A checkpoint is written under a temporary name and renamed into place only when every rank has written its
shards and rank 0 the manifest; ``LATEST`` is then replaced atomically. A run killed mid-save leaves the
previous checkpoint and ``LATEST`` untouched. DCP stores sharded tensors by their global layout, so a
checkpoint written by N ranks loads into a model sharded over M ranks, or unsharded.

Example:
    >>> model = torch.nn.Linear(4, 2)
    >>> path = save_checkpoint(root, step=400, state={"model": model.state_dict()},
    ...                        manifest={"config": {"lr": 1e-3}})
    >>> path.name, latest_checkpoint(root) == path
    ('step-00000400', True)
    >>> fresh = torch.nn.Linear(4, 2)
    >>> state = {"model": fresh.state_dict()}
    >>> load_checkpoint(latest_checkpoint(root), state)["step"]     # fills state's tensors in place
    400
    >>> torch.equal(fresh.weight, model.weight)
    True
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from hybrid.core.errors import CheckpointError

MANIFEST = "manifest.json"
LATEST = "LATEST"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns that it 'assumes' a single process; outside torchrun that is exactly the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(root: str | os.PathLike, step: int, state: Mapping[str, Any], manifest: Mapping[str, Any],
                    keep_last: int | None = None) -> Path:
    """Write ``state`` (nested dicts of tensors / sharded tensors / picklable values) and ``manifest``.

    Every rank calls it (DCP writes each rank's shards). ``manifest`` must be JSON-serialisable; ``step``
    is added to it. ``keep_last`` prunes older complete checkpoints. Returns the final directory.
    """
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f".{checkpoint_name(step)}.partial"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    with _single_process_ok():
        dcp.save(dict(state), checkpoint_id=str(tmp), no_dist=not _distributed())
    if _rank() == 0:
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "step": step}, indent=2, default=str))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = root / f".{LATEST}.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / LATEST)
        if keep_last:
            complete = sorted(p for p in root.glob("step-*") if (p / MANIFEST).is_file())
            for old in complete[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root`` (what ``--resume`` continues from), or ``None``."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / MANIFEST).is_file() else None


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {MANIFEST})")
    return json.loads(file.read_text())


def load_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> dict:
    """Load into ``state`` in place (tensors are filled, resharded as needed) and return the manifest.

    Tensor shapes must agree; a mismatch raises :class:`CheckpointError` naming every key and both shapes.
    """
    path = Path(path)
    manifest = read_manifest(path)
    _check_shapes(path, state)
    with _single_process_ok():
        dcp.load(state, checkpoint_id=str(path), no_dist=not _distributed())
    return manifest


def _check_shapes(path: Path, state: Mapping[str, Any]) -> None:
    """Compare the checkpoint's tensor metadata with the target's before DCP fails less clearly."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    problems = []
    for key, tensor in _flatten(state).items():
        if not hasattr(tensor, "shape") or not isinstance(tensor, torch.Tensor):
            continue
        stored = metadata.get(key)
        if stored is None:
            problems.append(f"'{key}' is not in the checkpoint")
        elif isinstance(stored, TensorStorageMetadata) and tuple(stored.size) != tuple(tensor.shape):
            problems.append(f"'{key}': checkpoint {tuple(stored.size)} vs model {tuple(tensor.shape)}")
    if problems:
        raise CheckpointError(f"{path}: does not match the model: " + "; ".join(problems))


def _flatten(state: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """DCP's key scheme for nested dicts: ``outer.inner``."""
    out = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out
