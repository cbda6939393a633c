"""The two batch types every model in this package consumes.

Sparse and sequence features travel as one :class:`torchrec.KeyedJaggedTensor` (no padding on the sparse
side); dense values travel as plain tensors. ``hybrid.data.batching`` builds both from prepared samples —
the same converter serves training, evaluation and inference.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class SequenceBatch:
    """A batch of behaviour sequences for generative pretraining.

    Args:
        features: keys such as ``item_id``, ``category``, ``action``; every key has the same lengths
            (one value per event), events in chronological order, the most recent last.
        timestamps: ``[sum(lengths)]`` int64 unix seconds aligned with ``features.values()`` of each key.
        lengths: ``[B]`` int64, events per sequence (equal to each key's lengths).
        num_eval_targets: for evaluation batches, how many trailing events of each sequence are
            held-out targets (``0`` for training batches: every next event is a target).

    Example:
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["item_id"], values=torch.tensor([5, 7, 9]), lengths=torch.tensor([2, 1]))
        >>> b = SequenceBatch(kjt, torch.tensor([10, 20, 15]), torch.tensor([2, 1]))
        >>> b.batch_size
        2
    """

    features: KeyedJaggedTensor
    timestamps: torch.Tensor
    lengths: torch.Tensor
    num_eval_targets: int = 0

    @property
    def batch_size(self) -> int:
        return int(self.lengths.numel())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SequenceBatch":
        return _to(self, device, non_blocking)

    def pin_memory(self) -> "SequenceBatch":
        return _pin(self)


@dataclass
class CTRBatch:
    """A batch of CTR samples: the candidate, its context and the history before it.

    Args:
        sparse: one KJT holding (a) single-valued categorical fields (``user_id``, ``gender``, ``item_id``,
            ``category``, ``year`` ...; length 1 per sample), (b) multi-valued fields (``genres``; jagged)
            and (c) history sequences prefixed ``hist_`` (``hist_item_id``, ``hist_category``,
            ``hist_action``; jagged, chronological, most recent last, all with the same lengths).
        dense: ``[B, D]`` float32 dense features (``D`` may be 0).
        labels: ``[B, T]`` float32 targets, one column per task (``task_names``).
        timestamps: ``[B]`` int64 time of the candidate event.
        hist_timestamps: ``[sum(hist lengths)]`` int64 aligned with the ``hist_*`` values.
        user_index: ``[B]`` int64 one id per raw user (the prepared data's user row, which users unknown to the
            feature map keep too), for per-user metrics (gAUC).
        task_names: names of the label columns, e.g. ``("click",)`` or ``("click", "rating5")``.

    Example:
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["item_id", "hist_item_id"], values=torch.tensor([3, 5, 7, 4]),
        ...     lengths=torch.tensor([1, 1, 2, 0]))
        >>> b = CTRBatch(kjt, torch.zeros(2, 0), torch.tensor([[1.0], [0.0]]),
        ...              torch.tensor([30, 40]), torch.tensor([10, 20]), torch.tensor([2, 3]))
        >>> b.batch_size
        2
    """

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    labels: torch.Tensor
    timestamps: torch.Tensor
    hist_timestamps: torch.Tensor
    user_index: torch.Tensor
    task_names: tuple[str, ...] = ("click",)

    @property
    def batch_size(self) -> int:
        return int(self.user_index.numel())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "CTRBatch":
        return _to(self, device, non_blocking)

    def pin_memory(self) -> "CTRBatch":
        return _pin(self)


def _to(batch, device, non_blocking):
    moved = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, (torch.Tensor, KeyedJaggedTensor)):
            value = value.to(device=device, non_blocking=non_blocking)
        moved[f.name] = value
    return replace(batch, **moved)


def _pin(batch):
    pinned = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, (torch.Tensor, KeyedJaggedTensor)):
            value = value.pin_memory()
        pinned[f.name] = value
    return replace(batch, **pinned)
