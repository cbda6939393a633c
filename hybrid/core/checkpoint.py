"""Checkpoints: a ``torch.distributed.checkpoint`` (DCP) directory plus a JSON manifest, written atomically.

Layout of a run's checkpoint root::

    <root>/step-00000400/      DCP shards (.distcp + .metadata) and manifest.json
    <root>/step-00000800/
    <root>/LATEST              the name of the newest *complete* checkpoint

A checkpoint is written under a temporary name and renamed into place only when every rank has written its
shards and rank 0 the manifest; ``LATEST`` is then replaced atomically. A run killed mid-save leaves the
previous checkpoint and ``LATEST`` untouched. DCP stores sharded tensors by their global layout, so a
checkpoint written by N ranks loads into a model sharded over M ranks, or unsharded.

Integrity: the manifest records every file of the directory (the ``.distcp`` shards, ``.metadata``) with
its size and BLAKE2b checksum, taken after DCP wrote them, and a checksum of its own facts.
:func:`verify_checkpoint` checks them, and every reader calls it before it reads a tensor
(:func:`load_checkpoint`; the transfer source and ``load_finetuned`` through it or directly): a
truncated, zeroed, missing or changed file is one :class:`CheckpointError` naming the file and what is
wrong, not a pickle error or silently wrong weights. :func:`resume_checkpoint` is what ``--resume``
continues from: ``LATEST``'s checkpoint when it verifies, else (``previous=True``) the newest one that does.

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
import hashlib
import json
import os
import re
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
METADATA = ".metadata"  # DCP's global metadata file (tensor keys, shapes, which shard holds which bytes)
#: the manifest key of the integrity record (stripped from what :func:`read_manifest` returns)
INTEGRITY = "integrity"
_HASH = "blake2b"
_CHUNK = 4 << 20  # bytes per read while hashing (hashlib releases the GIL on large updates)
_STEP_DIR = re.compile(r"^step-(\d+)$")


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
    _barrier()  # every rank's shards are on disk before they are listed and hashed
    files = _file_records(tmp)
    if _rank() == 0:
        facts = json.loads(json.dumps({**manifest, "step": step}, default=str))  # as it will read back
        facts[INTEGRITY] = {"hash": _HASH, "manifest": _facts_digest(facts), "files": files}
        _write_durably(tmp / MANIFEST, json.dumps(facts, indent=2).encode())
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


def _file_records(directory: Path) -> dict[str, dict[str, Any]]:
    """``{file name: {"bytes": size, "blake2b": hex digest}}`` of every file DCP wrote into ``directory``.

    Under a process group the files are hashed by all ranks (file ``i`` by rank ``i % world``) and the
    records gathered, so the cost of a save does not grow on rank 0 with the number of ranks. Every rank
    calls it; the directory must be visible to all of them (as for the rename into place).
    """
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    world = dist.get_world_size() if _distributed() else 1
    mine = {name: _record(directory / name) for i, name in enumerate(names) if i % world == _rank()}
    if world == 1:
        return mine
    gathered: list[dict[str, dict[str, Any]] | None] = [None] * world
    dist.all_gather_object(gathered, mine)
    return dict(sorted((name, rec) for part in gathered for name, rec in (part or {}).items()))


def _record(file: Path) -> dict[str, Any]:
    return {"bytes": file.stat().st_size, _HASH: _digest(file)}


def _digest(file: Path) -> str:
    """BLAKE2b of a file's bytes, streamed in chunks (constant memory)."""
    h = hashlib.blake2b()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(file, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _facts_digest(facts: Mapping[str, Any]) -> str:
    """Checksum of the manifest's own facts (everything but the integrity record), key order independent."""
    body = {k: v for k, v in facts.items() if k != INTEGRITY}
    return hashlib.blake2b(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_durably(file: Path, data: bytes) -> None:
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root`` (what ``--resume`` continues from), or ``None``."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / MANIFEST).is_file() else None


def read_manifest(path: str | os.PathLike) -> dict:
    """The facts of a checkpoint's manifest (what ``save_checkpoint`` was given, plus ``step``).

    Reads only the manifest (it does not verify the shards: :func:`verify_checkpoint` does); the integrity
    record is not part of the returned facts.

    Raises:
        CheckpointError: no manifest, or one that is not a JSON object.
    """
    facts = _read_raw_manifest(Path(path))
    facts.pop(INTEGRITY, None)
    return facts


def _read_raw_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"{path}: missing (no checkpoint directory there)")
    if not file.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint ({MANIFEST} missing)")
    data = file.read_bytes()
    if not data.strip(b" \t\r\n"):
        raise CheckpointError(f"{path}: corrupt checkpoint: {MANIFEST} is empty ({len(data)} bytes)")
    try:
        facts = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: corrupt checkpoint: {MANIFEST} is not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: corrupt checkpoint: {MANIFEST} is not valid JSON (line {err.lineno} "
                              f"column {err.colno}: {err.msg})") from None
    if not isinstance(facts, dict):
        raise CheckpointError(f"{path}: corrupt checkpoint: {MANIFEST} is not a JSON object")
    return facts


#: checkpoint directory → the stat signature of its files when it last verified (see verify_checkpoint)
_VERIFIED: dict[str, tuple] = {}


def _signature(path: Path) -> tuple:
    entries = []
    with os.scandir(path) as it:
        for entry in it:
            st = entry.stat(follow_symlinks=True)
            entries.append((entry.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return tuple(sorted(entries))


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check that a checkpoint directory is complete and unchanged since it was saved; return its manifest.

    Checks that ``manifest.json`` is there and a valid JSON object whose facts match their recorded checksum,
    and that every file it records (each ``.distcp`` shard, ``.metadata``) is there with the recorded size
    and BLAKE2b checksum. Reading is streamed (a 100 MB checkpoint verifies in about 0.2 s on one core of a
    laptop-class CPU). A directory that already verified in this process, and whose files' sizes, times
    and inodes have not changed since, is not hashed again (``load_checkpoint`` after ``verify_checkpoint``
    costs one ``stat`` per file).

    Checkpoints written before manifests recorded their files (no ``integrity`` key) still load: for them
    only the manifest's JSON and the presence of ``.metadata`` can be checked — a truncated or changed shard
    surfaces only when DCP reads it.

    Returns:
        The manifest's facts (as :func:`read_manifest`).

    Raises:
        CheckpointError: one line naming the checkpoint, each bad file and what is wrong with it
            (``missing``, ``truncated: 1234 of 5678 bytes``, ``checksum mismatch``, ``manifest.json is not
            valid JSON``...).
    """
    path = Path(path)
    raw = _read_raw_manifest(path)
    integrity = raw.pop(INTEGRITY, None)
    if integrity is None:  # a checkpoint from before integrity records: presence only
        if not (path / METADATA).is_file():
            raise CheckpointError(f"{path}: incomplete checkpoint: {METADATA} missing")
        return raw
    files = integrity.get("files") if isinstance(integrity, Mapping) else None
    if not isinstance(files, Mapping) or not all(isinstance(r, Mapping) for r in files.values()):
        raise CheckpointError(f"{path}: corrupt checkpoint: {MANIFEST} has a malformed '{INTEGRITY}' record")
    if integrity.get("manifest") != _facts_digest(raw):
        raise CheckpointError(f"{path}: corrupt checkpoint: {MANIFEST} checksum mismatch (its contents changed "
                              "since it was saved)")
    key = str(path.resolve())
    signature = _signature(path)
    if _VERIFIED.get(key) == signature:
        return raw
    problems = [] if METADATA in files else [f"{METADATA} not recorded in {MANIFEST}"]
    for name, rec in sorted(files.items()):
        file = path / name
        if not file.is_file():
            problems.append(f"{name} missing")
            continue
        size, want = file.stat().st_size, rec.get("bytes")
        if size != want:
            problems.append(f"{name} truncated: {size} of {want} bytes" if isinstance(want, int) and size < want
                            else f"{name} has {size} bytes, {want} recorded")
        elif _digest(file) != rec.get(_HASH):
            problems.append(f"{name} checksum mismatch (same size, different bytes)")
    if problems:
        _VERIFIED.pop(key, None)
        raise CheckpointError(f"{path}: corrupt or incomplete checkpoint: " + "; ".join(problems))
    _VERIFIED[key] = signature
    return raw


def checkpoint_dirs(root: str | os.PathLike) -> list[Path]:
    """Every ``step-XXXXXXXX`` directory under ``root``, complete or not, newest (highest step) first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def resolve_checkpoint(path: str | os.PathLike) -> Path | None:
    """``path`` itself when it is a checkpoint directory (a manifest or DCP files in it), else the checkpoint
    ``path/LATEST`` names — even a missing or incomplete one, so :func:`verify_checkpoint` can say what is
    wrong with it; ``None`` when ``path`` is neither."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / MANIFEST).is_file() or (path / METADATA).is_file() or any(path.glob("*.distcp")):
        return path
    pointer = path / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        return path / name if name else None
    return None


def resume_checkpoint(root: str | os.PathLike, *, previous: bool = False,
                      advice: str = "pass --resume=previous to continue from it") -> Path | None:
    """The checkpoint a resumed run continues from (verified), or ``None`` when ``root`` holds none.

    ``LATEST``'s checkpoint when it verifies. When it does not (a corrupt or incomplete checkpoint, a
    ``LATEST`` naming a missing one, no ``LATEST`` beside ``step-*`` directories) and an older
    ``step-*`` checkpoint verifies, the newest such one is returned with ``previous=True`` and otherwise
    refused, in one line that names it and ends with ``advice``.

    Raises:
        CheckpointError: as above, or no checkpoint under ``root`` verifies.
    """
    root = Path(root)
    pointer = root / LATEST
    candidates = checkpoint_dirs(root)
    if not pointer.is_file() and not candidates:
        return None
    named = None
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named.is_dir() and named != root:
            try:
                verify_checkpoint(named)
                return named
            except CheckpointError as err:
                problem = str(err)
        else:
            problem = f"{pointer} names {named.name!r}, which is missing"
    else:
        problem = f"{root}: no {LATEST} pointer beside {candidates[0].name}"
    for candidate in candidates:
        if candidate == named:
            continue
        try:
            verify_checkpoint(candidate)
        except CheckpointError:
            continue
        if previous:
            return candidate
        raise CheckpointError(f"{problem}; the newest complete checkpoint is {candidate}: {advice}")
    raise CheckpointError(f"{problem}; no other checkpoint under {root} is complete, nothing to resume from")


def load_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> dict:
    """Verify the checkpoint (:func:`verify_checkpoint`), load into ``state`` in place (tensors are filled,
    resharded as needed) and return the manifest.

    Tensor shapes must agree; a mismatch raises :class:`CheckpointError` naming every key and both shapes.
    """
    path = Path(path)
    manifest = verify_checkpoint(path)
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
