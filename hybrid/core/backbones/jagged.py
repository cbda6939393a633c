"""Jagged ↔ padded conversions: fbgemm fast path plus a plain-PyTorch reference.

Sequences arrive jagged (``KeyedJaggedTensor`` values, one row per event); the backbones work on
right-padded ``[B, T, D]`` tensors. The padding cost is bounded by length bucketing in the data loader, so
padding per batch to that batch's longest sequence is cheap. The fbgemm ops
(``jagged_to_padded_dense`` / ``dense_to_jagged``) exist on CPU and CUDA and have autograd; the reference
implementations beside them define the semantics and are what the tests compare against.
"""
from __future__ import annotations

import math

import torch

from hybrid.core.backbones.common import lengths_to_mask

try:  # fbgemm_gpu registers torch.ops.fbgemm.* on import (CPU and CUDA builds ship the same module).
    import fbgemm_gpu  # noqa: F401

    _HAS_FBGEMM = hasattr(torch.ops.fbgemm, "jagged_to_padded_dense")
except Exception:  # pragma: no cover - the stack pins fbgemm; this only keeps hybrid.core importable
    _HAS_FBGEMM = False

# dtypes the fbgemm CPU/CUDA kernels are registered for (float64 is not).
_FBGEMM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64)


def lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """``[B]`` lengths → ``[B + 1]`` int64 offsets (exclusive cumsum with a leading 0)."""
    lengths = lengths.to(torch.int64)
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, dim=0)])


def _use_fbgemm(t: torch.Tensor) -> bool:
    return _HAS_FBGEMM and t.dtype in _FBGEMM_DTYPES and t.device.type in ("cpu", "cuda")


def _max_len(lengths: torch.Tensor, max_len: int | None) -> int:
    if max_len is not None:
        return int(max_len)
    # one host sync; callers that know the bound (e.g. config.max_len) can pass it
    return int(lengths.max().item()) if lengths.numel() else 0


def jagged_to_padded(
    values: torch.Tensor,
    lengths: torch.Tensor,
    max_len: int | None = None,
    padding_value: float = 0.0,
) -> torch.Tensor:
    """Jagged rows → right-padded dense.

    Args:
        values: ``[N, ...]`` rows of all sequences concatenated (``N = lengths.sum()``); 1-D values
            (e.g. ids, timestamps) are allowed.
        lengths: ``[B]`` rows per sequence.
        max_len: padded length ``T`` (default: ``lengths.max()``). Longer sequences keep their first
            ``T`` rows (truncation to the *most recent* events is the data pipeline's job).
        padding_value: fill of the padded positions.

    Returns:
        ``[B, T, ...]``.

    Example:
        >>> jagged_to_padded(torch.tensor([5, 6, 7]), torch.tensor([2, 1]))
        tensor([[5, 6],
                [7, 0]])
    """
    t = _max_len(lengths, max_len)
    if not _use_fbgemm(values):
        return jagged_to_padded_reference(values, lengths, t, padding_value)
    offsets = lengths_to_offsets(lengths).to(values.device)
    flat = values.reshape(values.size(0), math.prod(values.shape[1:]))  # not -1: N may be 0
    padded = torch.ops.fbgemm.jagged_to_padded_dense(flat, [offsets], [t], padding_value)
    return padded.reshape(lengths.numel(), t, *values.shape[1:])


def padded_to_jagged(padded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Right-padded dense → jagged rows (inverse of :func:`jagged_to_padded`).

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


def jagged_to_padded_reference(
    values: torch.Tensor, lengths: torch.Tensor, max_len: int | None = None, padding_value: float = 0.0
) -> torch.Tensor:
    """Plain-PyTorch :func:`jagged_to_padded` (the semantics the fast path must match)."""
    t = _max_len(lengths, max_len)
    lengths = lengths.to(device=values.device, dtype=torch.int64)
    b = lengths.numel()
    out = values.new_full((b, t, *values.shape[1:]), padding_value)
    offsets = lengths_to_offsets(lengths)
    # position of each row inside its sequence, and which sequence it belongs to
    seq = torch.repeat_interleave(torch.arange(b, device=values.device), lengths)
    pos = torch.arange(values.size(0), device=values.device) - offsets[:-1][seq]
    keep = pos < t
    # index_put (not in-place on a leaf) keeps autograd for float values
    return out.index_put((seq[keep], pos[keep]), values[keep])


def padded_to_jagged_reference(padded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch :func:`padded_to_jagged`."""
    mask = lengths_to_mask(lengths.to(padded.device), padded.size(1))
    return padded[mask]
