"""P1 + P2 + P5: pretraining throughput, fraction of peak, peak memory (BENCHMARKS.md).

For each size (default L4H64A4 and L4H256A4, LLaMA backbone), max_len 200, batch 128, one process with 2
threads, on protocol A's pretraining sequences of ml-1m-partial, training steps (forward + backward +
optimizers) of:

- **ours**: :class:`pretrain.GenerativeModel` — TorchRec ``EmbeddingCollection`` tables updated inside the
  backward pass (in-backward Adagrad), jagged batches from the length-bucketing loader, padded per batch
  to its longest sequence;
- **baseline**: the same model in plain PyTorch — ``nn.Embedding`` tables (dense gradients, Adagrad),
  every batch padded to ``max_len`` from a loader without bucketing, the same backbone module (causal
  SDPA) and the identical loss functions (``hybrid.pretrain.objectives``).

Timing alternates windows of the two, so machine noise hits both alike; each window is ``steps`` steps,
the figure is the median over ``repeats`` windows after warm-up. Events = non-padding tokens.

P2: model FLOPs of a step (matmuls of the backbone on real tokens — causal attention counted on the
lower triangle — plus the sampled-softmax and category logits; backward = 2x forward) per second, over
the FLOP/s of a large fp32 matmul measured in the same run with the same threads.

P5: peak resident memory (VmHWM) of a separate process that runs only one variant and size.

``--device cuda`` runs both variants on the GPU (batches moved there before timing, as they are gathered
before timing on CPU; timers read after ``torch.cuda.synchronize``; P5 adds the peak CUDA memory), and
``--precision bf16`` runs the forward pass and loss of both under bfloat16 autocast (``train.precision``:
tables, optimizer states and losses stay fp32). On CUDA the run also measures a large bf16 matmul and
reports ``mfu_bf16``: model FLOP/s over that measured bf16 peak (``fraction_of_peak`` stays the fraction
of the fp32 matmul peak, measured on the same device).

    python bench/pretrain_throughput.py --data runs/ml1m/last-item [--out bench/results/pretrain_throughput.json]
    python bench/pretrain_throughput.py --device cuda --precision bf16 --threads 8 --out bench/results/gpu/p1.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _device import (  # noqa: E402
    DEVICES,
    machine,
    matmul_peak,
    peak_cuda_mb,
    peak_rss_mb,
    resolve_device,
    synchronize,
)

from hybrid.core.backbones import BackboneConfig, build_backbone  # noqa: E402
from hybrid.core.backbones.llama import swiglu_hidden_dim  # noqa: E402
from hybrid.core.batch import SequenceBatch  # noqa: E402
from hybrid.core.feature_map import NUM_RESERVED_IDS, PAD_ID  # noqa: E402
from hybrid.core.precision import PRECISIONS, autocast  # noqa: E402
from hybrid.core.training import OptimConfig, apply_sparse_optimizer, dense_parameters  # noqa: E402
from hybrid.data.batching import SequenceBatchConverter, make_loader  # noqa: E402
from hybrid.data.store import load_prepared  # noqa: E402
from hybrid.pretrain import GenerativeModel, GenerativeModelConfig, ObjectiveConfig  # noqa: E402
from hybrid.pretrain.objectives import (  # noqa: E402
    full_softmax_loss,
    sample_uniform_negatives,
    sampled_softmax_loss,
)

FEATURES = ("item_id", "category", "action")


# ------------------------------------------------------------------------------------------- baseline

class PaddedBaseline(nn.Module):
    """The generative model in plain PyTorch: nn.Embedding tables, inputs padded to a fixed length.

    Same token (sum of item/category/action rows, PAD contributes zero), same backbone class, same
    objective functions and negatives as :meth:`pretrain.GenerativeModel.loss`.
    """

    def __init__(self, config: GenerativeModelConfig, vocab_sizes: dict[str, int]) -> None:
        super().__init__()
        self.config = config
        self.tables = nn.ModuleDict({f: nn.Embedding(vocab_sizes[f], config.table_dim, padding_idx=PAD_ID)
                                     for f in config.features})
        bound = config.init_std * 3 ** 0.5  # the same U(±std·√3) as the TorchRec tables
        with torch.no_grad():
            for table in self.tables.values():
                nn.init.uniform_(table.weight, -bound, bound)
                table.weight[PAD_ID] = 0.0
        self.backbone = build_backbone(config.backbone)
        self.n_items = vocab_sizes["item_id"]

    def loss(self, ids: dict[str, torch.Tensor], lengths: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        obj = self.config.objective
        b, t = ids["item_id"].shape
        x = sum(self.tables[f](ids[f]) for f in self.config.features)
        query = self.backbone(x, lengths)
        pos = torch.arange(t, device=lengths.device).unsqueeze(0)
        has_next = pos < (lengths.unsqueeze(1) - 1)
        nxt = {f: torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], 1) for f, v in ids.items()}
        mask = has_next & (nxt["item_id"] >= NUM_RESERVED_IDS)
        negatives = sample_uniform_negatives(b, obj.num_negatives, self.n_items, device=lengths.device,
                                             generator=generator)
        item_table = self.tables["item_id"].weight
        loss = sampled_softmax_loss(query, mask, nxt["item_id"], item_table[nxt["item_id"]], negatives,
                                    item_table[negatives], obj.temperature)
        cat_mask = has_next & (nxt["category"] >= NUM_RESERVED_IDS)
        cat = full_softmax_loss(query[cat_mask], nxt["category"][cat_mask], self.tables["category"].weight,
                                obj.temperature)
        return obj.item_loss_weight * loss + obj.category_loss_weight * cat


def padded_ids(batch: SequenceBatch, max_len: int) -> dict[str, torch.Tensor]:
    """A jagged batch → ``[B, max_len]`` right-padded ids per feature."""
    jts = batch.features.to_dict()
    b, device = batch.batch_size, batch.lengths.device
    valid = torch.arange(max_len, device=device).unsqueeze(0) < batch.lengths.unsqueeze(1)
    out = {}
    for f in FEATURES:
        ids = torch.zeros(b, max_len, dtype=torch.int64, device=device)
        ids[valid] = jts[f].values()
        out[f] = ids
    return out


# ------------------------------------------------------------------------------------------- FLOPs

def step_flops(config: GenerativeModelConfig, lengths: torch.Tensor, n_categories: int) -> float:
    """Model FLOPs of one training step on these sequences (forward x 3)."""
    d, layers = config.backbone.dim, config.backbone.num_layers
    hidden = swiglu_hidden_dim(d, config.backbone.ffn_multiple_of)
    n = lengths.to(torch.float64)
    tokens = float(n.sum())
    targets = float((n - 1).clamp(min=0).sum())
    per_token = 2 * (4 * d * d + 3 * d * hidden)                  # q, k, v, o + SwiGLU w1, w2, w3
    attention = float((2 * d * n * (n + 1)).sum())                # QKᵀ and AV on the causal triangle
    logits = 2 * targets * config.table_dim * (1 + config.objective.num_negatives + n_categories)
    forward = layers * (tokens * per_token + attention) + logits
    return 3 * forward


# ------------------------------------------------------------------------------------------- runners

class Runner:
    """One variant: ``step()`` runs one training step on the next batch; returns its real events."""

    def __init__(self, variant: str, config: GenerativeModelConfig, prepared, batch_size: int, max_len: int,
                 seed: int = 0, device: torch.device = torch.device("cpu"), precision: str = "fp32") -> None:
        torch.manual_seed(seed)
        self.variant, self.max_len, self.device, self.precision = variant, max_len, device, precision
        sizes = prepared.feature_map.vocab_sizes()
        optim = OptimConfig(lr=5e-3, sparse_lr=0.05, weight_decay=0.1)
        converter = SequenceBatchConverter(prepared, "pretrain_train", max_len=max_len, features=FEATURES)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        if variant == "ours":
            self.model = GenerativeModel(config, sizes, device=device)
            apply_sparse_optimizer([self.model.embeddings], optim)
            dense = dense_parameters(self.model)
            loader = make_loader(converter, batch_size, shuffle=True, seed=seed)            # bucketed
        else:
            self.model = PaddedBaseline(config, sizes).to(device)
            self.sparse = torch.optim.Adagrad(self.model.tables.parameters(), lr=optim.sparse_lr)
            dense = list(self.model.backbone.parameters())
            loader = make_loader(converter, batch_size, shuffle=True, seed=seed, pool_batches=1)  # no bucketing
        self.dense = dense
        self.optimizer = torch.optim.AdamW(dense, lr=optim.lr, weight_decay=optim.weight_decay)
        self.batches = list(loader)
        self.lengths = [b.lengths for b in self.batches]          # on CPU: FLOPs are counted without a sync
        if device.type != "cpu":
            self.batches = [b.to(device) for b in self.batches]
        self.position = 0

    def next_batch(self) -> tuple[SequenceBatch, torch.Tensor]:
        i = self.position % len(self.batches)
        self.position += 1
        return self.batches[i], self.lengths[i]

    def step(self) -> tuple[int, torch.Tensor]:
        batch, lengths = self.next_batch()
        if self.variant == "ours":
            with autocast(self.precision, self.device):
                loss = self.model.loss(batch, generator=self.generator)["loss"]
            loss.backward()                              # tables update here (in-backward Adagrad)
        else:
            with autocast(self.precision, self.device):
                loss = self.model.loss(padded_ids(batch, self.max_len), batch.lengths, self.generator)
            loss.backward()
            self.sparse.step()
            self.sparse.zero_grad(set_to_none=True)
        torch.nn.utils.clip_grad_norm_(self.dense, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return int(lengths.sum()), lengths


def model_config(size: str, kind: str, max_len: int, negatives: int) -> GenerativeModelConfig:
    backbone = BackboneConfig.from_size(size, kind=kind, max_len=max_len)
    return GenerativeModelConfig(backbone=backbone, features=FEATURES, objective=ObjectiveConfig(num_negatives=negatives))


def measure(args, prepared, size: str, peak: float, bf16_peak: float | None = None) -> dict:
    config = model_config(size, args.kind, args.max_len, args.negatives)
    n_categories = prepared.feature_map.vocab_sizes()["category"] - NUM_RESERVED_IDS
    device = resolve_device(args.device)
    runners = {v: Runner(v, config, prepared, args.batch_size, args.max_len, device=device, precision=args.precision)
               for v in ("ours", "baseline")}
    for runner in runners.values():
        for _ in range(args.warmup):
            runner.step()
    windows: dict[str, list[dict]] = {v: [] for v in runners}
    for _ in range(args.repeats):
        for variant, runner in runners.items():   # alternate: noise hits both alike
            events, flops = 0, 0.0
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                n, lengths = runner.step()
                events += n
                flops += step_flops(config, lengths, n_categories)
            synchronize(device)                       # CUDA: the window's kernels have run
            seconds = time.perf_counter() - start
            windows[variant].append({"events_per_s": events / seconds, "flops_per_s": flops / seconds,
                                     "seconds_per_step": seconds / args.steps})
    out = {"size": size, "kind": args.kind,
           "dense_params": runners["ours"].model.dense_parameter_count()}
    for variant, rows in windows.items():
        out[variant] = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        out[variant]["fraction_of_peak"] = out[variant]["flops_per_s"] / peak
        if bf16_peak is not None:
            out[variant]["mfu_bf16"] = out[variant]["flops_per_s"] / bf16_peak
        out[variant]["windows_events_per_s"] = [round(r["events_per_s"], 1) for r in rows]
    out["speedup"] = out["ours"]["events_per_s"] / out["baseline"]["events_per_s"]
    return out


def peak_memory_mb(args, variant: str, size: str) -> dict[str, float]:
    """Peak RSS (and on CUDA peak allocated device memory) of a fresh process running ``args.steps`` steps of
    one variant: ``{"peak_rss_mb": ...[, "peak_cuda_mb": ...]}``."""
    cmd = [sys.executable, __file__, "--data", args.data, "--memory-only", variant, "--sizes", size,
           "--kind", args.kind, "--threads", str(args.threads), "--batch-size", str(args.batch_size),
           "--max-len", str(args.max_len), "--negatives", str(args.negatives), "--steps", str(args.steps),
           "--device", args.device, "--precision", args.precision]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_only(args) -> None:
    prepared = load_prepared(args.data)
    device = resolve_device(args.device)
    runner = Runner(args.memory_only, model_config(args.sizes[0], args.kind, args.max_len, args.negatives),
                    prepared, args.batch_size, args.max_len, device=device, precision=args.precision)
    for _ in range(args.steps):
        runner.step()
    synchronize(device)
    out = {"peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        out["peak_cuda_mb"] = peak_cuda_mb(device)
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="runs/ml1m/last-item", help="prepared protocol-A directory")
    parser.add_argument("--sizes", nargs="+", default=["L4H64A4", "L4H256A4"])
    parser.add_argument("--kind", default="llama", choices=["llama"], help="GPSD's backbone (FLOPs are counted for it)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--negatives", type=int, default=1024, help="uniform negatives per sequence")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per variant")
    parser.add_argument("--device", default="cpu", choices=list(DEVICES), help="where both variants train")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                        help="bf16: forward + loss under bfloat16 autocast (tables, optimizer states, loss fp32)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "pretrain_throughput.json"))
    parser.add_argument("--memory-only", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_only:
        memory_only(args)
        return

    device = resolve_device(args.device)
    prepared = load_prepared(args.data)
    peak = matmul_peak(device)
    # MFU on CUDA: against the bf16 tensor-core peak measured here (a CPU's bf16 matmul, without AMX, is no peak)
    bf16_peak = matmul_peak(device, torch.bfloat16) if device.type == "cuda" else None
    results = []
    for size in args.sizes:
        row = measure(args, prepared, size, peak, bf16_peak)
        for variant in ("ours", "baseline"):
            row[variant].update(peak_memory_mb(args, variant, size))
        results.append(row)
    report = {"benchmark": "P1/P2/P5 pretraining throughput", "data": args.data,
              "date": time.strftime("%Y-%m-%d"), "machine": machine(device, torch.get_num_threads()),
              "torch": torch.__version__, "settings": {k: v for k, v in vars(args).items() if k != "memory_only"},
              "device": str(device), "precision": args.precision, "matmul_peak_gflops": peak / 1e9,
              "results": results}
    if bf16_peak is not None:
        report["bf16_matmul_peak_gflops"] = bf16_peak / 1e9
    where = f"{args.threads} threads" if device.type == "cpu" else str(device)
    print(f"fp32 matmul peak ({where}): {peak / 1e9:.1f} GFLOP/s"
          + (f"; bf16 matmul peak: {bf16_peak / 1e9:.1f} GFLOP/s" if bf16_peak is not None else ""))
    mfu = bf16_peak is not None
    print(f"{'size':10} {'variant':9} {'events/s':>10} {'s/step':>7} {'GFLOP/s':>8} {'of peak':>8} {'peak RSS':>9}"
          + (f" {'MFU bf16':>8} {'peak CUDA':>10}" if mfu else ""))
    for row in results:
        for variant in ("ours", "baseline"):
            r = row[variant]
            extra = ""
            if mfu:
                cuda_mb = r.get("peak_cuda_mb")
                extra = f" {r['mfu_bf16']:8.1%} " + (f"{cuda_mb:7.0f} MB" if cuda_mb is not None else f"{'-':>10}")
            print(f"{row['size']:10} {variant:9} {r['events_per_s']:10,.0f} {r['seconds_per_step']:7.3f} "
                  f"{r['flops_per_s'] / 1e9:8.2f} {r['fraction_of_peak']:8.1%} {r['peak_rss_mb']:7.0f} MB" + extra)
        print(f"{row['size']:10} ours / baseline events/s: {row['speedup']:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
