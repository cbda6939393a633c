"""GPU readiness (issue 18.4): ``train.precision`` and device placement, for both trainers.

bf16 = autocast of the dense part (backbone, DCN-v2 / MoE / TIN towers, heads); the tables, their optimizer
states, the dense master weights and AdamW states, and the losses stay fp32 (``hybrid.core.precision``).

* CPU tests (run everywhere): bf16 autocast gives the fp32 loss within bf16 tolerance (and is really on: the
  dense layers compute in bfloat16), a bf16 training step leaves every parameter and optimizer state fp32,
  fp32 changes nothing, the evaluation ranks in fp32, and any other ``train.precision`` is refused by name.
* ``gpu`` tests (skipped without CUDA): the same weights and batch give the same loss on CUDA (fp32 and bf16)
  as on CPU fp32, and training steps run on CUDA with the TorchRec tables there, sharded in a 1-rank DMP
  (FBGEMM's CUDA kernels), fed by a loader that pins its batches.

Data: a small synthetic event log through the real protocol and loaders (no files, nothing fetched: the GPU
machine may be offline).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from adapters_support import one_thread  # noqa: F401 (autouse fixture)
from ctr_synthetic import SYNTHETIC_VOCAB_SIZES, make_synthetic_batch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from hybrid.config import load_config
from hybrid.core.checkpoint import latest_checkpoint
from hybrid.core.errors import ConfigError
from hybrid.core.precision import autocast, check_precision, pin_memory, to_device
from hybrid.core.training import DistributedContext, OptimConfig
from hybrid.ctr_models import RANKER_NAMES, build_ranker
from hybrid.ctr_models.dcn_v2 import DCNv2Config
from hybrid.ctr_models.gpsd_ranker import GPSDRankerConfig
from hybrid.ctr_models.moe import MMoEConfig, MultiEmbeddingMoEConfig
from hybrid.ctr_models.tin import TINConfig
from hybrid.ctr_models.trainer import CTRTrainConfig, bce_per_task, prepare_for_training
from hybrid.ctr_models.trainer import evaluate as ctr_evaluate
from hybrid.ctr_models.trainer import train as ctr_train
from hybrid.data.batching import CTRBatchConverter, SequenceBatchConverter, make_loader
from hybrid.data.protocols import ProtocolConfig, prepare
from hybrid.data.schema import RawDataset
from hybrid.jobs.finetune import FinetuneConfig
from hybrid.jobs.pretrain import PretrainConfig
from hybrid.pretrain import GenerativeModel, GenerativeModelConfig, ObjectiveConfig, PretrainTrainConfig, build_model
from hybrid.pretrain import evaluate as pretrain_evaluate
from hybrid.pretrain import train as pretrain_train

FP32_RTOL = 1e-4   # CUDA fp32 vs CPU fp32: reduction order only
BF16_RTOL = 2e-2   # bfloat16 keeps 8 bits of mantissa (~4e-3 per rounding)
FEATURES = ("item_id", "category", "action")
MAX_LEN = 24
H = 12             # CTR history window

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: torch.cuda.is_available() is False")
TINY_RANKERS = {"dcn_v2": DCNv2Config, "mmoe": MMoEConfig, "multi_embedding_moe": MultiEmbeddingMoEConfig,
                "tin": TINConfig, "gpsd": GPSDRankerConfig}


@pytest.fixture(scope="module")
def prepared():
    """60 users x 12..30 chronological ratings of 40 items (genres, years, user fields): protocol last-item."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(60):
        start = int(rng.integers(0, 40))
        for k in range(int(rng.integers(12, 31))):
            item = (start + k + int(rng.integers(0, 3))) % 40
            rows.append((f"u{u}", f"i{item}", 900_000_000 + 86_400 * u + 3600 * k, float(rng.integers(1, 6))))
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(40)], "title": [f"t{i}" for i in range(40)],
                          "genres": [f"g{i % 6}|g{(i + 1) % 6}" for i in range(40)],
                          "year": [str(1990 + i % 9) for i in range(40)]})
    users = pd.DataFrame({"user_id": [f"u{u}" for u in range(60)], "gender": ["F", "M"] * 30,
                          "age": [str(18 + u % 5) for u in range(60)], "occupation": [str(u % 7) for u in range(60)],
                          "zip": ["0"] * 60})
    return prepare(RawDataset("synthetic", events, items, users), ProtocolConfig(protocol="last-item", max_history=MAX_LEN))


