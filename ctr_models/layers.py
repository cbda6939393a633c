"""Small building blocks shared by the rankers: MLPs, per-task heads, masked reductions.

All modules here are plain ``torch.nn`` (no sparse parts), so they are replicated as-is under
``DistributedModelParallel``.
"""
from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """A stack of ``Linear → activation → dropout`` layers.

    Args:
        in_features: input width ``D_in``.
        hidden: output width of each layer; ``()`` makes the module the identity.
        activation: ``"relu"``, ``"gelu"``, ``"silu"``, ``"sigmoid"`` or ``"tanh"``.
        dropout: dropout after every activation (0 disables).
        last_activation: apply the activation (and dropout) after the last layer too. Set ``False`` when
            the MLP ends in logits.

    Shapes:
        ``[*, D_in] → [*, hidden[-1]]`` (``[*, D_in]`` when ``hidden`` is empty).

    Example:
        >>> mlp = MLP(16, (32, 8))
        >>> mlp(torch.randn(4, 16)).shape
        torch.Size([4, 8])
    """

    _ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}

    def __init__(self, in_features: int, hidden: tuple[int, ...], activation: str = "relu",
                 dropout: float = 0.0, last_activation: bool = True) -> None:
        super().__init__()
        if activation not in self._ACTIVATIONS:
            raise ValueError(f"MLP.activation: unknown value {activation!r}; expected one of "
                             f"{sorted(self._ACTIVATIONS)}")
        layers: list[nn.Module] = []
        width = in_features
        for i, h in enumerate(hidden):
            layers.append(nn.Linear(width, h))
            if last_activation or i < len(hidden) - 1:
                layers.append(self._ACTIVATIONS[activation]())
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
            width = h
        self.layers = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TaskHeads(nn.Module):
    """One small tower per task on a shared representation, returning one logit per task.

    Args:
        in_features: width of the shared representation.
        num_tasks: ``T``, the number of label columns.
        hidden: hidden sizes of each tower (``()`` gives one ``Linear(in_features, 1)`` per task).
        dropout: dropout inside the towers.

    Shapes:
        ``[B, in_features] → [B, T]``; or, with ``per_task_input=True`` in ``forward``,
        ``[B, T, in_features] → [B, T]`` (MMoE: each task has its own mixed input).

    Example:
        >>> heads = TaskHeads(8, 2, hidden=(4,))
        >>> heads(torch.randn(3, 8)).shape
        torch.Size([3, 2])
    """

    def __init__(self, in_features: int, num_tasks: int, hidden: tuple[int, ...] = (),
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.towers = nn.ModuleList()
        for _ in range(num_tasks):
            mlp = MLP(in_features, hidden, dropout=dropout)
            self.towers.append(nn.Sequential(mlp, nn.Linear(mlp.out_features, 1)))

    def forward(self, x: torch.Tensor, per_task_input: bool = False) -> torch.Tensor:
        if per_task_input:
            return torch.cat([tower(x[:, t]) for t, tower in enumerate(self.towers)], dim=1)
        return torch.cat([tower(x) for tower in self.towers], dim=1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x [B, T, D]`` over the valid positions of ``mask [B, T]`` (bool); zeros where none is valid.

    Example:
        >>> masked_mean(torch.ones(1, 3, 2), torch.tensor([[True, True, False]]))
        tensor([[1., 1.]])
    """
    m = mask.to(x.dtype).unsqueeze(-1)
    # clamp(min=1): an empty history gives 0/1 = 0 instead of NaN.
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax of ``scores`` over ``dim`` restricted to ``mask``; rows with no valid entry give all zeros.

    A plain ``masked_fill(-inf)`` + softmax returns NaN for an all-masked row (a user with no history),
    and the NaN then poisons the whole batch's gradient; this guards that case.

    Example:
        >>> masked_softmax(torch.zeros(2, 2), torch.tensor([[True, False], [False, False]]))
        tensor([[1., 0.],
                [0., 0.]])
    """
    filled = scores.masked_fill(~mask, float("-inf"))
    any_valid = mask.any(dim=dim, keepdim=True)
    # For all-masked rows, softmax over zeros instead of -inf, then zero the result.
    filled = torch.where(any_valid, filled, torch.zeros_like(filled))
    return torch.softmax(filled, dim=dim) * any_valid.to(scores.dtype)
