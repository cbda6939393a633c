"""Jagged ↔ padded conversions, one home for pretraining, the backbones and the CTR rankers.

Sequences arrive jagged (``KeyedJaggedTensor`` values: rows of all sequences concatenated, chronological
within a sequence); the models work on right-padded ``[B, T, ...]`` tensors. :func:`jagged_to_padded` is the
one conversion, with an explicit ``keep``:

* ``keep="first"`` — a sequence longer than ``T`` keeps its first ``T`` rows (pretraining windows are cut to
  the most recent events by the data pipeline already, so nothing is dropped there);
* ``keep="recent"`` — it keeps its most recent ``T`` rows (the CTR history: the newest behaviour matters).

Each has a fast path (fbgemm's ``jagged_to_padded_dense``, CPU and CUDA, with autograd) and the plain-PyTorch
reference beside it (:func:`jagged_to_padded_reference`, an index gather without host syncs) that defines
the semantics; the tests check that both give the same values and gradients.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

try:  # fbgemm_gpu registers torch.ops.fbgemm.* on import (CPU and CUDA builds ship the same module).
    import fbgemm_gpu  # noqa: F401

    _HAS_FBGEMM = hasattr(torch.ops.fbgemm, "jagged_to_padded_dense")
except Exception:  # pragma: no cover - the stack pins fbgemm; this only keeps hybrid.core importable
    _HAS_FBGEMM = False

# dtypes the fbgemm CPU/CUDA kernels are registered for (float64 is not).
_FBGEMM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64)

Keep = Literal["first", "recent"]
KEEPS: tuple[str, ...] = ("first", "recent")
#: ``impl`` of :func:`jagged_to_padded`: ``"fbgemm"`` (fast path) or ``"gather"`` (the reference).
PAD_IMPLS: tuple[str, ...] = ("gather", "fbgemm")


def lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """``[B]`` lengths → ``[B + 1]`` int64 offsets (exclusive cumsum with a leading 0).

    Example:
        >>> lengths_to_offsets(torch.tensor([2, 0, 3]))
        tensor([0, 2, 2, 5])
    """
    lengths = lengths.to(torch.int64)
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, dim=0)])


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[B]`` lengths → ``[B, max_len]`` bool mask, True at valid (right-padded) positions.

    A length above ``max_len`` gives a full row: it is also the mask of ``jagged_to_padded(..., max_len)``.

    Example:
        >>> lengths_to_mask(torch.tensor([2, 0, 5]), 3)
        tensor([[ True,  True, False],
                [False, False, False],
                [ True,  True,  True]])
    """
    positions = torch.arange(max_len, device=lengths.device)
    return positions.unsqueeze(0) < lengths.to(positions.dtype).unsqueeze(1)


def _check(keep: str, impl: str) -> None:
    if keep not in KEEPS:
        raise ValueError(f"jagged_to_padded: keep must be one of {list(KEEPS)}, got {keep!r}")
    if impl not in PAD_IMPLS:
        raise ValueError(f"jagged_to_padded: impl must be one of {list(PAD_IMPLS)}, got {impl!r}")


def _max_len(lengths: torch.Tensor, max_len: int | None) -> int:
    if max_len is not None:
        return int(max_len)
    # one host sync; callers that know the bound (e.g. config.max_len) pass it
    return int(lengths.max().item()) if lengths.numel() else 0


def _use_fbgemm(t: torch.Tensor) -> bool:
    return _HAS_FBGEMM and t.dtype in _FBGEMM_DTYPES and t.device.type in ("cpu", "cuda")