def sequence_loader(prepared, split: str, batch_size: int, *, shuffle: bool, pin: bool = False):
    return make_loader(SequenceBatchConverter(prepared, split, max_len=MAX_LEN, features=FEATURES), batch_size,
                       shuffle=shuffle, pin_memory=pin)


def ctr_loader(prepared, model, split: str, batch_size: int, *, shuffle: bool, pin: bool = False):
    converter = CTRBatchConverter(prepared, split, max_history=H, fields=list(model.spec.kjt_keys), task_names=("click",))
    return make_loader(converter, batch_size, shuffle=shuffle, pin_memory=pin)


def tiny_ranker(name: str, vocab_sizes, tasks=("click",), seed: int = 0):
    torch.manual_seed(seed)
    return build_ranker(name, TINY_RANKERS[name].tiny(), vocab_sizes, tasks)


def in_batch_config(kind: str = "llama") -> GenerativeModelConfig:
    """The tiny model with in-batch negatives and no subsampling: its loss draws no random numbers, so CPU and
    CUDA score the same candidates (their generators differ)."""
    return dataclasses.replace(GenerativeModelConfig.tiny(kind), objective=ObjectiveConfig(
        negatives="in_batch", num_negatives=100_000, logq_correction=False))


def rel(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    a, b = (float(x.detach()) if isinstance(x, torch.Tensor) else float(x) for x in (a, b))
    return abs(a - b) / max(abs(b), 1e-12)


def linear_output_dtypes(module: torch.nn.Module) -> tuple[list[torch.dtype], list]:
    """Record the output dtype of every ``nn.Linear`` call of ``module`` (returns the list and the hooks)."""
    seen: list[torch.dtype] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
             for m in module.modules() if isinstance(m, torch.nn.Linear)]
    return seen, hooks


def checkpoint_dtypes(path: Path) -> dict[str, torch.dtype]:
    """Every floating tensor stored in a DCP checkpoint, by key, with its dtype (read from the metadata)."""
    metadata = FileSystemReader(str(path)).read_metadata()
    return {key: meta.properties.dtype for key, meta in metadata.state_dict_metadata.items()
            if isinstance(meta, TensorStorageMetadata) and meta.properties.dtype.is_floating_point}


def assert_all_fp32(dtypes: dict[str, torch.dtype], *prefixes: str) -> None:
    for prefix in prefixes:
        mine = {k: d for k, d in dtypes.items() if k.startswith(prefix)}
        assert mine, f"no floating tensor under {prefix!r} in the checkpoint: {sorted(dtypes)[:10]}"
        assert set(mine.values()) == {torch.float32}, {k: d for k, d in mine.items() if d != torch.float32}


# ---------------------------------------------------------------------------------------------- the option

def test_other_precisions_are_refused_naming_train_precision():
    for config in (PretrainTrainConfig, CTRTrainConfig):
        with pytest.raises(ValueError, match=r"train\.precision must be one of fp32, bf16, got 'fp16'"):
            config(precision="fp16")
        assert config(precision="bf16").precision == "bf16" and config().precision == "fp32"
    for job in (PretrainConfig, FinetuneConfig):
        for value in ("fp16", "float32", "BF16"):
            with pytest.raises(ConfigError, match=rf"train\.precision.*'fp32', 'bf16', got '{value}'"):
                load_config(job, overrides=[f"train.precision={value}"])
        assert load_config(job, overrides=["train.precision=bf16"]).train.precision == "bf16"
    with pytest.raises(ValueError, match=r"train\.precision must be one of"):
        with autocast("fp16", "cpu"):
            pass
    assert check_precision("fp32") == "fp32"


def test_fp32_is_a_no_op_and_cpu_batches_are_not_pinned(prepared):
    model = GenerativeModel(GenerativeModelConfig.tiny(), prepared.feature_map.vocab_sizes()).eval()
    batch = next(iter(sequence_loader(prepared, "pretrain_train", 8, shuffle=False)))
    plain = model.loss(batch, generator=torch.Generator().manual_seed(3))
    with autocast("fp32", "cpu"):
        inside = model.loss(batch, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(plain[k], inside[k]) for k in plain)       # bit-identical
    assert not pin_memory("cpu") and pin_memory("cuda:0")
    assert make_loader(SequenceBatchConverter(prepared, "pretrain_train", MAX_LEN, FEATURES), 8, shuffle=False).pin_memory \
        is False
    moved = to_device(batch, torch.device("cpu"))
    assert torch.equal(moved.features.values(), batch.features.values())


