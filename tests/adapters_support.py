"""Builders shared by the adapter tests: small feature maps with overlapping raw ids, a pretraining
checkpoint written the way ``hybrid.pretrain.trainer`` writes it (state under ``model``, feature map in the
manifest), and the raw-id ground truth computed without the code under test."""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hybrid.core.checkpoint import save_checkpoint
from hybrid.core.feature_map import FeatureMap
from hybrid.pretrain import GenerativeModel, GenerativeModelConfig

SHARED = {"hist_item_id": "item_id", "hist_category": "category", "hist_action": "action"}
CATEGORIES = ["Drama", "Comedy", "Action", "Horror", "War"]


def feature_map(items: list[str], seed: int, categories=CATEGORIES, users: int = 30) -> FeatureMap:
    """A feature map over ``items`` whose id order depends on ``seed`` (frequencies are drawn)."""
    rng = np.random.default_rng(seed)
    cols = {"item_id": pd.Series(rng.choice(items, 40 * len(items))),
            "category": pd.Series(rng.choice(categories, 200)),
            "action": pd.Series(rng.choice(["1", "2", "3", "4", "5"], 200)),
            "user_id": pd.Series(rng.choice([f"u{k}" for k in range(users)], 300))}
    return FeatureMap.fit(cols, shared=SHARED)


def source_and_target_maps() -> tuple[FeatureMap, FeatureMap]:
    """Pretraining map over items i0..i39, target map over i10..i59 (30 shared raw ids, 20 new)."""
    return feature_map([f"i{k}" for k in range(40)], 0), feature_map([f"i{k}" for k in range(10, 60)], 1)


def write_pretrain_checkpoint(root: Path, fm: FeatureMap, config: GenerativeModelConfig | None = None,
                              seed: int = 0, run_id: str = "pretrain-run-0") -> tuple[Path, GenerativeModel]:
    """A GenerativeModel with random weights saved like the trainer saves it; returns (dir, model)."""
    config = config or GenerativeModelConfig.tiny()
    torch.manual_seed(seed)
    model = GenerativeModel(config, fm.vocab_sizes())
    with torch.no_grad():  # make every parameter distinct from any fresh init (norm weights start at 1)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tables = {f"t_{f}": [n, config.table_dim] for f, n in model.vocab_sizes.items()}
    path = save_checkpoint(root, 7, {"model": model.state_dict()},
                           {"feature_map": fm.to_dict(), "model": config.to_dict(), "tables": tables,
                            "mlflow_run_id": run_id, "world_size": 1})
    return path, model


def raw_alignment(target: FeatureMap, source: FeatureMap, feature: str) -> dict[int, int]:
    """target id → source id of the same raw value, by dict lookup over the tokens (known values only)."""
    src = {tok: i + 2 for i, tok in enumerate(source[feature].tokens)}
    return {i + 2: src[tok] for i, tok in enumerate(target[feature].tokens) if tok in src}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@contextlib.contextmanager
def one_rank_group():
    """A 1-rank gloo process group for in-process DMP, torn down afterwards (only if we started it)."""
    import torch.distributed as dist

    from hybrid.core.training import init_distributed

    started = not dist.is_initialized()
    ctx = init_distributed(single_process_group=True)
    try:
        yield ctx
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def local_table(state_value: torch.Tensor) -> torch.Tensor:
    """The full table of a 1-rank sharded model (its only shard), or the tensor itself."""
    if hasattr(state_value, "local_shards"):
        shards = state_value.local_shards()
        assert len(shards) == 1 and list(shards[0].metadata.shard_offsets) == [0, 0]
        return shards[0].tensor.detach().clone()
    return state_value.detach().clone()


def deepcopy(model):
    return copy.deepcopy(model)


@contextlib.contextmanager
def single_thread():
    """One intra-op thread inside the block (for module-scoped fixtures, which an autouse fixture misses)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread (as the trainer tests): on a shared 2-core machine a second busy process slows
    2-thread OpenMP kernels down by orders of magnitude (measured: 3 pretraining steps 11 s → 0.3 s)."""
    with single_thread():
        yield


def random_ctr_batch(vocab_sizes: dict[str, int], batch_size: int, generator: torch.Generator,
                     max_hist: int = 6):
    """A CTRBatch with the keys the GPSD ranker reads (candidate item/category, item/category/action
    histories), ids drawn inside ``vocab_sizes`` (known ids, >= 2), random labels."""
    from torchrec import KeyedJaggedTensor

    from hybrid.core import CTRBatch

    g, B = generator, batch_size

    def ids(feature: str, n: int) -> torch.Tensor:
        return torch.randint(2, vocab_sizes[feature], (n,), generator=g)

    lengths = torch.randint(1, max_hist + 1, (B,), generator=g)
    n = int(lengths.sum())
    ones = torch.ones(B, dtype=torch.long)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["item_id", "category", "hist_item_id", "hist_category", "hist_action"],
        values=torch.cat([ids("item_id", B), ids("category", B), ids("item_id", n), ids("category", n),
                          ids("action", n)]),
        lengths=torch.cat([ones, ones, lengths, lengths, lengths]))
    t0 = torch.full((B,), 1_700_000_000)
    return CTRBatch(sparse=kjt, dense=torch.zeros(B, 0), labels=torch.randint(0, 2, (B, 1), generator=g).float(),
                    timestamps=t0, hist_timestamps=torch.arange(n) + 1_600_000_000, user_index=torch.arange(B),
                    task_names=("click",))
