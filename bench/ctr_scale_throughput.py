"""Issue 18.1: CTR training throughput at industrial table sizes, ours against what a user would write instead.

The Taobao-scale tables of the scale issue — an item table of 4.2M rows and a user table of 988k, 64 wide —
under the ml-1m-partial protocol-B models (``configs/finetune_ml1m_ratings_{dcn_v2,tin}.yaml``, embedding width
set to 64). The batches are ml-1m-partial's (labels, history lengths, genres, user fields), with the ids of the
large tables redrawn: items (candidate and history) from a Zipf(1.0) popularity over the 4.2M rows, ranks
permuted as in ``bench/synth_events.py`` (a realistic count of distinct rows per batch, not ML-1M's 3.7k), users
uniformly over the 988k rows. Variants, same model (same dense modules and initial values), same batches:

- **ours (sharded, 1 rank)**: the tables in TorchRec's ``DistributedModelParallel`` on a 1-rank process group —
  FBGEMM table-batched kernels, the table optimizer fused into the backward pass over the rows of the batch only
  (``--ours-optimizer``, default ``rowwise_adagrad``; FBGEMM's CPU kernels take adagrad / rowwise_adagrad / sgd);
- **ours (unsharded)**: what ``hybrid finetune`` runs in one process today — TorchRec's unsharded modules, whose
  tables are ``nn.Embedding`` weights with dense gradients, stepped in backward by ``torch.optim.Adam``;
- **dense AdamW**: plain PyTorch ``nn.Embedding`` tables (padded ids), one ``AdamW`` over tables and dense layers;
- **SparseAdam**: ``nn.Embedding(sparse=True)`` tables with ``torch.optim.SparseAdam``, ``AdamW`` for the rest.

Timing alternates windows of the variants (noise hits all alike); the figure is the median over ``--repeats``
windows after warm-up; ratios are ours (sharded) over each other variant, from the same run. Peak RSS: a fresh
process per variant (VmHWM), the tables included.

    python bench/ctr_scale_throughput.py --data runs/ml1m/ratings [--models dcn_v2 tin] [--threads 2]
        [--items 4200000] [--users 988000] [--out bench/results/ctr_scale_throughput.json]
"""
from __future__ import annotations

import argparse
import copy
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
from ctr_throughput import CONFIGS, PlainFeatures, pad_batch, timed, train_step  # noqa: E402
from synth_events import redraw_ids, zipf_cdf  # noqa: E402

from hybrid.config import load_config  # noqa: E402
from hybrid.core.batch import CTRBatch  # noqa: E402
from hybrid.core.feature_map import NUM_RESERVED_IDS  # noqa: E402
from hybrid.core.tables import embedding_modules  # noqa: E402
from hybrid.core.training import (  # noqa: E402
    DEFAULT_SHARDING,
    OptimConfig,
    apply_sparse_optimizer,
    dense_parameters,
    init_distributed,
    make_dense_optimizer,
    shard_model,
)
from hybrid.ctr_models import build_ranker  # noqa: E402
from hybrid.ctr_models.trainer import prepare_for_training, unwrap  # noqa: E402
from hybrid.data.batching import CTRBatchConverter, make_loader  # noqa: E402
from hybrid.data.store import load_prepared  # noqa: E402
from hybrid.jobs.finetune import FinetuneConfig, ctr_vocab_sizes  # noqa: E402

VARIANTS = ("ours_sharded", "ours_unsharded", "dense_adamw", "sparse_adam")
ITEM_KEYS, USER_KEYS = ("item_id", "hist_item_id"), ("user_id",)


# ------------------------------------------------------------------------------------------- batches

def make_batches(args, prepared, fields, tasks) -> list[CTRBatch]:
    conv = CTRBatchConverter(prepared, "ctr_train", max_history=args.max_history, fields=fields, task_names=tasks)
    batches = list(itertools.islice(make_loader(conv, args.batch_size, shuffle=True, seed=0), args.batches))
    rng = np.random.default_rng(0)
    cdf, perm = zipf_cdf(args.items, 1.0), rng.permutation(args.items)
    return [dataclasses.replace(b, sparse=redraw_ids(b.sparse, rng, cdf, perm, ITEM_KEYS, args.users, USER_KEYS))
            for b in batches]


# ------------------------------------------------------------------------------------------- variants

def model_config(name: str, args):
    cfg = load_config(FinetuneConfig, REPO / CONFIGS[name], [f"train.max_history={args.max_history}",
                                                            f"ranker.config.features.embedding_dim={args.dim}"])
    return cfg