# ---------------------------------------------------------------------------------------------- bf16 on CPU

@pytest.mark.parametrize("kind", ["llama", "hstu"])
def test_bf16_autocast_on_cpu_gives_the_pretraining_loss_within_bf16_tolerance(prepared, kind):
    torch.manual_seed(0)
    model = GenerativeModel(GenerativeModelConfig.tiny(kind), prepared.feature_map.vocab_sizes()).eval()
    batch = next(iter(sequence_loader(prepared, "pretrain_train", 16, shuffle=False)))
    fp32 = model.loss(batch, generator=torch.Generator().manual_seed(1))
    seen, hooks = linear_output_dtypes(model.backbone)
    with autocast("bf16", "cpu"):
        bf16 = model.loss(batch, generator=torch.Generator().manual_seed(1))
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {torch.bfloat16}                       # the backbone really ran in bf16
    for name in ("loss", "item_loss", "category_loss"):
        assert bf16[name].dtype == torch.float32, name                  # the loss did not
        assert rel(bf16[name], fp32[name]) < BF16_RTOL, (name, float(bf16[name]), float(fp32[name]))
    assert not torch.equal(bf16["loss"], fp32["loss"])                  # and it is not the fp32 computation


@pytest.mark.parametrize("name", RANKER_NAMES)
def test_bf16_autocast_on_cpu_gives_the_ctr_loss_within_bf16_tolerance(name):
    model = tiny_ranker(name, SYNTHETIC_VOCAB_SIZES, ("click", "rating5")).eval()
    batch = make_synthetic_batch(64, torch.Generator().manual_seed(0), ("in_history", "parity"))
    fp32 = bce_per_task(model(batch), batch.labels)
    seen, hooks = linear_output_dtypes(model)
    with autocast("bf16", "cpu"):
        logits = model(batch)
        bf16 = bce_per_task(logits.float(), batch.labels)
    for h in hooks:
        h.remove()
    assert torch.bfloat16 in seen and logits.dtype == torch.bfloat16   # the towers and heads ran in bf16
    assert bf16.dtype == torch.float32
    for t in range(2):
        assert rel(bf16[t], fp32[t]) < BF16_RTOL, (t, bf16.tolist(), fp32.tolist())
    assert not torch.equal(bf16, fp32)


def test_a_bf16_pretraining_step_leaves_tables_and_optimizer_states_fp32(prepared, tmp_path):
    optim = OptimConfig(lr=5e-3, sparse_lr=0.05, sparse_optimizer="adagrad")
    cfg = PretrainTrainConfig(epochs=1, batch_size=16, max_len=MAX_LEN, max_steps=2, eval_every=0, log_every=1,
                              checkpoint_every=0, optim=optim, progress=False, precision="bf16")
    model = build_model(GenerativeModelConfig.tiny(), prepared.feature_map.vocab_sizes(), optim, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen, hooks = linear_output_dtypes(model.backbone)
    result = pretrain_train(model, sequence_loader(prepared, "pretrain_train", 16, shuffle=True), None, cfg,
                            checkpoint_dir=tmp_path)
    for h in hooks:
        h.remove()
    assert result.step == 2 and math.isfinite(result.metrics["train/loss"])
    assert torch.bfloat16 in seen                                      # the trainer's step ran under bf16 autocast
    after = model.state_dict()
    assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())
    table = "embeddings.embeddings.t_item_id.weight"
    assert not torch.equal(after[table], before[table])                 # the tables trained (in backward)
    dense = "backbone.layers.0.attention.wq.weight"
    assert not torch.equal(after[dense], before[dense])                 # and AdamW stepped the backbone
    dtypes = checkpoint_dtypes(result.checkpoint)
    assert_all_fp32(dtypes, "model.", "dense_optim.state.", "sparse_optim.")   # weights, AdamW, Adagrad


