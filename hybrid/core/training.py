"""Training plumbing shared by the pretraining and the CTR trainers (one place for each concept).

- :class:`OptimConfig`: dense AdamW + warm-up/cosine schedule + clipping, and the optimizer of the
  embedding tables, which TorchRec applies *inside the backward pass* (fused into the FBGEMM kernels when
  sharded). On CPU, FBGEMM's fused kernels support ``adagrad``, ``rowwise_adagrad`` and ``sgd``; ``adam``
  for tables works unsharded (and sharded on CUDA).
- :func:`apply_sparse_optimizer` / :func:`dense_parameters`: split parameters between the two optimizers.
- :func:`init_distributed` / :func:`shard_model`: ``torchrun`` environment → process group (gloo on CPU,
  nccl on CUDA) → ``DistributedModelParallel`` with a planner (row-wise for large tables).
- :func:`unwrap_dmp` / :func:`average_dense_gradients`: the trainers call the module inside DMP and
  average its dense gradients themselves; :func:`eval_rounds` spreads evaluation batches over the ranks.
- :func:`seed_everything`, :func:`warmup_cosine`.
- :class:`StopSignals`: SIGTERM / SIGINT end a training run at a step boundary, with a checkpoint there.

Example:
    >>> from torchrec import EmbeddingCollection, EmbeddingConfig
    >>> tables = EmbeddingCollection([EmbeddingConfig(name="t_item_id", embedding_dim=4, num_embeddings=10,
    ...                                               feature_names=["item_id"])])
    >>> model = torch.nn.ModuleDict({"tables": tables, "head": torch.nn.Linear(4, 1)})
    >>> cfg = OptimConfig(lr=1e-3, warmup_steps=100)
    >>> len(apply_sparse_optimizer([tables], cfg))      # before sharding: the tables step in backward
    1
    >>> [p.shape for p in dense_parameters(model)]      # what the dense AdamW steps
    [torch.Size([1, 4]), torch.Size([1])]
    >>> dense = torch.optim.AdamW(dense_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay)
    >>> schedule = torch.optim.lr_scheduler.LambdaLR(dense, warmup_cosine(100, total_steps=1000, min_ratio=0.1))
"""
from __future__ import annotations

import datetime
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
import torch
from torch import nn

SparseOptimizer = Literal["adagrad", "rowwise_adagrad", "sgd", "adam"]
T = TypeVar("T")

#: TorchRec sharding constraints of a sharded run (both trainers): the item table is the large one, split by
#: rows.
DEFAULT_SHARDING = {"t_item_id": "row_wise"}


@dataclass
class OptimConfig:
    """Optimizers and schedule.

    Args:
        lr: peak learning rate of the dense (non-embedding) parameters (AdamW).
        weight_decay: AdamW weight decay of dense parameters.
        betas: AdamW betas.
        warmup_steps: linear warm-up steps.
        schedule: ``cosine`` decays to ``min_lr_ratio * lr`` at the last step; ``constant`` stays at ``lr``.
        min_lr_ratio: floor of the cosine schedule, as a fraction of ``lr``.
        grad_clip: max global norm of dense gradients (``None``: no clipping). Table gradients are applied
            inside the backward pass and are not clipped.
        sparse_optimizer: optimizer of the embedding tables.
        sparse_lr: its learning rate (``None``: same as ``lr``).
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    sparse_optimizer: SparseOptimizer = "adagrad"
    sparse_lr: float | None = None

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.1,
                  schedule: str = "cosine") -> Callable[[int], float]:
    """LR multiplier for ``LambdaLR``: linear warm-up to 1, then cosine to ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _sparse_optimizer_class(name: str):
    if name == "adagrad":
        return torch.optim.Adagrad, {}
    if name == "rowwise_adagrad":
        from torchrec.optim import RowWiseAdagrad

        return RowWiseAdagrad, {}
    if name == "sgd":
        return torch.optim.SGD, {}
    if name == "adam":
        return torch.optim.Adam, {}
    raise ValueError(f"unknown sparse optimizer {name!r} (expected adagrad, rowwise_adagrad, sgd or adam)")


def apply_sparse_optimizer(tables: Iterable[nn.Module], cfg: OptimConfig) -> list[nn.Parameter]:
    """Give every *trainable* parameter of ``tables`` an in-backward optimizer (TorchRec's fused path).

    Call it before :func:`shard_model`: ``DistributedModelParallel`` reads these settings and fuses the
    update into the sharded kernels. Frozen parameters (``requires_grad=False``) get none. Returns the
    parameters that got one.
    """
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    params = [p for module in tables for p in module.parameters() if p.requires_grad]
    if params:
        cls, extra = _sparse_optimizer_class(cfg.sparse_optimizer)
        apply_optimizer_in_backward(cls, params, {"lr": cfg.sparse_lr or cfg.lr, **extra})
    return params


