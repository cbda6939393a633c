"""Training precision and batch placement: one place for both trainers, their evaluations and the benchmarks.

``train.precision`` (:data:`PRECISIONS`):

- ``fp32`` (default): nothing changes — :func:`autocast` is a no-op, results are bit-identical to a run
  without it.
- ``bf16``: the forward pass (and the loss) runs under ``torch.autocast(device.type, torch.bfloat16)``, so
  the matmul-like ops of the dense part — the backbone's projections, attention (SDPA) and SwiGLU, the
  DCN-v2 cross/deep layers, MoE experts and gates, TIN's attention and MLPs, the heads — take bfloat16
  inputs. What stays fp32:

  * every parameter (the dense optimizer's master weights), its gradient and the AdamW states: autocast
    casts *copies* of the weights for each op and its backward returns fp32 gradients;
  * the embedding tables, their rows and their optimizer states (TorchRec's in-backward optimizer, FBGEMM's
    fused kernels when sharded): lookups are not on autocast's lists and the tables are built fp32;
  * the losses: ``cross_entropy`` and ``binary_cross_entropy_with_logits`` are on autocast's fp32 lists
    (CPU and CUDA), the sampled softmax's ``logsumexp`` gets fp32 logits (the positive logit is a product
    with an fp32 table row, and ``cat`` promotes), and the CTR trainer casts the logits to fp32 itself;
  * the retrieval ranking of the pretraining evaluation (HR/NDCG over the full catalogue): bf16 scores tie
    thousands of items, and ties count against the target.

  No gradient scaler: bfloat16 has float32's exponent range.

Batches: :func:`to_device` moves a batch with ``non_blocking=True`` on CUDA (the loader pins its memory:
``make_loader(..., pin_memory=pin_memory(device))``); on CPU it is the plain ``.to(device)``.

Example:
    >>> check_precision("bf16")
    'bf16'
    >>> with autocast("bf16", torch.device("cpu")):
    ...     y = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
    >>> y.dtype, pin_memory(torch.device("cpu"))
    (torch.bfloat16, False)
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal, TypeVar

import torch

Precision = Literal["fp32", "bf16"]
#: the values of ``train.precision``
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")

B = TypeVar("B")


def check_precision(value: object, key: str = "train.precision") -> str:
    """``value`` if it is one of :data:`PRECISIONS`, else a ``ValueError`` naming ``key``."""
    if not isinstance(value, str) or value not in PRECISIONS:
        raise ValueError(f"{key} must be one of {', '.join(PRECISIONS)}, got {value!r} "
                         "(bf16: autocast of the dense part; tables, optimizer states and losses stay fp32)")
    return value


@contextlib.contextmanager
def autocast(precision: str, device: torch.device | str) -> Iterator[None]:
    """The region of a forward pass (and its loss) in ``precision`` on ``device``; ``fp32``: no-op.

    Call ``backward()`` outside it (autocast's advice): the backward ops run in the forward ops' dtypes anyway.
    """
    check_precision(precision)
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        yield


def pin_memory(device: torch.device | str) -> bool:
    """Whether a loader feeding ``device`` should pin its batches (CUDA: page-locked host memory lets the
    host-to-device copy run asynchronously)."""
    return torch.device(device).type == "cuda"


def to_device(batch: B, device: torch.device | str) -> B:
    """``batch.to(device)``, non-blocking on CUDA (from pinned memory the copy overlaps the host's work)."""
    return batch.to(device, non_blocking=pin_memory(device))  # type: ignore[attr-defined]
