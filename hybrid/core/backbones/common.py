"""Pieces shared by the LLaMA and HSTU backbones."""
from __future__ import annotations

import torch
from torch import nn

from hybrid.core.backbones.config import BackboneConfig


class NormalLinear(nn.Linear):
    """``nn.Linear`` whose :meth:`reset_parameters` draws weights from N(0, ``init_std``), biases zero.

    GPSD initialises every projection this way. Overriding ``reset_parameters`` (rather than initialising
    once in a model constructor) keeps the same init when a module built on the ``meta`` device is
    materialised with ``to_empty()`` + ``reset_parameters()``, which is what TorchRec's
    ``DistributedModelParallel`` does.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        init_std: std of the weight init.
        device, dtype: as ``nn.Linear``.

    Example:
        >>> lin = NormalLinear(8, 4, bias=False, init_std=0.02)
        >>> lin(torch.zeros(3, 8)).shape
        torch.Size([3, 4])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        init_std: float = 0.02,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        # set before nn.Linear.__init__, which calls reset_parameters()
        self.init_std = init_std
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Backbone(nn.Module):
    """Common interface of the sequence backbones.

    ``forward(x [B, T, D], lengths [B], timestamps [B, T] | None) -> [B, T, D]``. Inputs are right-padded
    (valid positions ``0 .. lengths[b] - 1``); outputs at padded positions are zero, and padding never
    changes an output at a valid position. Attention is causal: output ``t`` depends on inputs ``0..t``.
    Every parameter of a backbone is "dense" in GPSD's sense (blocks + final norm).
    """

    config: BackboneConfig

    def dense_parameter_count(self) -> int:
        """Parameters of the blocks + final norm (what GPSD's scaling law counts as dense)."""
        return sum(p.numel() for p in self.parameters())

    def reset_parameters(self) -> None:
        """Re-initialise every sub-module (as after construction)."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