def check_sharded_sparse_optimizer(cfg: OptimConfig, ctx: DistributedContext) -> None:
    """Sharded tables on CPU run FBGEMM's CPU kernels, which take adagrad, rowwise_adagrad or sgd, not adam.

    Raises:
        ValueError: ``cfg.sparse_optimizer`` is adam and ``ctx`` is a CPU process.
    """
    if ctx.device.type == "cpu" and cfg.sparse_optimizer == "adam":
        raise ValueError("sharded tables on CPU: FBGEMM's CPU kernels take train.optim.sparse_optimizer adagrad, "
                         "rowwise_adagrad or sgd, not adam (adam works unsharded, and sharded on CUDA)")


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters that no in-backward (fused) optimizer owns: what the dense AdamW steps."""
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    return [p for _, p in in_backward_optimizer_filter(model.named_parameters()) if p.requires_grad]


def make_dense_optimizer(model: nn.Module, cfg: OptimConfig, total_steps: int):
    """AdamW over :func:`dense_parameters` and its warm-up/cosine ``LambdaLR``."""
    params = dense_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.warmup_steps, total_steps, cfg.min_lr_ratio, cfg.schedule))
    return optimizer, schedule


@dataclass
class DistributedContext:
    """Where this process runs: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None, single_process_group: bool = False,
                     timeout_s: float | None = None) -> DistributedContext:
    """Read ``torchrun``'s environment; start the process group when ``WORLD_SIZE`` > 1.

    gloo on CPU, nccl on CUDA. Without ``torchrun`` (no ``WORLD_SIZE``), a single process; with
    ``single_process_group`` it still gets a 1-rank group (through a file store, no port needed), so the
    same sharded code path runs with a 1-rank plan. ``timeout_s``: how long a collective waits for the other
    ranks before it raises (``None``: torch's default).
    """
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    dev = torch.device(f"cuda:{local_rank}") if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    # on CUDA, nccl for CUDA tensors and gloo for the CPU ones (metric sums, stop flags, object gathers)
    backend = "cpu:gloo,cuda:nccl" if want_cuda else "gloo"
    if world_size > 1 and not dist.is_initialized():
        extra = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        dist.init_process_group(backend, rank=rank, world_size=world_size, **extra)
    elif single_process_group and not dist.is_initialized():
        import tempfile

        store_file = tempfile.NamedTemporaryFile(prefix="hybrid-pg-", delete=False).name
        dist.init_process_group(backend, init_method=f"file://{store_file}", rank=0, world_size=1)
    return DistributedContext(rank=rank, world_size=world_size, device=dev)


