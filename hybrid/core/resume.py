"""Exact resumption of a training run: what a checkpoint holds beside the weights, and how it is restored.

One place for both trainers (``hybrid.pretrain.trainer`` and ``hybrid.ctr_models.trainer``): the checkpoint state
(:func:`training_state`: weights, dense optimizer and schedule, the tables' in-backward optimizer states, per-rank
RNG states), its restoration into live objects (:func:`restore_training_state`), the refusal of a checkpoint this
run cannot continue (:func:`check_resumable`), and the batches of an epoch from a position
(:func:`epoch_batches`), so that a resumed run takes the same steps as an uninterrupted one.

Example:
    >>> state = training_state(model, optimizer, schedule)           # doctest: +SKIP
    >>> save_checkpoint(root, step, state, manifest)                  # doctest: +SKIP
    >>> step, metrics = restore_training_state(path, model, optimizer, schedule)   # doctest: +SKIP
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from hybrid.core.checkpoint import CheckpointError, load_checkpoint, read_manifest
from hybrid.core.training import is_dmp

#: The model's state dict inside a checkpoint's state.
MODEL_KEY = "model"


def rng_state(negatives: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """This rank's RNG states: torch's global RNG (dropout), and ``negatives`` when given."""
    state = {"torch": torch.get_rng_state()}
    if negatives is not None:
        state["negatives"] = negatives.get_state()
    return state


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Any,
                   negatives: torch.Generator | None = None, rank: int = 0) -> dict[str, Any]:
    """What a checkpoint holds (tensors are live views: DCP loads into them in place).

    Keys: ``model`` (state dict; ``ShardedTensor`` tables under DMP), ``dense_optim``, ``schedule``,
    ``sparse_optim`` (:func:`sparse_optimizer_state`) and ``rng_rank{rank}`` — per-rank RNG states under
    per-rank keys, since DCP keeps one copy of a replicated key (torch's global RNG, and the generator of
    the pretraining negatives when there is one).
    """
    return {
        MODEL_KEY: model.state_dict(),
        "dense_optim": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "sparse_optim": sparse_optimizer_state(model),
        f"rng_rank{rank}": rng_state(negatives),
    }


def sparse_optimizer_state(model: nn.Module) -> dict[str, Any]:
    """State of the tables' optimizer.

    Sharded: ``dmp.fused_optimizer.state_dict()`` (``ShardedTensor`` per table, e.g. ``t_item_id.momentum1``).
    Unsharded: torch's ``_apply_optimizer_in_backward`` keeps one ``torch.optim`` instance per parameter
    in ``param._in_backward_optimizers``; their state dicts, keyed by parameter name.
    """
    if is_dmp(model):
        return model.fused_optimizer.state_dict()
    return {name: _single_in_backward_optimizer(name, p).state_dict()
            for name, p in model.named_parameters() if hasattr(p, "_in_backward_optimizers")}


def load_sparse_optimizer_state(model: nn.Module, state: Mapping[str, Any]) -> None:
    """Inverse of :func:`sparse_optimizer_state`."""
    if is_dmp(model):
        model.fused_optimizer.load_state_dict(state)
        return
    for name, p in model.named_parameters():
        if hasattr(p, "_in_backward_optimizers"):
            _single_in_backward_optimizer(name, p).load_state_dict(state[name])


def _single_in_backward_optimizer(name: str, param: nn.Parameter) -> torch.optim.Optimizer:
    optimizers = param._in_backward_optimizers  # type: ignore[attr-defined]
    if len(optimizers) != 1:
        raise ValueError(f"parameter {name!r} has {len(optimizers)} in-backward optimizers; expected one")
    return optimizers[0]


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the lazily-built state of ``optimizer`` (Adam's moments appear at its first step).

    DCP loads into existing tensors, so a fresh optimizer needs its state before a checkpoint can fill it.
    As ``torch.distributed.checkpoint.state_dict`` does: one step with zero gradients and ``lr = 0``, which
    leaves the parameters unchanged (AdamW's decay multiplies by ``1 - 0·wd``); the loaded state then
    replaces the moments and step counts.
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p not in optimizer.state]
    if not params:
        return
    saved_lr = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p in params:
        p.grad = None
    for group, lr in zip(optimizer.param_groups, saved_lr):
        group["lr"] = lr


def check_resumable(path: Path, saved: Mapping[str, Any], current: Mapping[str, Any], config_key: str = "model") -> None:
    """Refuse a checkpoint that this run cannot continue exactly; the message names what differs.

    Compares the table shapes, the model config (manifest key ``config_key``: ``model`` for pretraining,
    ``ranker_config`` for fine-tuning), the world size and the steps per epoch (batch size or data changed)
    of the checkpoint's manifest (``saved``) with this run's (``current``).
    """
    problems = []
    current = json.loads(json.dumps(current, default=str))  # compare as the manifest stores it (JSON)
    saved_tables, tables = saved.get("tables", {}), current["tables"]
    for name in sorted(set(saved_tables) | set(tables)):
        a, b = saved_tables.get(name), tables.get(name)
        if a != b:
            problems.append(f"table {name}: checkpoint {_shape(a)} vs model {_shape(b)}")
    saved_model, model = saved.get(config_key, {}), current[config_key]  # the model config
    differing = sorted(k for k in set(saved_model) | set(model) if saved_model.get(k) != model.get(k))
    if differing and not problems:
        problems.append("model config differs in " + ", ".join(
            f"{k} (checkpoint {saved_model.get(k)!r} vs now {model.get(k)!r})" for k in differing))
    for key, what in (("world_size", "processes"), ("steps_per_epoch", "steps per epoch (batch size or data changed)")):
        if saved.get(key) != current[key]:
            problems.append(f"{what}: checkpoint {saved.get(key)} vs now {current[key]}")
    if problems:
        raise CheckpointError(f"{path}: cannot resume this run from it: " + "; ".join(problems))


def _shape(shape: list[int] | None) -> str:
    return "missing" if shape is None else "x".join(map(str, shape))


def restore_training_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Any,
                           negatives: torch.Generator | None = None, *, rank: int = 0) -> tuple[int, dict[str, float]]:
    """Load a checkpoint written by :func:`train` into live objects, in place.

    Fills the model (resharding as needed), the dense optimizer and schedule, the tables' optimizer and
    this rank's RNG states (torch's global RNG, and ``negatives`` when given).

    Returns:
        ``(step, metrics)`` from the manifest.
    """
    path = Path(path)
    saved = read_manifest(path)
    # DCP fills existing tensors, so lazily-built optimizer state (Adam moments) must exist first
    init_optimizer_state(optimizer)
    if not is_dmp(model):
        for name, p in model.named_parameters():
            if hasattr(p, "_in_backward_optimizers"):
                init_optimizer_state(_single_in_backward_optimizer(name, p))
    state = training_state(model, optimizer, schedule, negatives, rank)
    load_checkpoint(path, state)
    model.load_state_dict(state[MODEL_KEY])  # a no-op copy for plain tensors; re-applies sharded ones
    optimizer.load_state_dict(state["dense_optim"])
    schedule.load_state_dict(state["schedule"])
    load_sparse_optimizer_state(model, state["sparse_optim"])
    rng = state[f"rng_rank{rank}"]
    if negatives is not None:
        negatives.set_state(rng["negatives"])
    torch.set_rng_state(rng["torch"])
    return int(saved["step"]), dict(saved.get("metrics", {}))


def epoch_batches(loader: DataLoader, epoch: int, skip: int) -> Iterable[Any]:
    """The batches of ``epoch`` (order fixed by seed and epoch), without the first ``skip``.

    Skipping happens on the sampler's index lists, so skipped batches are never gathered.
    """
    sampler = loader.batch_sampler
    if not hasattr(sampler, "set_epoch"):
        raise TypeError("train_loader.batch_sampler needs set_epoch(epoch) (use hybrid.data.batching.make_loader)")
    sampler.set_epoch(epoch)
    if skip == 0:
        return loader
    return DataLoader(loader.dataset, batch_sampler=_SkipFirst(sampler, skip), collate_fn=loader.collate_fn,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory)


def rng_neutral_iter(batches: Iterable[Any]) -> Iterator[Any]:
    """``iter(batches)`` that leaves torch's global RNG as it was.

    Creating a DataLoader iterator draws a base seed from the global RNG. A resumed run creates one
    iterator more than an uninterrupted one (mid-epoch), which would shift every later dropout mask.
    """
    state = torch.get_rng_state()
    iterator = iter(batches)
    torch.set_rng_state(state)
    return iterator


class _SkipFirst:
    """A batch sampler without its first ``skip`` batches."""

    def __init__(self, batch_sampler: Iterable[list[int]], skip: int) -> None:
        self.batch_sampler, self.skip = batch_sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.batch_sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)  # type: ignore[arg-type]
