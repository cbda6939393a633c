"""Embedding-table helpers shared by the trainers' sharding and the transfer adapters.

A table's values live in one of three places: an unsharded ``nn.Embedding`` / ``nn.EmbeddingBag`` weight
(inside a TorchRec collection or not), a ``ShardedTensor`` of a ``DistributedModelParallel`` model (each rank
holds some row/column blocks), or a replicated plain tensor (a ``data_parallel`` table under DMP).
:func:`copy_full_into` writes a full ``[rows, dim]`` tensor into any of them, each rank taking its blocks.

Example:
    >>> table = torch.nn.Embedding(4, 2).weight          # or a ShardedTensor of dmp.state_dict()
    >>> with torch.no_grad():
    ...     copy_full_into(table, torch.ones(4, 2), rows=torch.tensor([True, False, True, False]))
    >>> table[:, 0].tolist()[::2], global_shape(table)
    ([1.0, 1.0], (4, 2))
"""
from __future__ import annotations

import torch
from torch import nn

_TABLE_KEY_PARTS = (".embeddings.", ".embedding_bags.")


def is_table_key(key: str) -> bool:
    """True for the state-dict key of an EmbeddingCollection / EmbeddingBagCollection table weight."""
    return key.endswith(".weight") and any(part in f".{key}" for part in _TABLE_KEY_PARTS)


def embedding_modules(model: nn.Module) -> list[nn.Module]:
    """Every unsharded TorchRec table collection (``EmbeddingCollection`` / ``EmbeddingBagCollection``) in
    ``model``, in module order: their parameters are the tables (e.g. one collection per expert in the
    multi-embedding MoE). A ``DistributedModelParallel`` has none left (its tables are sharded modules)."""
    return [module for _, module in _named_embedding_modules(model)]


def table_parameters(model: nn.Module) -> list[tuple[str, str, nn.Parameter]]:
    """``(module path, table name, weight)`` of every unsharded TorchRec table collection in ``model``."""
    from torchrec import EmbeddingCollection

    out = []
    for path, module in _named_embedding_modules(model):
        if isinstance(module, EmbeddingCollection):
            out += [(path, name, emb.weight) for name, emb in module.embeddings.items()]
        else:
            out += [(path, name, bag.weight) for name, bag in module.embedding_bags.items()]
    return out


def _named_embedding_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from torchrec import EmbeddingBagCollection, EmbeddingCollection

    return [(path, module) for path, module in model.named_modules()
            if isinstance(module, (EmbeddingCollection, EmbeddingBagCollection))]


def local_blocks(target: torch.Tensor) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """``(local tensor, (row offset, column offset))`` of every block of ``target`` this rank holds.

    A plain tensor is one block at ``(0, 0)``; a ``ShardedTensor`` gives its local shards (possibly none).
    The tensors are live storage: writing into them changes the table.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(target, ShardedTensor):
        return [(shard.tensor, (int(shard.metadata.shard_offsets[0]), int(shard.metadata.shard_offsets[1])))
                for shard in target.local_shards()]
    if type(target).__name__ == "DTensor":
        raise TypeError("DTensor table states are not supported; shard with ShardedTensor outputs (TorchRec's default)")
    return [(target, (0, 0))]


def global_shape(target: torch.Tensor) -> tuple[int, ...]:
    """The full shape of a table, sharded or not."""
    return tuple(target.size())


@torch.no_grad()
def copy_full_into(target: torch.Tensor, full: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Write ``full`` (the whole ``[rows, dim]`` table) into ``target``'s local blocks, in place.

    Args:
        target: a table weight, a ``ShardedTensor`` from a DMP ``state_dict()``, or a replicated tensor.
        full: ``[R, D]`` values of the whole table, on any device (every rank passes the same values).
        rows: optional bool ``[R]``: write only these rows (the others keep their values).
    """
    if global_shape(target) != tuple(full.shape):
        raise ValueError(f"table of shape {global_shape(target)} cannot take values of shape {tuple(full.shape)}")
    for block, (r0, c0) in local_blocks(target):
        if block.numel() == 0:
            continue
        src = full[r0:r0 + block.shape[0], c0:c0 + block.shape[1]].to(device=block.device, dtype=block.dtype)
        if rows is None:
            block.copy_(src)
        else:
            keep = rows[r0:r0 + block.shape[0]].to(block.device)
            block[keep] = src[keep]