def shard_model(model: nn.Module, ctx: DistributedContext,
                sharding_types: Mapping[str, str] | None = None) -> nn.Module:
    """Wrap ``model`` in ``DistributedModelParallel`` with a planner-made plan.

    Args:
        model: built on the ``meta`` device (tables are materialised on their shards) or on CPU.
        ctx: from :func:`init_distributed` (works with ``world_size == 1`` too: a 1-rank plan).
        sharding_types: table name → ``row_wise`` / ``table_wise`` / ``column_wise`` constraint, e.g.
            ``{"t_item_id": "row_wise"}`` for the large item table.

    Two guarantees beyond TorchRec's defaults (both matter for transferred, frozen tables):

    * a table without an in-backward optimizer (a frozen one: :func:`apply_sparse_optimizer` skips
      ``requires_grad=False``) is *not* updated (:func:`untrained_table_fused_params`), and no table is
      planned ``data_parallel``: that kernel is a dense parameter with no fused optimizer, so the dense AdamW
      would step it with the dense lr and weight decay instead of the table optimizer it was configured with
      (TorchRec's planner picks it for small tables, e.g. DCN-v2's ``t_genres``, when left free);
    * tables that already hold values (built on CPU, or loaded by a transfer) keep them. TorchRec copies an
      ``EmbeddingCollection``'s values into its shards unless it was built on ``meta``, but re-initialises
      an ``EmbeddingBagCollection`` on CPU; so every non-meta table is loaded into the sharded model after
      wrapping (replicated tables from rank 0, so the replicas agree). Tables built on ``meta`` are left
      to the shards' own initialisation.
    """
    import torch.distributed as dist
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import (
        EmbeddingShardingPlanner,
        ParameterConstraints,
        Topology,
    )

    from hybrid.core.tables import is_table_key

    constraints = {}
    frozen = _frozen_table_names(model)
    for name in _table_names(model):
        kind = (sharding_types or {}).get(name)
        if kind == "data_parallel":
            why = ("is frozen (requires_grad=False)" if name in frozen
                   else "would lose its table optimizer (the dense AdamW would step it with the dense lr)")
            raise ValueError(f"table {name} {why}: sharding_types asks for data_parallel, a dense kernel with no "
                             "fused optimizer; use table_wise, row_wise or column_wise")
        constraints[name] = ParameterConstraints(sharding_types=[kind] if kind else list(_FUSED_SHARDING_TYPES))
    preset = {key: value for key, value in model.state_dict().items()
              if is_table_key(key) and isinstance(value, torch.Tensor) and not value.is_meta}
    topology = Topology(world_size=ctx.world_size, compute_device=ctx.device.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    fused = untrained_table_fused_params()
    sharders = [EmbeddingCollectionSharder(fused_params=fused), EmbeddingBagCollectionSharder(fused_params=fused)]
    group = dist.GroupMember.WORLD if dist.is_initialized() else None
    if group is None:
        raise RuntimeError("shard_model needs a process group: run under torchrun or call init_distributed() "
                           "with WORLD_SIZE set (a 1-rank group is fine)")
    plan = planner.collective_plan(model, sharders, group)
    dmp = DistributedModelParallel(model, device=ctx.device, plan=plan, sharders=sharders)
    if preset:
        _restore_table_values(dmp, preset)
    setattr(model, SHARDED_BY_SHARD_MODEL, True)   # hybrid.adapters.guard: this sharding keeps transfers intact
    return dmp


#: attribute :func:`shard_model` sets on the module it shards (read by ``hybrid.adapters.guard``)
SHARDED_BY_SHARD_MODEL = "_hybrid_sharded_by_shard_model"

#: every sharding type whose kernel carries the table's own fused (in-backward) optimizer: all but data_parallel
_FUSED_SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise")


def _table_names(model: nn.Module) -> set[str]:
    from hybrid.core.tables import table_parameters

    return {name for _, name, _ in table_parameters(model)}


def _frozen_table_names(model: nn.Module) -> set[str]:
    from hybrid.core.tables import table_parameters

    return {name for _, name, weight in table_parameters(model) if not weight.requires_grad}


@torch.no_grad()
def _restore_table_values(dmp: nn.Module, preset: Mapping[str, torch.Tensor]) -> None:
    """Write full (unsharded) table values into a freshly sharded model; replicated tables from rank 0."""
    import torch.distributed as dist

    from hybrid.core.tables import copy_full_into

    state = dmp.state_dict()
    for key, full in preset.items():
        target = state.get(key)
        if target is None:
            continue
        copy_full_into(target, full)  # each rank writes the rows/columns it holds
        if type(target) is torch.Tensor and dist.is_initialized():
            dist.broadcast(target, src=0)  # a replicated (data_parallel) table: every rank takes rank 0's values


def untrained_table_fused_params() -> dict:
    """Sharder-level fused params that leave a table with no in-backward optimizer untouched.

    Why: DMP shards every table into FBGEMM kernels whose update is fused into the backward pass. A table
    whose parameter carries no in-backward optimizer (a frozen one) does not fall out of that path: it gets
    the sharder's default fused params, and FBGEMM's own default is SGD with lr 0.01, so a "frozen" table
    would be trained (measured: it moves after one step). CPU FBGEMM has no update-free optimizer
    (``OptimType.NONE`` is CUDA-only) and the dense kernel is only offered data-parallel, so the default
    becomes exact SGD with learning rate 0: ``w - 0·g == w`` bit for bit. Tables that do carry an
    optimizer override both keys with their own (per-parameter fused params win over the sharder's).
    Schedulers that scale learning rates (LambdaLR) keep 0 at 0.
    """
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    return {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.0}


def gather_from_ranks(value: object) -> list:
    """``value`` of every rank, in rank order (``[value]`` without a multi-rank process group): what ranks
    compare before a collective step, so that all decide alike."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def is_dmp(model: nn.Module) -> bool:
    """True when ``model`` is a TorchRec ``DistributedModelParallel``."""
    from torchrec.distributed.model_parallel import DistributedModelParallel

    return isinstance(model, DistributedModelParallel)


def unwrap_dmp(model: nn.Module, expected: type[nn.Module] | None = None) -> nn.Module:
    """The module inside a ``DistributedModelParallel`` (or ``model`` itself).

    Trainers call this inner module directly (``core(batch)``, ``core.loss(batch)``): its sharded tables
    still run their collective lookups, but the DDP wrapper DMP puts around the dense modules is bypassed,
    so dense gradients must then be averaged with :func:`average_dense_gradients`.

    Args:
        model: a module, or the ``DistributedModelParallel`` wrapping one.
        expected: when given, raise ``TypeError`` unless the inner module is an instance of it.
    """
    inner = model.module if is_dmp(model) else model
    if expected is not None and not isinstance(inner, expected):
        raise TypeError(f"expected a {expected.__name__} (or DMP wrapping one), got {type(inner).__name__}")
    return inner


def average_dense_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """Average dense gradients across ranks with one all-reduce of one flat buffer.

    Args:
        params: the dense parameters (:func:`dense_parameters`), in the same order on every rank. A
            parameter without a gradient on this rank contributes zeros (every rank must send the same
            buffer size).
        world_size: number of ranks.
    """
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g)
        offset += g.numel()


def eval_rounds(batches: Iterable[T], ctx: DistributedContext) -> Iterator[tuple[int, T, bool]]:
    """This rank's turns over ``batches``, which every rank iterates whole: ``(index, batch, keep)``.

    Rank ``r`` of ``W`` takes batches ``r, r + W, ...`` (``keep=True``). Sharded lookups are collective, so a
    rank with fewer batches than the others then gets filler rounds ``(0, first batch, False)`` until every
    rank has made the same number of forward calls; their results are to be discarded.

    Example:
        >>> [(i, b, keep) for i, b, keep in eval_rounds("abc", DistributedContext(rank=1, world_size=2))]
        [(1, 'b', True), (0, 'a', False)]
    """
    first, seen, mine = None, 0, 0
    for index, batch in enumerate(batches):
        first = batch if first is None else first
        seen += 1
        if index % ctx.world_size == ctx.rank:
            mine += 1
            yield index, batch, True
    for _ in range(math.ceil(seen / ctx.world_size) - mine):
        yield 0, first, False


def per_epoch_positions(steps_per_epoch: int, per_epoch: int) -> frozenset[int]:
    """The positions in an epoch (1-based steps; ``steps_per_epoch`` is its last) of something done
    ``per_epoch`` times an epoch (``train.evals_per_epoch``, ``train.checkpoints_per_epoch``): evenly spaced,
    the last at the epoch's end, at most once a step (fewer steps than times: every step). ``0``: none.

    Example:
        >>> sorted(per_epoch_positions(10, 4)), sorted(per_epoch_positions(3, 5))
        ([3, 5, 8, 10], [1, 2, 3])
    """
    if per_epoch <= 0:
        return frozenset()
    return frozenset(-(-k * steps_per_epoch // per_epoch) for k in range(1, per_epoch + 1))


def check_per_epoch(name: str, value: object) -> None:
    """``train.<name>`` (a per-epoch count) is an integer >= 0."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"train.{name} must be an integer >= 0 (0: use the step interval), got {value!r}")

class StopSignals:
    """SIGTERM / SIGINT → a flag the training loops read at each step boundary (both trainers; one place).

    Inside ``with StopSignals(ctx) as stop:`` the first SIGTERM or SIGINT only records the signal; the loop
    asks :meth:`requested` after each step, writes a complete checkpoint there and raises
    :class:`~hybrid.core.errors.TrainingInterrupted` (the CLI: one line, exit ``128 + signal``; the MLflow run
    ``KILLED``). A second signal interrupts at once (``KeyboardInterrupt``). In a distributed run the ranks
    agree (a max all-reduce of the flag per step), so all stop at the same step and save together. Outside the
    main thread (no signal handlers there) nothing is installed and :meth:`requested` is ``None``.

    Example:
        >>> with StopSignals() as stop:
        ...     for step in range(1, 4):
        ...         loss = step * 0.5                    # one training step
        ...         if stop.requested() is not None:     # SIGTERM / SIGINT arrived during it
        ...             break                            # save a checkpoint at ``step``, then raise
        >>> stop.requested() is None
        True
    """

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self, ctx: DistributedContext | None = None) -> None:
        self.ctx = ctx or DistributedContext()
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 - the signal module's signature
        if self.signum is not None:  # the second one: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def requested(self) -> int | None:
        """The signal that asked this run (any rank of it) to stop, else ``None``; call it at step boundaries,
        on every rank alike (distributed: one small collective)."""
        if self.ctx.is_distributed:
            import torch.distributed as dist

            flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=self.ctx.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return int(flag.item()) or None
        return self.signum