def test_a_bf16_ctr_step_leaves_tables_and_optimizer_states_fp32(prepared, tmp_path):
    optim = OptimConfig(lr=3e-3, sparse_lr=0.05, sparse_optimizer="adagrad")
    cfg = CTRTrainConfig(epochs=1, batch_size=16, max_history=H, max_steps=2, log_every=1, optim=optim,
                         progress=False, precision="bf16", checkpoints_per_epoch=0)
    model = prepare_for_training(tiny_ranker("dcn_v2", prepared.feature_map.vocab_sizes()), optim)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen, hooks = linear_output_dtypes(model)
    result = ctr_train(model, ctr_loader(prepared, model, "ctr_train", 16, shuffle=True), None, cfg,
                       checkpoint_dir=tmp_path)
    for h in hooks:
        h.remove()
    assert result.step == 2 and math.isfinite(result.metrics["train/loss"])
    assert torch.bfloat16 in seen
    after = model.state_dict()
    assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())
    moved = [k for k in after if "t_item_id" in k and not torch.equal(after[k], before[k])]
    assert moved                                                        # the item table trained
    dtypes = checkpoint_dtypes(latest_checkpoint(tmp_path / "last"))
    assert_all_fp32(dtypes, "model.", "dense_optim.state.", "sparse_optim.")


def test_bf16_evaluation_ranks_in_fp32(prepared):
    """Under bf16 the evaluation losses are bf16 computations, but the HR/NDCG ranking over the full catalogue
    stays fp32: with item vectors 1e-4 apart, bf16 scores (8-bit mantissa) would all tie, and a tie counts
    against the target (HR 0), where fp32 tells them apart."""
    torch.manual_seed(0)
    model = GenerativeModel(GenerativeModelConfig.tiny(), prepared.feature_map.vocab_sizes())
    loader = sequence_loader(prepared, "pretrain_eval", 16, shuffle=False)
    fp32, bf16 = pretrain_evaluate(model, loader), pretrain_evaluate(model, loader, precision="bf16")
    assert fp32["eval/targets"] > 0
    assert bf16["eval/loss"] != fp32["eval/loss"] and rel(bf16["eval/loss"], fp32["eval/loss"]) < BF16_RTOL
    items = model.embeddings.embeddings["t_item_id"].weight
    with torch.no_grad():
        items.copy_(items[5] + 1e-4 * torch.randn_like(items))          # near-duplicate item vectors
    fp32, bf16 = pretrain_evaluate(model, loader), pretrain_evaluate(model, loader, precision="bf16")
    assert fp32["eval/hr_at_10"] > 0.05
    assert bf16["eval/hr_at_10"] == fp32["eval/hr_at_10"] and bf16["eval/ndcg_at_10"] == fp32["eval/ndcg_at_10"]
    ranker = tiny_ranker("tin", prepared.feature_map.vocab_sizes())
    valid = ctr_loader(prepared, ranker, "ctr_valid", 32, shuffle=False)
    a, b = ctr_evaluate(ranker, valid), ctr_evaluate(ranker, valid, precision="bf16")
    assert a["valid/samples"] == b["valid/samples"] > 0
    assert abs(a["valid/logloss"] - b["valid/logloss"]) < BF16_RTOL * a["valid/logloss"]


# ---------------------------------------------------------------------------------------------- CUDA

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision, rtol", [("fp32", FP32_RTOL), ("bf16", BF16_RTOL)])
@pytest.mark.parametrize("kind", ["llama", "hstu"])
def test_cuda_gives_the_cpu_fp32_pretraining_loss(prepared, kind, precision, rtol):
    torch.manual_seed(0)
    cfg, sizes = in_batch_config(kind), prepared.feature_map.vocab_sizes()
    cpu = GenerativeModel(cfg, sizes).eval()
    cuda = GenerativeModel(cfg, sizes, device=torch.device("cuda")).eval()
    cuda.load_state_dict(cpu.state_dict())
    batch = next(iter(sequence_loader(prepared, "pretrain_train", 16, shuffle=False)))
    reference = cpu.loss(batch)
    with autocast(precision, "cuda"):
        got = cuda.loss(to_device(batch.pin_memory(), torch.device("cuda")))
    for name in ("loss", "item_loss", "category_loss"):
        assert got[name].device.type == "cuda" and got[name].dtype == torch.float32
        assert rel(got[name], reference[name]) < rtol, (name, float(got[name]), float(reference[name]))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision, rtol", [("fp32", FP32_RTOL), ("bf16", BF16_RTOL)])
