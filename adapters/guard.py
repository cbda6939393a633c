"""A check that stops a transferred model sharded the way that undoes the transfer.

TorchRec's tutorials shard with a plain ``DistributedModelParallel(model)``. For a transferred model that is
wrong twice over: DMP re-initialises an ``EmbeddingBagCollection`` built on CPU (the pretrained rows are
gone), and it gives a frozen table FBGEMM's default fused SGD (lr 0.01), so the "frozen" table trains.
:func:`hybrid.core.training.shard_model` (re-exported as ``hybrid.adapters.shard_model``) does neither.

:func:`arm` (called by ``apply_transfer`` and ``load_transfer`` on an unsharded model) records a few rows of
every transferred table and registers a forward pre-hook on the user's module. At the first forward the hook
removes itself and, only if the tables have been sharded by something other than ``shard_model``, compares
those rows and looks for frozen tables; any problem (agreed across ranks) raises one
:class:`~hybrid.adapters.config.TransferError` before the step runs.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from hybrid.adapters.config import TransferError
from hybrid.adapters.targets import TableSlot, _sharded_classes
from hybrid.core.tables import local_blocks
from hybrid.core.training import SHARDED_BY_SHARD_MODEL, gather_from_ranks

#: rows of each transferred table the guard remembers (spread over the table, padding row excluded)
SAMPLE_ROWS = 8


def arm(inner: nn.Module, slots: list[TableSlot], frozen: set[str]) -> None:
    """Remember ``slots``' current values (a sample of rows) and check them at ``inner``'s first forward.

    Args:
        inner: the user's (unsharded) module.
        slots: the transferred tables (unsharded slots; sharded ones are skipped: nothing can shard them again).
        frozen: state-dict keys of the frozen ones.
    """
    disarm(inner)
    samples = {}
    for slot in slots:
        if slot.sharded or slot.is_meta:
            continue
        weight = slot.weight().detach()
        rows = weight.shape[0]
        idx = torch.linspace(min(1, rows - 1), rows - 1, min(SAMPLE_ROWS, rows)).round().long().unique()
        samples[slot.key] = (slot.name, slot.path, idx, weight[idx].clone())
    if samples:
        hook = functools.partial(_check, samples=samples, frozen=frozen & set(samples))
        hook.hybrid_transfer_guard = True  # type: ignore[attr-defined]
        inner.register_forward_pre_hook(hook)


def disarm(inner: nn.Module) -> None:
    """Remove the guard's hook from ``inner`` (a no-op when there is none)."""
    for key, hook in list(inner._forward_pre_hooks.items()):
        if getattr(hook, "hybrid_transfer_guard", False):
            del inner._forward_pre_hooks[key]


def _check(module: nn.Module, args, *, samples, frozen) -> None:
    disarm(module)
    if getattr(module, SHARDED_BY_SHARD_MODEL, False):
        return
    modules = dict(module.named_modules())
    sharded_types = _sharded_classes()
    sharded = {key for key, (_, path, _, _) in samples.items() if isinstance(modules.get(path), sharded_types)}
    if not sharded:
        return   # still unsharded: nothing has undone anything
    state = module.state_dict()
    problems = []
    for key in sorted(sharded):
        name, _, idx, want = samples[key]
        if _differs(state[key], idx, want):
            problems.append(f"{name} no longer holds the transferred values (re-initialised)")
        elif key in frozen:
            problems.append(f"{name} is frozen but gets DMP's default fused optimizer (it would train)")
    # each rank sees only its shards: all ranks raise alike, or none does
    problems = list(dict.fromkeys(p for rank in gather_from_ranks(problems) for p in rank))
    if problems:
        raise TransferError("this transferred model was sharded by a plain DistributedModelParallel, which undoes "
                            f"the transfer: {'; '.join(problems)}. Shard it with hybrid.adapters.shard_model "
                            "(after apply_transfer and the optimizers)")


def _differs(table: torch.Tensor, idx: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether any of rows ``idx`` this rank holds differs from ``want`` (the full rows)."""
    for block, (r0, c0) in local_blocks(table):
        inside = (idx >= r0) & (idx < r0 + block.shape[0])
        if inside.any():
            got = block.detach()[idx[inside] - r0]
            if not torch.equal(got, want[inside][:, c0:c0 + block.shape[1]]):
                return True
    return False

