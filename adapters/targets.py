"""Finding the tables and modules of a target model that pretrained weights go into.

A target is any ``nn.Module``, unsharded or wrapped in TorchRec's ``DistributedModelParallel``; its tables
are TorchRec collection tables (``EmbeddingCollection`` / ``EmbeddingBagCollection``, sharded or not) or
plain ``nn.Embedding`` / ``nn.EmbeddingBag`` modules. :class:`TableSlot` hides which: it reports the
global shape, writes full values (each rank its own shard blocks), freezes, and says whether it is frozen.

Paths are relative to the user's model (inside DMP: to ``dmp.module``), e.g. ``input.features.ec`` for a
built-in DCN-v2 and ``experts.1.input.features.ec`` for the second expert of the multi-embedding MoE.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection

from hybrid.adapters.config import TransferError
from hybrid.core.tables import copy_full_into
from hybrid.core.training import is_dmp

COLLECTIONS = (EmbeddingCollection, EmbeddingBagCollection)




def _sharded_classes() -> tuple[type, ...]:
    from torchrec.distributed.embedding import ShardedEmbeddingCollection
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

    return ShardedEmbeddingCollection, ShardedEmbeddingBagCollection


def _is_collection(module: nn.Module) -> bool:
    return isinstance(module, COLLECTIONS + _sharded_classes())


def _table_dict(module: nn.Module) -> nn.ModuleDict:
    """``embeddings`` of an (Sharded)EmbeddingCollection, ``embedding_bags`` of a bag collection."""
    return module.embeddings if hasattr(module, "embeddings") and isinstance(module.embeddings, nn.ModuleDict) \
        else module.embedding_bags


def _table_attr(module: nn.Module) -> str:
    return "embeddings" if hasattr(module, "embeddings") and isinstance(module.embeddings, nn.ModuleDict) \
        else "embedding_bags"


@dataclass
class TableSlot:
    """One target table.

    Args:
        path: module path of the collection or embedding module (relative to the user's model).
        table: table name inside a collection; ``None`` for an ``nn.Embedding`` / ``nn.EmbeddingBag``.
        module: the collection / embedding module.
        sharded: the collection is a DMP-sharded one.
    """

    path: str
    table: str | None
    module: nn.Module
    sharded: bool

    @property
    def name(self) -> str:
        """``path:table`` (``path`` alone for an ``nn.Embedding``)."""
        return f"{self.path}:{self.table}" if self.table is not None else self.path

    @property
    def key(self) -> str:
        """State-dict key of the weight, relative to the user's model."""
        prefix = f"{self.path}." if self.path else ""
        if self.table is None:
            return f"{prefix}weight"
        return f"{prefix}{_table_attr(self.module)}.{self.table}.weight"

    @property
    def table_name(self) -> str:
        """Table name for feature inference: the collection's table name, else the module's last path part."""
        return self.table if self.table is not None else self.path.rsplit(".", 1)[-1]

    def _local_key(self) -> str:
        return f"{_table_attr(self.module)}.{self.table}.weight"

    def weight(self) -> nn.Parameter:
        """The unsharded weight parameter (not for sharded slots)."""
        assert not self.sharded
        if self.table is None:
            return self.module.weight
        return _table_dict(self.module)[self.table].weight

    def state_tensor(self) -> torch.Tensor:
        """What to write into: the weight, or the ``ShardedTensor`` / replicated tensor of a sharded table."""
        if not self.sharded:
            return self.weight()
        return self.module.state_dict()[self._local_key()]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.state_tensor().size())  # type: ignore[return-value]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_meta(self) -> bool:
        return not self.sharded and self.weight().is_meta

    def materialize(self) -> None:
        """Give a ``meta`` table real CPU storage and its own init (the whole collection, so it is all real).

        Why the whole collection: TorchRec's sharder decides per collection whether to copy the unsharded
        values into the shards (``EmbeddingCollection``: when it was not built on ``meta``), and a collection
        with some tables still on meta could not be copied at all.
        """
        if not self.is_meta:
            return
        if self.table is None:
            self.module.to_empty(device="cpu")
            self.module.reset_parameters()
            return
        configs = (self.module.embedding_configs() if isinstance(self.module, EmbeddingCollection)
                   else self.module.embedding_bag_configs())
        tables = _table_dict(self.module)
        for cfg in configs:
            emb = tables[cfg.name]
            if emb.weight.is_meta:
                emb.to_empty(device="cpu")
                assert cfg.init_fn is not None  # EmbeddingConfig fills it from weight_init_min/max
                with torch.no_grad():
                    cfg.init_fn(emb.weight)
        if isinstance(self.module, EmbeddingCollection):
            # TorchRec's private compute-device field: with it on CPU, a plain DMP copies these values into
            # the shards too (hybrid.core.training.shard_model copies them either way).
            self.module._device = torch.device("cpu")

    def write(self, full: torch.Tensor, rows: torch.Tensor) -> None:
        """Write rows ``rows`` (bool ``[R]``) of ``full`` ``[R, D]``; other rows keep their values."""
        copy_full_into(self.state_tensor(), full, rows)

    def freeze_problem(self, root: nn.Module) -> str | None:
        """Why this table cannot be frozen here (``None`` when it can): a frozen table gets no update."""
        if not self.sharded:
            weight = self.weight()
            if hasattr(weight, "_in_backward_optimizers") or hasattr(weight, "_optimizer_classes"):
                return (f"table {self.name} already has an in-backward optimizer, which would keep updating it "
                        "(under DMP inside the fused kernel): call apply_transfer before apply_sparse_optimizer / "
                        "prepare_for_training")
            return None
        lr = sharded_learning_rate(root, self.key)
        if lr is None:
            return (f"table {self.name} is sharded with a kernel whose update apply_transfer cannot control "
                    "(data_parallel?): freeze before sharding — call apply_transfer on the unsharded model, then "
                    "hybrid.core.training.shard_model")
        if lr != 0.0:
            return (f"table {self.name} is already sharded and trained by DMP's fused optimizer (lr={lr:g}); "
                    "a table can only be frozen before sharding: call apply_transfer on the unsharded model, then "
                    "apply_sparse_optimizer + hybrid.core.training.shard_model (frozen tables get no update)")
        return None

    def freeze(self) -> None:
        if not self.sharded:
            self.weight().requires_grad_(False)
        # sharded: freeze_problem() checked the fused kernel's learning rate is 0 — nothing to change

    def is_frozen(self, root: nn.Module) -> bool:
        if not self.sharded:
            return not self.weight().requires_grad
        return sharded_learning_rate(root, self.key) == 0.0