@pytest.mark.parametrize("name", ["dcn_v2", "mmoe", "tin", "gpsd"])
def test_cuda_gives_the_cpu_fp32_ctr_loss(name, precision, rtol):
    cpu = tiny_ranker(name, SYNTHETIC_VOCAB_SIZES, ("click", "rating5")).eval()
    cuda = copy.deepcopy(cpu).to("cuda")
    batch = make_synthetic_batch(64, torch.Generator().manual_seed(0), ("in_history", "parity"))
    reference = bce_per_task(cpu(batch), batch.labels)
    with autocast(precision, "cuda"):
        got = bce_per_task(cuda(to_device(batch, torch.device("cuda"))).float(), batch.labels.cuda())
    assert got.dtype == torch.float32
    for t in range(2):
        assert rel(got[t], reference[t]) < rtol, (t, got.tolist(), reference.tolist())


def _one_rank_cuda_group() -> DistributedContext:
    from hybrid.core.training import init_distributed

    assert not dist.is_initialized()
    return init_distributed(device="cuda", single_process_group=True)


def _table_devices(model: torch.nn.Module) -> set[str]:
    """Devices of the tables' storage: local shards of a sharded table, the tensor of a plain one."""
    from hybrid.core.tables import is_table_key

    devices = set()
    for key, value in model.state_dict().items():
        if is_table_key(key):
            shards = value.local_shards() if hasattr(value, "local_shards") else None
            devices |= {s.tensor.device.type for s in shards} if shards is not None else {value.device.type}
    return devices


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sharded_pretraining_steps_on_cuda(prepared, tmp_path, precision):
    ctx = _one_rank_cuda_group()
    try:
        optim = OptimConfig(lr=5e-3, sparse_lr=0.05, sparse_optimizer="adam")   # adam: FBGEMM's CUDA kernels take it
        cfg = PretrainTrainConfig(epochs=1, batch_size=16, max_len=MAX_LEN, max_steps=3, eval_every=0, log_every=1,
                                  checkpoint_every=0, optim=optim, progress=False, precision=precision)
        model = build_model(GenerativeModelConfig.tiny(), prepared.feature_map.vocab_sizes(), optim, seed=0, ctx=ctx,
                            shard=True)
        assert type(model).__name__ == "DistributedModelParallel" and _table_devices(model) == {"cuda"}
        loader = sequence_loader(prepared, "pretrain_train", 16, shuffle=True, pin=pin_memory(ctx.device))
        assert next(iter(loader)).features.values().is_pinned()
        evals = sequence_loader(prepared, "pretrain_eval", 16, shuffle=False, pin=True)
        result = pretrain_train(model, loader, evals, cfg, ctx=ctx, checkpoint_dir=tmp_path)
        assert result.step == 3 and math.isfinite(result.metrics["train/loss"])
        assert 0 <= result.metrics["eval/hr_at_10"] <= 1 and math.isfinite(result.metrics["eval/loss"])
        assert_all_fp32(checkpoint_dtypes(result.checkpoint), "model.", "dense_optim.state.", "sparse_optim.")
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sharded_ctr_steps_on_cuda(prepared, tmp_path, precision):
    ctx = _one_rank_cuda_group()
    try:
        optim = OptimConfig(lr=3e-3, sparse_lr=0.05, sparse_optimizer="adam")
        cfg = CTRTrainConfig(epochs=1, batch_size=16, max_history=H, max_steps=3, log_every=1, optim=optim,
                             progress=False, precision=precision, checkpoints_per_epoch=0)
        ranker = tiny_ranker("dcn_v2", prepared.feature_map.vocab_sizes())
        model = prepare_for_training(ranker, optim, ctx=ctx, shard=True)
        assert type(model).__name__ == "DistributedModelParallel" and _table_devices(model) == {"cuda"}
        loader = ctr_loader(prepared, ranker, "ctr_train", 16, shuffle=True, pin=True)
        assert next(iter(loader)).labels.is_pinned()
        valid = ctr_loader(prepared, ranker, "ctr_valid", 32, shuffle=False, pin=True)
        result = ctr_train(model, loader, valid, cfg, ctx=ctx, checkpoint_dir=tmp_path)
        assert result.step == 3 and math.isfinite(result.metrics["train/loss"])
        assert result.metrics["valid/samples"] > 0 and math.isfinite(result.metrics["valid/logloss"])
        assert_all_fp32(checkpoint_dtypes(latest_checkpoint(tmp_path / "last")), "model.", "dense_optim.state.",
                        "sparse_optim.")
    finally:
        dist.destroy_process_group()
