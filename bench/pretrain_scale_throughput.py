"""Issue 18.1, pretraining part: generative pretraining with a 4.2M-row item table, ours against plain PyTorch.

The scale issue's item table (4.2M rows, 64 wide — the width of L4H64A4) under the pretraining model of
``configs/pretrain_ml1m_last_item_llama.yaml`` (L4H64A4, batch 128, max_len 200, 1024 uniform negatives per
sequence, next-category loss). The sequences are ml-1m-partial's protocol-A pretraining batches (lengths,
categories, actions) with their item ids redrawn from a Zipf(1.0) popularity over the 4.2M rows, ranks
permuted as in ``bench/synth_events.py``; negatives are uniform over all 4.2M rows, so a batch touches
~140k distinct item rows. Variants, same model (same backbone and initial values), same batches, each padded
to its longest sequence (the same bucketed batches for all, so the figures isolate the tables):

- **ours (sharded, 1 rank)**: ``train.shard_tables: true`` — the tables in TorchRec's
  ``DistributedModelParallel`` on a 1-rank process group, FBGEMM kernels, the table optimizer fused into the
  backward pass over the batch's rows only (``--ours-optimizer``, default ``rowwise_adagrad``);
- **ours (unsharded)**: what ``hybrid pretrain`` runs in one process by default — TorchRec's unsharded
  ``EmbeddingCollection``, whose tables are ``nn.Embedding`` weights with dense gradients, stepped in backward
  by Adagrad (the config's ``optim.sparse_optimizer``);
- **dense AdamW**: plain PyTorch ``nn.Embedding`` tables, one ``AdamW`` over tables and backbone;
- **SparseAdam**: ``nn.Embedding(sparse=True)`` tables with ``torch.optim.SparseAdam``, ``AdamW`` for the rest.

Timing alternates windows of the variants; medians over ``--repeats`` windows after warm-up; ratios are ours
(sharded) over each other variant from the same run. Events = non-padding tokens. Peak RSS: a fresh process per
variant (VmHWM), tables included.

    python bench/pretrain_scale_throughput.py --data runs/ml1m/last-item [--items 4200000] [--threads 2]
        [--out bench/results/pretrain_scale_throughput.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _device import peak_rss_mb  # noqa: E402
from synth_events import redraw_ids, zipf_cdf  # noqa: E402

from hybrid.config import load_config  # noqa: E402
from hybrid.core.backbones import build_backbone  # noqa: E402
from hybrid.core.batch import SequenceBatch  # noqa: E402
from hybrid.core.feature_map import NUM_RESERVED_IDS, PAD_ID  # noqa: E402
from hybrid.core.training import (  # noqa: E402
    DEFAULT_SHARDING,
    apply_sparse_optimizer,
    dense_parameters,
    init_distributed,
    make_dense_optimizer,
    seed_everything,
    shard_model,
)
from hybrid.data.batching import SequenceBatchConverter, make_loader  # noqa: E402
from hybrid.data.store import load_prepared  # noqa: E402
from hybrid.jobs.pretrain import SEQUENCE_FEATURES, PretrainConfig  # noqa: E402
from hybrid.pretrain import GenerativeModel, GenerativeModelConfig  # noqa: E402
from hybrid.pretrain.objectives import full_softmax_loss, sample_uniform_negatives, sampled_softmax_loss  # noqa: E402
from hybrid.pretrain.trainer import build_model, unwrap  # noqa: E402

VARIANTS = ("ours_sharded", "ours_unsharded", "dense_adamw", "sparse_adam")
CONFIG = REPO / "configs" / "pretrain_ml1m_last_item_llama.yaml"


# ------------------------------------------------------------------------------------------- batches

def make_batches(args, prepared, features: list[str]) -> list[SequenceBatch]:
    """``args.batches`` bucketed pretraining batches with item ids redrawn over ``args.items`` rows."""
    conv = SequenceBatchConverter(prepared, "pretrain_train", max_len=args.max_len, features=features)
    batches = list(itertools.islice(make_loader(conv, args.batch_size, shuffle=True, seed=0), args.batches))
    rng = np.random.default_rng(0)
    cdf, perm = zipf_cdf(args.items, 1.0), rng.permutation(args.items)
    return [dataclasses.replace(b, features=redraw_ids(b.features, rng, cdf, perm, ("item_id",))) for b in batches]


def padded(batch: SequenceBatch, features: list[str]) -> dict[str, torch.Tensor]:
    """``[B, T]`` right-padded ids per feature, ``T`` = the batch's longest sequence."""
    jts = batch.features.to_dict()
    t = int(batch.lengths.max())
    valid = torch.arange(t).unsqueeze(0) < batch.lengths.unsqueeze(1)
    out = {}
    for f in features:
        ids = torch.zeros(batch.batch_size, t, dtype=torch.int64)
        ids[valid] = jts[f].values()
        out[f] = ids
    return out


# ------------------------------------------------------------------------------------------- plain PyTorch