def sharded_learning_rate(root: nn.Module, key: str) -> float | None:
    """The fused optimizer's learning rate of sharded table ``key`` (``None``: not fused / not on this rank)."""
    if not is_dmp(root):
        return None
    optimizer = root.fused_optimizer
    param = optimizer.params.get(key)
    if param is None:
        # a rank that holds no shard of the table may not list it; the state dict still does
        state = root.module.state_dict().get(key) if hasattr(root, "module") else None
        if state is not None and type(state).__name__ == "ShardedTensor" and not state.local_shards():
            return 0.0  # nothing of it lives here, so nothing of it is updated here
        return None
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return float(group["lr"])
    return None


def collections(inner: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """``(path, module, sharded)`` of every TorchRec table collection in the user's model."""
    sharded_types = _sharded_classes()
    return [(path, m, isinstance(m, sharded_types)) for path, m in inner.named_modules() if _is_collection(m)]


def all_table_slots(inner: nn.Module) -> list[TableSlot]:
    """Every collection table of the model (plain ``nn.Embedding`` modules are only found by path)."""
    return [TableSlot(path, table, module, sharded)
            for path, module, sharded in collections(inner) for table in _table_dict(module)]


def resolve_target(inner: nn.Module, spec: str, source_table: str) -> list[TableSlot]:
    """Target slots named by a table-map string (see :class:`hybrid.adapters.config.TableTarget`).

    Raises:
        TransferError: nothing matches; the message lists close module paths and table names.
    """
    modules = dict(inner.named_modules())
    sharded_types = _sharded_classes()
    path, sep, table = spec.partition(":")
    if sep:
        module = modules.get(path)
        if module is None or not _is_collection(module):
            raise TransferError(_unknown(inner, spec, source_table, f"no table collection at '{path}'"))
        names = list(_table_dict(module))
        if table not in names:
            raise TransferError(f"table_map['{source_table}'] = '{spec}': the collection at '{path}' has no table "
                                f"'{table}' (it has: {', '.join(names)})")
        return [TableSlot(path, table, module, isinstance(module, sharded_types))]
    module = modules.get(spec)
    if module is not None and spec:
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            return [TableSlot(spec, None, module, False)]
        if _is_collection(module):
            names = list(_table_dict(module))
            if source_table in names:
                return [TableSlot(spec, source_table, module, isinstance(module, sharded_types))]
            if len(names) == 1:
                return [TableSlot(spec, names[0], module, isinstance(module, sharded_types))]
            raise TransferError(f"table_map['{source_table}'] = '{spec}': the collection has tables "
                                f"{', '.join(names)}; name one as '{spec}:<table>'")
        raise TransferError(f"table_map['{source_table}'] = '{spec}': {type(module).__name__} is not an embedding "
                            "table (expected nn.Embedding, nn.EmbeddingBag or a TorchRec collection)")
    slots = [slot for slot in all_table_slots(inner) if slot.table == spec]
    if slots:
        return slots
    raise TransferError(_unknown(inner, spec, source_table, "no module or table of that name"))


def _unknown(inner: nn.Module, spec: str, source_table: str, what: str) -> str:
    candidates = [p for p, m in inner.named_modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and p]
    candidates += [s.name for s in all_table_slots(inner)]
    candidates = [c for c in candidates if ".embeddings." not in c and ".embedding_bags." not in c]
    close = difflib.get_close_matches(spec, candidates, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    known = f" Tables in the model: {', '.join(candidates[:12])}" + (" ..." if len(candidates) > 12 else "")
    tail = known if candidates else " The model has no embedding tables."
    return f"table_map['{source_table}'] = '{spec}': {what}{hint}.{tail}"


def backbone_modules(inner: nn.Module) -> list[str]:
    """Paths of every ``hybrid.core`` sequence backbone in the model (the FT targets of built-in rankers)."""
    from hybrid.core.backbones.common import Backbone

    return [path for path, m in inner.named_modules() if isinstance(m, Backbone)]


def input_projection_path(inner: nn.Module, backbone_path: str) -> str | None:
    """The ``input_proj`` beside a backbone (same parent), when there is one — it shares the token space."""
    parent = backbone_path.rsplit(".", 1)[0] if "." in backbone_path else ""
    owner = inner.get_submodule(parent) if parent else inner
    proj = getattr(owner, "input_proj", None)
    if isinstance(proj, nn.Module):
        return f"{parent}.input_proj" if parent else "input_proj"
    return None