def vocab_sizes(prepared, args) -> dict[str, int]:
    sizes = ctr_vocab_sizes(prepared.feature_map)
    sizes["item_id"] = args.items + NUM_RESERVED_IDS
    sizes["user_id"] = args.users + NUM_RESERVED_IDS
    return sizes


class Runner:
    """One variant of one model: ``train_step()`` on the next batch."""

    def __init__(self, variant: str, name: str, prepared, batches: list[CTRBatch], args) -> None:
        cfg = model_config(name, args)
        optim: OptimConfig = cfg.train.optim
        torch.manual_seed(0)
        model = build_ranker(name, cfg.ranker_config(), vocab_sizes(prepared, args), tuple(cfg.task_names))
        self.variant, self.grad_clip, self.position = variant, optim.grad_clip, 0
        self.tables_optimizer = None
        if variant in ("ours_sharded", "ours_unsharded"):
            if variant == "ours_sharded":  # prepare_for_training's sharded path, on a 1-rank process group
                ctx = init_distributed(single_process_group=True)
                sharded = dataclasses.replace(optim, sparse_optimizer=args.ours_optimizer)
                apply_sparse_optimizer(embedding_modules(model), sharded)
                self.model = shard_model(model, ctx, DEFAULT_SHARDING)
            else:
                self.model = prepare_for_training(model, optim)           # in-backward Adam, dense table grads
            self.forward = unwrap(self.model)
            self.batches = batches
            self.optimizer, _ = make_dense_optimizer(self.model, optim, total_steps=10**9)
            self.dense = dense_parameters(self.model)
        else:
            plain = copy.deepcopy(model)
            features = PlainFeatures(model.input.features if hasattr(model, "input") else model.features)
            if variant == "sparse_adam":
                features.tables = nn.ModuleDict({k: nn.Embedding.from_pretrained(t.weight.detach(), freeze=False,
                                                                                 sparse=True)
                                                 for k, t in features.tables.items()})
            if hasattr(plain, "input"):
                plain.input.features = features
            else:
                plain.features = features
            del model
            self.model = self.forward = plain
            tables = list(features.tables.parameters())
            table_ids = {id(p) for p in tables}
            self.dense = [p for p in plain.parameters() if id(p) not in table_ids]
            if variant == "dense_adamw":
                self.optimizer = torch.optim.AdamW(list(plain.parameters()), lr=optim.lr, betas=optim.betas,
                                                   weight_decay=optim.weight_decay)
            else:
                self.tables_optimizer = torch.optim.SparseAdam(tables, lr=optim.sparse_lr or optim.lr)
                self.optimizer = torch.optim.AdamW(self.dense, lr=optim.lr, betas=optim.betas,
                                                   weight_decay=optim.weight_decay)
            spec = features.spec
            self.batches = [pad_batch(b, spec) for b in batches]
        self.model.train()

    def train_step(self) -> int:
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return train_step(self.forward, batch, self.optimizer, self.tables_optimizer, self.dense, self.grad_clip)


@torch.no_grad()
def same_logits(runners: dict[str, Runner]) -> float:
    """Max |logit difference| between the variants on their first batch, before any training (eval mode)."""
    logits = []
    for runner in runners.values():
        runner.forward.eval()
        logits.append(runner.forward(runner.batches[0]))
        runner.forward.train()
    return max((float((x - logits[0]).abs().max()) for x in logits[1:]), default=0.0)


def distinct_rows(batches: list[CTRBatch]) -> dict[str, float]:
    """Median distinct item / user rows a batch touches (what a sparse update has to write)."""
    out = {}
    for key in ("item_id", "hist_item_id", "user_id"):
        out[key] = statistics.median(int(torch.unique(b.sparse[key].values()).numel()) for b in batches)
    both = [int(torch.unique(torch.cat([b.sparse["item_id"].values(), b.sparse["hist_item_id"].values()])).numel())
            for b in batches]
    out["item_table"] = statistics.median(both)
    return out


# ------------------------------------------------------------------------------------------- measuring