class PlainGenerativeModel(nn.Module):
    """The generative model in plain PyTorch: ``nn.Embedding`` tables (``sparse`` gradients or dense), every
    lookup through the module (so sparse tables get sparse gradients), the same backbone, objective functions
    and negatives as :meth:`pretrain.GenerativeModel.loss`."""

    def __init__(self, config: GenerativeModelConfig, tables: dict[str, torch.Tensor], sparse: bool) -> None:
        super().__init__()
        self.config = config
        self.tables = nn.ModuleDict({f: nn.Embedding.from_pretrained(w.clone(), freeze=False, sparse=sparse,
                                                                     padding_idx=PAD_ID)
                                     for f, w in tables.items()})
        self.backbone = build_backbone(config.backbone)
        self.n_items = tables["item_id"].size(0)

    def loss(self, ids: dict[str, torch.Tensor], lengths: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        obj = self.config.objective
        b, t = ids["item_id"].shape
        query = self.backbone(sum(self.tables[f](ids[f]) for f in self.config.features), lengths)
        has_next = torch.arange(t).unsqueeze(0) < (lengths.unsqueeze(1) - 1)
        nxt = {f: torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], 1) for f, v in ids.items()}
        mask = has_next & (nxt["item_id"] >= NUM_RESERVED_IDS)
        negatives = sample_uniform_negatives(b, obj.num_negatives, self.n_items, generator=generator)
        items = self.tables["item_id"]
        loss = sampled_softmax_loss(query, mask, nxt["item_id"], items(nxt["item_id"]), negatives, items(negatives),
                                    obj.temperature)
        cat_mask = has_next & (nxt["category"] >= NUM_RESERVED_IDS)
        categories = self.tables["category"]
        classes = categories(torch.arange(categories.num_embeddings))
        cat = full_softmax_loss(query[cat_mask], nxt["category"][cat_mask], classes, obj.temperature)
        return obj.item_loss_weight * loss + obj.category_loss_weight * cat


# ------------------------------------------------------------------------------------------- variants

def job_config(args) -> PretrainConfig:
    return load_config(PretrainConfig, args.config, [f"data={args.data}", f"train.batch_size={args.batch_size}",
                                                     f"train.max_len={args.max_len}"])


class Runner:
    """One variant: ``train_step()`` on the next batch; returns its real events."""

    def __init__(self, variant: str, cfg: PretrainConfig, model_cfg: GenerativeModelConfig, sizes: dict[str, int],
                 batches: list[SequenceBatch], args) -> None:
        optim = cfg.train.optim
        self.variant, self.batches, self.position = variant, batches, 0
        self.features = list(model_cfg.features)
        self.generator = torch.Generator().manual_seed(0)
        self.tables_optimizer = None
        if variant in ("ours_sharded", "ours_unsharded"):
            if variant == "ours_sharded":   # build_model(shard=True) with the tables' initial values of the others
                ctx = init_distributed(single_process_group=True)
                optim = dataclasses.replace(optim, sparse_optimizer=args.ours_optimizer)
                seed_everything(0)
                model = GenerativeModel(model_cfg, sizes)
                apply_sparse_optimizer([model.embeddings], optim)
                self.model = shard_model(model, ctx, DEFAULT_SHARDING)
            else:
                self.model = build_model(model_cfg, sizes, optim, seed=0)
            self.core = unwrap(self.model)
            self.dense = dense_parameters(self.model)
            self.optimizer, _ = make_dense_optimizer(self.model, optim, total_steps=10**9)
        else:
            reference = build_model(model_cfg, sizes, optim, seed=0)   # the same initial values as ours
            tables = {f: unwrap(reference).feature_table(f) for f in self.features}
            self.model = PlainGenerativeModel(model_cfg, tables, sparse=variant == "sparse_adam")
            self.model.backbone.load_state_dict(unwrap(reference).backbone.state_dict())
            del reference
            self.dense = list(self.model.backbone.parameters())
            table_params = list(self.model.tables.parameters())
            if variant == "dense_adamw":
                self.optimizer = torch.optim.AdamW(list(self.model.parameters()), lr=optim.lr, betas=optim.betas,
                                                   weight_decay=optim.weight_decay)
            else:
                self.tables_optimizer = torch.optim.SparseAdam(table_params, lr=optim.sparse_lr or optim.lr)
                self.optimizer = torch.optim.AdamW(self.dense, lr=optim.lr, betas=optim.betas,
                                                   weight_decay=optim.weight_decay)
            self.padded = [padded(b, self.features) for b in batches]
        self.grad_clip = optim.grad_clip
        self.model.train()

    def train_step(self) -> int:
        i = self.position % len(self.batches)
        self.position += 1
        batch = self.batches[i]
        if self.variant.startswith("ours"):
            loss = self.core.loss(batch, generator=self.generator)["loss"]
        else:
            loss = self.model.loss(self.padded[i], batch.lengths, self.generator)
        loss.backward()                                  # ours: the tables update here
        if self.tables_optimizer is not None:
            self.tables_optimizer.step()
            self.tables_optimizer.zero_grad(set_to_none=True)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.dense, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return int(batch.lengths.sum())