def jagged_to_padded(values: torch.Tensor, lengths: torch.Tensor, max_len: int | None = None, *,
                     keep: Keep, padding_value: float = 0.0, impl: str = "fbgemm") -> torch.Tensor:
    """Jagged rows → right-padded dense ``[B, T, ...]``.

    Args:
        values: ``[N, ...]`` rows of all sequences concatenated (``N = lengths.sum()``); 1-D values (ids,
            timestamps) are allowed.
        lengths: ``[B]`` rows per sequence.
        max_len: padded length ``T`` (default: ``lengths.max()``, one host sync).
        keep: which rows a sequence longer than ``T`` keeps: its ``"first"`` ``T`` or its most ``"recent"``
            ``T`` (the last ones). Required: every caller says which.
        padding_value: fill of the padded positions.
        impl: ``"fbgemm"`` (``torch.ops.fbgemm.jagged_to_padded_dense``; for ``keep="recent"`` over-long
            rows are first cut by a boolean selection, a host sync) or ``"gather"``
            (:func:`jagged_to_padded_reference`). Dtypes fbgemm has no kernel for (float64) use the reference.

    Returns:
        ``[B, T, ...]``; its valid positions are ``lengths_to_mask(lengths, T)``.

    Example:
        >>> v, lengths = torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([2, 0, 4])
        >>> jagged_to_padded(v, lengths, 3, keep="first")
        tensor([[1, 2, 0],
                [0, 0, 0],
                [3, 4, 5]])
        >>> jagged_to_padded(v, lengths, 3, keep="recent")
        tensor([[1, 2, 0],
                [0, 0, 0],
                [4, 5, 6]])
    """
    _check(keep, impl)
    t = _max_len(lengths, max_len)
    if impl == "gather" or not _use_fbgemm(values):
        return jagged_to_padded_reference(values, lengths, t, keep=keep, padding_value=padding_value)
    lengths = lengths.to(device=values.device, dtype=torch.int64)
    if keep == "recent" and values.shape[0] > 0 and bool((lengths > t).any()):
        # drop the oldest rows of over-long sequences: a row survives when its position from the end of its
        # sequence is < T; fbgemm then keeps the (now) first T rows
        row_end = lengths_to_offsets(lengths)[1:]
        row_of = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
        from_end = row_end[row_of] - 1 - torch.arange(values.shape[0], device=values.device)
        values, lengths = values[from_end < t], lengths.clamp(max=t)
    offsets = lengths_to_offsets(lengths)
    flat = values.reshape(values.size(0), math.prod(values.shape[1:]))  # not -1: N may be 0
    padded = torch.ops.fbgemm.jagged_to_padded_dense(flat, [offsets], [t], padding_value)
    return padded.reshape(lengths.numel(), t, *values.shape[1:])


def jagged_to_padded_reference(values: torch.Tensor, lengths: torch.Tensor, max_len: int | None = None, *,
                               keep: Keep, padding_value: float = 0.0) -> torch.Tensor:
    """Plain-PyTorch :func:`jagged_to_padded` (the semantics the fast path must match).

    One index gather with no host sync (given ``max_len``): position ``j`` of sequence ``b`` reads row
    ``start_b + j`` when ``j < min(len_b, T)``, else an appended padding row; ``start_b`` is the sequence's
    offset (``keep="first"``) or its offset plus ``len_b - min(len_b, T)`` (``keep="recent"``).
    """
    _check(keep, "gather")
    t = _max_len(lengths, max_len)
    lengths = lengths.to(device=values.device, dtype=torch.int64)
    kept = lengths.clamp(max=t)
    start = lengths_to_offsets(lengths)[:-1]
    if keep == "recent":
        start = start + (lengths - kept)
    positions = torch.arange(t, device=values.device)
    valid = positions.unsqueeze(0) < kept.unsqueeze(1)
    # index N is the appended padding row, so padded slots need no masking and N == 0 works
    flat = torch.cat([values, values.new_full((1, *values.shape[1:]), padding_value)])
    index = torch.where(valid, start.unsqueeze(1) + positions.unsqueeze(0),
                        torch.full_like(valid, values.shape[0], dtype=torch.int64))
    return flat[index]


def padded_to_jagged(padded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Right-padded dense → jagged rows (inverse of :func:`jagged_to_padded` when ``lengths <= T``).

    Args:
        padded: ``[B, T, ...]``; ``lengths`` must not exceed ``T``.
        lengths: ``[B]``.

    Returns:
        ``[lengths.sum(), ...]``, the valid rows in sequence order.

    Example:
        >>> padded_to_jagged(torch.tensor([[5, 6], [7, 0]]), torch.tensor([2, 1]))
        tensor([5, 6, 7])
    """
    if not _use_fbgemm(padded):
        return padded_to_jagged_reference(padded, lengths)
    b, t = padded.shape[:2]
    offsets = lengths_to_offsets(lengths).to(padded.device)
    flat = padded.reshape(b, t, math.prod(padded.shape[2:]))  # not -1: B or T may be 0
    values = torch.ops.fbgemm.dense_to_jagged(flat, [offsets])[0]
    return values.reshape(values.size(0), *padded.shape[2:])


def padded_to_jagged_reference(padded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch :func:`padded_to_jagged`."""
    return padded[lengths_to_mask(lengths.to(padded.device), padded.size(1))]