def measure(args, prepared, name: str) -> dict:
    cfg = model_config(name, args)
    probe = build_ranker(name, cfg.ranker_config(), {k: min(v, 10) for k, v in vocab_sizes(prepared, args).items()},
                         tuple(cfg.task_names))
    batches = make_batches(args, prepared, list(probe.spec.kjt_keys), tuple(cfg.task_names))
    del probe
    runners = {}
    for variant in args.variants:
        started = time.perf_counter()
        runners[variant] = Runner(variant, name, prepared, batches, args)
        print(f"  {name} {variant}: built in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    diff = same_logits(runners)
    if diff > 1e-4:
        raise AssertionError(f"{name}: the variants are not the same model (max logit difference {diff:.2e})")
    for runner in runners.values():
        for _ in range(args.warmup):
            runner.train_step()
    windows: dict[str, list[float]] = {v: [] for v in runners}
    for repeat in range(args.repeats):
        for variant, runner in runners.items():       # alternate: noise hits every variant alike
            windows[variant].append(timed(lambda i: runner.train_step(), args.steps))
        print(f"  {name} window {repeat + 1}/{args.repeats}: "
              + ", ".join(f"{v} {w[-1]:,.0f}" for v, w in windows.items()), file=sys.stderr, flush=True)
    out: dict = {"model": name, "max_logit_diff_at_init": diff, "distinct_rows_per_batch": distinct_rows(batches),
                 "table_rows": {"item_id": args.items, "user_id": args.users}, "dim": args.dim}
    for variant, w in windows.items():
        out[variant] = {"train_samples_per_s": statistics.median(w), "windows": [round(x, 1) for x in w]}
    if "ours_sharded" in windows:
        for variant in windows:
            if variant != "ours_sharded":
                out[f"ratio_ours_sharded_over_{variant}"] = (out["ours_sharded"]["train_samples_per_s"]
                                                             / out[variant]["train_samples_per_s"])
    return out


def _child_args(args, name: str) -> list[str]:
    return [sys.executable, __file__, "--data", args.data, "--models", name, "--threads", str(args.threads),
            "--batch-size", str(args.batch_size), "--max-history", str(args.max_history), "--steps", str(args.steps),
            "--batches", str(args.batches), "--items", str(args.items), "--users", str(args.users),
            "--dim", str(args.dim), "--ours-optimizer", args.ours_optimizer, "--warmup", str(args.warmup),
            "--repeats", str(args.repeats), "--variants", *args.variants]


def measure_in_subprocess(args, name: str) -> dict:
    """:func:`measure` of one model in a fresh process (its progress lines pass through)."""
    done = subprocess.run([*_child_args(args, name), "--measure-only"], stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def variant_peak_rss_mb(args, variant: str, name: str) -> float:
    cmd = [*_child_args(args, name), "--memory-only", variant]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def memory_only(args) -> None:
    prepared = load_prepared(args.data)
    cfg = model_config(args.models[0], args)
    probe = build_ranker(args.models[0], cfg.ranker_config(),
                         {k: min(v, 10) for k, v in vocab_sizes(prepared, args).items()}, tuple(cfg.task_names))
    batches = make_batches(args, prepared, list(probe.spec.kjt_keys), tuple(cfg.task_names))
    runner = Runner(args.memory_only, args.models[0], prepared, batches, args)
    for _ in range(args.warmup + args.steps):
        runner.train_step()
    print(peak_rss_mb())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="runs/ml1m/ratings", help="prepared protocol-B (ratings) directory")
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--items", type=int, default=4_200_000, help="item table rows")
    parser.add_argument("--users", type=int, default=988_000, help="user table rows")
    parser.add_argument("--dim", type=int, default=64, help="embedding width of every table")
    parser.add_argument("--ours-optimizer", default="rowwise_adagrad", choices=["rowwise_adagrad", "adagrad", "sgd"])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--max-history", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=10, help="distinct batches cycled through")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per variant")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS processes")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "ctr_scale_throughput.json"))
    parser.add_argument("--memory-only", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_only:
        memory_only(args)
        return
    if args.measure_only:
        print(json.dumps(measure(args, load_prepared(args.data), args.models[0])))
        return

    results = []
    for name in args.models:
        row = measure_in_subprocess(args, name)   # a fresh process per model: four copies of 4.2M-row tables each
        if not args.no_memory:
            for variant in args.variants:
                row[variant]["peak_rss_mb"] = variant_peak_rss_mb(args, variant, name)
        results.append(row)
    report = {"benchmark": "18.1 CTR training throughput at industrial table sizes", "data": args.data,
              "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "settings": {k: v for k, v in vars(args).items() if k != "memory_only"},
              "results": results}
    for row in results:
        for variant in args.variants:
            r = row[variant]
            rss = f"{r['peak_rss_mb']:7.0f} MB" if "peak_rss_mb" in r else ""
            print(f"{row['model']:7} {variant:15} {r['train_samples_per_s']:10,.0f} samples/s {rss}")
        print("  " + ", ".join(f"{k}: {v:.2f}x" for k, v in row.items() if k.startswith("ratio_")))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