def setup(args):
    prepared = load_prepared(args.data)
    cfg = job_config(args)
    fm = prepared.feature_map
    available = [f for f in SEQUENCE_FEATURES if f in prepared.events and f in fm]
    model_cfg = cfg.model.build(cfg.train.max_len, available)
    sizes = dict(fm.vocab_sizes())
    sizes["item_id"] = args.items + NUM_RESERVED_IDS
    batches = make_batches(args, prepared, list(model_cfg.features))
    return cfg, model_cfg, sizes, batches


@torch.no_grad()
def first_losses(runners: dict[str, Runner]) -> dict[str, float]:
    """Every variant's loss on the first batch with the same negatives, before training (eval mode)."""
    out = {}
    for name, r in runners.items():
        r.model.eval()
        r.generator.manual_seed(123)
        batch = r.batches[0]
        if name.startswith("ours"):
            out[name] = float(r.core.loss(batch, generator=r.generator)["loss"])
        else:
            out[name] = float(r.model.loss(r.padded[0], batch.lengths, r.generator))
        r.model.train()
        r.generator.manual_seed(0)
    return out


def measure(args) -> dict:
    cfg, model_cfg, sizes, batches = setup(args)
    distinct = [int(torch.unique(b.features["item_id"].values()).numel()) for b in batches]
    runners = {}
    for variant in args.variants:
        started = time.perf_counter()
        runners[variant] = Runner(variant, cfg, model_cfg, sizes, batches, args)
        print(f"  {variant}: built in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    losses = first_losses(runners)
    spread = max(losses.values()) - min(losses.values())
    if spread > 1e-3:
        raise AssertionError(f"the variants are not the same model: first-batch losses {losses}")
    for runner in runners.values():
        for _ in range(args.warmup):
            runner.train_step()
    windows: dict[str, list[float]] = {v: [] for v in runners}
    for r in range(args.repeats):
        for variant, runner in runners.items():     # alternate: noise hits every variant alike
            start, events = time.perf_counter(), 0
            for _ in range(args.steps):
                events += runner.train_step()
            windows[variant].append(events / (time.perf_counter() - start))
        print(f"  window {r + 1}: " + ", ".join(f"{v} {w[-1]:,.0f}" for v, w in windows.items()), file=sys.stderr,
              flush=True)
    out = {"item_rows": sizes["item_id"], "dim": model_cfg.table_dim, "size": model_cfg.backbone.size_name,
           "distinct_sequence_item_rows_per_batch": statistics.median(distinct),
           "first_batch_loss_spread": spread}
    for variant, w in windows.items():
        out[variant] = {"events_per_s": statistics.median(w), "windows": [round(x, 1) for x in w]}
    if "ours_sharded" in windows:
        for variant in windows:
            if variant != "ours_sharded":
                out[f"ratio_ours_sharded_over_{variant}"] = (out["ours_sharded"]["events_per_s"]
                                                             / out[variant]["events_per_s"])
    return out


def _child_args(args) -> list[str]:
    return [sys.executable, __file__, "--data", args.data, "--config", str(args.config), "--threads", str(args.threads),
            "--batch-size", str(args.batch_size), "--max-len", str(args.max_len), "--steps", str(args.steps),
            "--batches", str(args.batches), "--items", str(args.items), "--ours-optimizer", args.ours_optimizer,
            "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--variants", *args.variants]


def variant_peak_rss_mb(args, variant: str) -> float:
    done = subprocess.run([*_child_args(args), "--memory-only", variant], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def memory_only(args) -> None:
    cfg, model_cfg, sizes, batches = setup(args)
    runner = Runner(args.memory_only, cfg, model_cfg, sizes, batches, args)
    for _ in range(args.warmup + args.steps):
        runner.train_step()
    print(peak_rss_mb())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="runs/ml1m/last-item", help="prepared protocol-A (last-item) directory")
    parser.add_argument("--config", default=str(CONFIG), help="the pretraining config (model and optimizers)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--items", type=int, default=4_200_000, help="item table rows")
    parser.add_argument("--ours-optimizer", default="rowwise_adagrad", choices=["rowwise_adagrad", "adagrad", "sgd"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=8, help="distinct batches cycled through")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per variant")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS processes")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "pretrain_scale_throughput.json"))
    parser.add_argument("--memory-only", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_only:
        memory_only(args)
        return

    row = measure(args)
    if not args.no_memory:
        for variant in args.variants:
            row[variant]["peak_rss_mb"] = variant_peak_rss_mb(args, variant)
    report = {"benchmark": "18.1 pretraining throughput at industrial table sizes", "data": args.data,
              "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "settings": {k: str(v) if isinstance(v, Path) else v
                                                      for k, v in vars(args).items() if k != "memory_only"},
              "result": row}
    for variant in args.variants:
        r = row[variant]
        rss = f"{r['peak_rss_mb']:7.0f} MB" if "peak_rss_mb" in r else ""
        print(f"{row['size']:8} {variant:15} {r['events_per_s']:10,.0f} events/s {rss}")
    print("  " + ", ".join(f"{k}: {v:.2f}x" for k, v in row.items() if k.startswith("ratio_")))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
