"""P3 + P5: CTR training and inference throughput, and peak memory, of DCN-v2 and TIN (BENCHMARKS.md).

On protocol B (``ratings``) of ml-1m-partial, with the example configs' models
(``configs/finetune_ml1m_ratings_{dcn_v2,tin}.yaml``: batch 1024, history window 50), one process:

- **ours**: the built-in ranker — TorchRec ``EmbeddingCollection`` / ``EmbeddingBagCollection`` tables fed
  by a ``KeyedJaggedTensor`` (only real ids are looked up; the history is padded after the lookup), the
  tables' optimizer applied inside the backward pass, the train step of ``hybrid.ctr_models.trainer``;
- **baseline**: the same model in plain PyTorch — ``nn.Embedding`` tables (dense gradients, a
  ``torch.optim`` step) looking up ids padded to ``max_history`` (history) and to the batch's longest bag
  (genres), then the *same* dense modules (a deep copy of the ranker's cross network / attention / MLP /
  heads, same initial weights) and the same loss. Before timing, both produce the same logits on a batch.

Both get the same batches (converted before timing: the model step is measured, not the data loader).
Training: forward + backward + optimizers per ``batch_size`` samples; inference: ``eval()`` forward under
``no_grad`` over test batches of ``eval_batch_size``. Timing alternates windows of the two variants, so
machine noise hits both alike; the figure is the median over ``repeats`` windows after warm-up.

P5: peak resident memory (VmHWM) of a separate process that runs only one variant of one model (train
and inference windows).

``--device cuda`` runs both variants on the GPU (the converted batches moved there before timing; timers
read after ``torch.cuda.synchronize``; P5 adds the peak CUDA memory); ``--precision bf16`` runs the forward
passes (and the loss) under bfloat16 autocast as ``train.precision: bf16`` does (tables, optimizer states,
logits and BCE fp32). Every run counts the matmul FLOPs of a training and of an inference step
(``torch.utils.flop_counter`` over the warm-up steps: per sample, the same for both variants); on CUDA it
also measures a large bf16 matmul and reports ``train_mfu_bf16`` / ``infer_mfu_bf16`` against it.

    python bench/ctr_throughput.py --data runs/ml1m/ratings [--threads 2] [--out bench/results/ctr_throughput.json]
    python bench/ctr_throughput.py --device cuda --precision bf16 --out bench/results/gpu/p3.json
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

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

from hybrid.config import load_config  # noqa: E402
from hybrid.core.batch import CTRBatch  # noqa: E402
from hybrid.core.feature_map import PAD_ID  # noqa: E402
from hybrid.core.jagged import jagged_to_padded, lengths_to_mask  # noqa: E402
from hybrid.core.precision import PRECISIONS, autocast  # noqa: E402
from hybrid.core.training import DistributedContext, OptimConfig, dense_parameters, make_dense_optimizer  # noqa: E402
from hybrid.ctr_models.features import (  # noqa: E402
    HISTORY_PREFIX,
    CTRFeatures,
    CTRInputs,
    table_name,
)
from hybrid.ctr_models.trainer import bce_per_task, prepare_for_training  # noqa: E402
from hybrid.data.batching import CTRBatchConverter, make_loader  # noqa: E402
from hybrid.data.store import load_prepared  # noqa: E402
from hybrid.jobs.finetune import FinetuneConfig, build_model  # noqa: E402

CONFIGS = {"dcn_v2": "configs/finetune_ml1m_ratings_dcn_v2.yaml", "tin": "configs/finetune_ml1m_ratings_tin.yaml"}


# ------------------------------------------------------------------------------------------- baseline

@dataclasses.dataclass
class PaddedBatch:
    """A CTR batch as plain padded tensors (what a plain-PyTorch pipeline feeds its model)."""

    ids: dict[str, torch.Tensor]                          # single-valued field → [B]
    bags: dict[str, tuple[torch.Tensor, torch.Tensor]]    # multi-valued field → ([B, G] ids, [B, G] mask)
    history: dict[str, torch.Tensor]                      # base feature → [B, T] ids (0 = padding)
    mask: torch.Tensor                                    # [B, T]
    history_timestamps: torch.Tensor                      # [B, T]
    timestamps: torch.Tensor
    dense: torch.Tensor
    labels: torch.Tensor
    task_names: tuple[str, ...]

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> PaddedBatch:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device)

        return dataclasses.replace(
            self, ids={k: move(v) for k, v in self.ids.items()},
            bags={k: (move(i), move(m)) for k, (i, m) in self.bags.items()},
            history={k: move(v) for k, v in self.history.items()}, mask=move(self.mask),
            history_timestamps=move(self.history_timestamps), timestamps=move(self.timestamps),
            dense=move(self.dense), labels=move(self.labels))


def pad_batch(batch: CTRBatch, spec) -> PaddedBatch:
    """The same samples as ``batch``, padded (histories to ``spec.max_len``, most recent events kept)."""
    kjt = batch.sparse.to_dict()
    ids = {f: kjt[f].values() for f in spec.single_fields}
    bags = {}
    for f in spec.multi_fields:
        width = max(1, int(kjt[f].lengths().max()))
        bags[f] = (jagged_to_padded(kjt[f].values(), kjt[f].lengths(), width, keep="first"),
                   lengths_to_mask(kjt[f].lengths(), width))
    history, mask = {}, None
    for f in spec.history_fields:
        jt = kjt[HISTORY_PREFIX + f]
        history[f] = jagged_to_padded(jt.values(), jt.lengths(), spec.max_len, keep="recent")
    lengths = kjt[HISTORY_PREFIX + spec.history_fields[0]].lengths()
    mask = lengths_to_mask(lengths, spec.max_len)
    hist_ts = jagged_to_padded(batch.hist_timestamps, lengths, spec.max_len, keep="recent")
    return PaddedBatch(ids, bags, history, mask, hist_ts, batch.timestamps, batch.dense, batch.labels,
                       batch.task_names)


class PlainFeatures(nn.Module):
    """``CTRFeatures`` in plain PyTorch: one ``nn.Embedding`` per table, lookups on padded ids.

    Built from a ``CTRFeatures`` (same tables, same initial values); returns the same ``CTRInputs``, so the
    ranker's dense modules run unchanged on top.
    """

    def __init__(self, features: CTRFeatures) -> None:
        super().__init__()
        self.spec = features.spec
        weights = {}
        if features.ec is not None:
            weights.update({name: emb.weight for name, emb in features.ec.embeddings.items()})
        if features.ebc is not None:
            weights.update({name: bag.weight for name, bag in features.ebc.embedding_bags.items()})
        self.tables = nn.ModuleDict({name: nn.Embedding.from_pretrained(w.detach().clone(), freeze=False)
                                     for name, w in weights.items()})

    def embed(self, key: str, ids: torch.Tensor) -> torch.Tensor:
        # PAD ids contribute zero, as in CTRFeatures
        return self.tables[table_name(key)](ids) * (ids != PAD_ID).unsqueeze(-1).to(torch.float32)

    def forward(self, batch: PaddedBatch) -> CTRInputs:
        spec = self.spec
        fields = [self.embed(f, batch.ids[f]) for f in spec.single_fields]
        for f in spec.multi_fields:
            ids, mask = batch.bags[f]
            m = mask.unsqueeze(-1).to(torch.float32)
            fields.append((self.tables[table_name(f)](ids) * m).sum(1) / m.sum(1).clamp(min=1.0))
        target = torch.stack([self.embed(f, batch.ids[f]) for f in spec.target_fields]).sum(0)
        by_field = {f: self.embed(f, batch.history[f]) for f in spec.history_fields}
        history = torch.stack(list(by_field.values())).sum(0)
        return CTRInputs(fields=torch.stack(fields, 1), field_names=spec.single_fields + spec.multi_fields,
                         target=target, history=history, history_by_field=by_field, mask=batch.mask,
                         lengths=batch.mask.sum(1), history_timestamps=batch.history_timestamps,
                         timestamps=batch.timestamps, dense=batch.dense.float())


def plain_copy(model: nn.Module) -> nn.Module:
    """The ranker with its TorchRec features replaced by :class:`PlainFeatures` (dense modules deep-copied)."""
    plain = copy.deepcopy(model)
    if hasattr(plain, "input"):            # DCN-v2 / MoE: FlatInput owns the features
        plain.input.features = PlainFeatures(model.input.features)
    else:                                  # TIN
        plain.features = PlainFeatures(model.features)
    return plain


# ------------------------------------------------------------------------------------------- runners

class Runner:
    """One variant of one model: ``train_step()`` and ``infer_step()`` on the next prepared batch."""

    def __init__(self, variant: str, name: str, prepared, args, seed: int = 0) -> None:
        cfg = load_config(FinetuneConfig, REPO / CONFIGS[name], [f"train.seed={seed}",
                                                                 f"train.max_history={args.max_history}"])
        model = build_model(cfg, prepared.feature_map)
        optim: OptimConfig = cfg.train.optim
        fields = list(model.spec.kjt_keys)
        tasks = tuple(cfg.task_names)
        train_conv = CTRBatchConverter(prepared, "ctr_train", max_history=args.max_history, fields=fields,
                                       task_names=tasks)
        test_conv = CTRBatchConverter(prepared, "ctr_test", max_history=args.max_history, fields=fields,
                                      task_names=tasks)
        train_batches = list(itertools.islice(make_loader(train_conv, args.batch_size, shuffle=True, seed=seed),
                                              args.batches))
        test_batches = list(itertools.islice(make_loader(test_conv, args.eval_batch_size, shuffle=False),
                                             args.batches))
        self.variant, self.precision = variant, args.precision
        self.device = device = resolve_device(args.device)
        if variant == "ours":
            # in-backward table optimizer; on CUDA the ranker moves there first
            self.model = prepare_for_training(model, optim, ctx=DistributedContext(device=device))
            self.tables_optimizer = None
            self.train_batches, self.test_batches = train_batches, test_batches
        else:
            self.model = plain_copy(model).to(device)
            spec = model.spec
            tables = [p for n, p in self.model.named_parameters() if ".tables." in n]
            cls = {"adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[
                optim.sparse_optimizer]
            self.tables_optimizer = cls(tables, lr=optim.sparse_lr or optim.lr)
            self.train_batches = [pad_batch(b, spec) for b in train_batches]
            self.test_batches = [pad_batch(b, spec) for b in test_batches]
        if device.type != "cpu":   # moved before timing, as they are converted before timing
            self.train_batches = [b.to(device) for b in self.train_batches]
            self.test_batches = [b.to(device) for b in self.test_batches]
        if variant == "ours":
            self.dense = dense_parameters(self.model)
            self.optimizer, _ = make_dense_optimizer(self.model, optim, total_steps=10**9)
        else:
            table_ids = {id(p) for p in self.tables_optimizer.param_groups[0]["params"]}
            self.dense = [p for p in self.model.parameters() if id(p) not in table_ids]
            self.optimizer = torch.optim.AdamW(self.dense, lr=optim.lr, betas=optim.betas,
                                               weight_decay=optim.weight_decay)
        self.grad_clip = optim.grad_clip
        self.position = 0
        self.model.train()

    def train_step(self) -> int:
        batch = self.train_batches[self.position % len(self.train_batches)]
        self.position += 1
        return train_step(self.model, batch, self.optimizer, self.tables_optimizer, self.dense, self.grad_clip,
                          precision=self.precision)

    @torch.no_grad()
    def infer_step(self, index: int) -> int:
        batch = self.test_batches[index % len(self.test_batches)]
        with autocast(self.precision, self.device):
            self.model(batch)
        return batch.batch_size


def train_step(model: nn.Module, batch, optimizer, tables_optimizer, dense: list, grad_clip: float | None,
               precision: str = "fp32") -> int:
    """One training step of a benchmark variant: loss, backward (ours: the tables update inside it), the plain
    tables' optimizer when there is one, clipping, the dense optimizer. Returns the batch's samples.
    ``precision``: of the forward pass and loss, as ``train.precision`` (bf16: autocast; logits, BCE fp32)."""
    device = batch.labels.device
    with autocast(precision, device):
        logits = model(batch).float()
        loss = bce_per_task(logits, batch.labels).sum()
    loss = loss + sum(model.auxiliary_losses().values(), torch.zeros((), device=device))
    loss.backward()
    if tables_optimizer is not None:
        tables_optimizer.step()
        tables_optimizer.zero_grad(set_to_none=True)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(dense, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return batch.batch_size


def check_same_logits(ours: Runner, baseline: Runner) -> float:
    """Max |logit difference| of the two variants on the first test batch, before any training."""
    ours.model.eval(), baseline.model.eval()
    with torch.no_grad():
        diff = (ours.model(ours.test_batches[0]) - baseline.model(baseline.test_batches[0])).abs().max()
    ours.model.train(), baseline.model.train()
    return float(diff)


def timed(fn, steps: int, device: torch.device | None = None) -> float:
    """Samples per second of ``steps`` calls of ``fn`` (each returns its samples); on CUDA the clock is read
    after the device finished (``torch.cuda.synchronize``)."""
    device = device or torch.device("cpu")
    synchronize(device)
    start, samples = time.perf_counter(), 0
    for i in range(steps):
        samples += fn(i)
    synchronize(device)
    return samples / (time.perf_counter() - start)


def counted_warmup(runner: Runner, steps: int) -> tuple[float, float]:
    """Run ``steps`` warm-up train and inference steps, counting their matmul FLOPs: ``(train, inference)``
    FLOPs per sample (``torch.utils.flop_counter``; table lookups are no FLOPs)."""
    train_flops = infer_flops = 0
    train_samples = infer_samples = 0
    for i in range(steps):
        with FlopCounterMode(display=False) as counter:
            train_samples += runner.train_step()
        train_flops += counter.get_total_flops()
        runner.model.eval()
        with FlopCounterMode(display=False) as counter:
            infer_samples += runner.infer_step(i)
        infer_flops += counter.get_total_flops()
        runner.model.train()
    return train_flops / max(train_samples, 1), infer_flops / max(infer_samples, 1)


def measure(args, prepared, name: str, bf16_peak: float | None = None) -> dict:
    runners = {v: Runner(v, name, prepared, args) for v in ("ours", "baseline")}
    device = runners["ours"].device
    diff = check_same_logits(runners["ours"], runners["baseline"])
    if diff > 1e-4:
        raise AssertionError(f"{name}: the baseline is not the same model (max logit difference {diff:.2e})")
    # the FLOPs of a step are the dense modules', the same in both variants: counted on ours' warm-up steps
    flops = {"train": 0.0, "infer": 0.0}
    for variant, runner in runners.items():
        if variant == "ours" and args.warmup:
            flops["train"], flops["infer"] = counted_warmup(runner, args.warmup)
            continue
        for i in range(args.warmup):
            runner.train_step()
            runner.infer_step(i)
    windows: dict[str, dict[str, list[float]]] = {v: {"train": [], "infer": []} for v in runners}
    for _ in range(args.repeats):
        for variant, runner in runners.items():       # alternate: noise hits both alike
            windows[variant]["train"].append(timed(lambda i: runner.train_step(), args.steps, device))
            runner.model.eval()
            windows[variant]["infer"].append(timed(runner.infer_step, args.steps, device))
            runner.model.train()
    out: dict = {"model": name, "max_logit_diff_at_init": diff,
                 "params": sum(p.numel() for p in runners["ours"].model.parameters())}
    for variant, w in windows.items():
        out[variant] = {"train_samples_per_s": statistics.median(w["train"]),
                        "infer_samples_per_s": statistics.median(w["infer"]),
                        "windows_train_samples_per_s": [round(x, 1) for x in w["train"]],
                        "windows_infer_samples_per_s": [round(x, 1) for x in w["infer"]]}
        if bf16_peak is not None:
            for kind in ("train", "infer"):
                out[variant][f"{kind}_mfu_bf16"] = flops[kind] * out[variant][f"{kind}_samples_per_s"] / bf16_peak
    out["train_flops_per_sample"], out["infer_flops_per_sample"] = flops["train"], flops["infer"]
    for kind in ("train", "infer"):
        out[f"{kind}_ratio_ours_over_baseline"] = (out["ours"][f"{kind}_samples_per_s"]
                                                   / out["baseline"][f"{kind}_samples_per_s"])
    return out


def peak_memory_mb(args, variant: str, name: str) -> dict[str, float]:
    """Peak RSS (and on CUDA peak allocated device memory) of a fresh process running ``warmup + steps`` train
    and inference steps of one variant: ``{"peak_rss_mb": ...[, "peak_cuda_mb": ...]}``."""
    cmd = [sys.executable, __file__, "--data", args.data, "--memory-only", variant, "--models", name,
           "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--eval-batch-size",
           str(args.eval_batch_size), "--max-history", str(args.max_history), "--steps", str(args.steps),
           "--batches", str(args.batches), "--device", args.device, "--precision", args.precision]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_only(args) -> None:
    runner = Runner(args.memory_only, args.models[0], load_prepared(args.data), args)
    for i in range(args.warmup + args.steps):
        runner.train_step()
    runner.model.eval()
    for i in range(args.steps):
        runner.infer_step(i)
    synchronize(runner.device)
    out = {"peak_rss_mb": peak_rss_mb()}
    if runner.device.type == "cuda":
        out["peak_cuda_mb"] = peak_cuda_mb(runner.device)
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="runs/ml1m/ratings", help="prepared protocol-B (ratings) directory")
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--eval-batch-size", type=int, default=4096)
    parser.add_argument("--max-history", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20, help="distinct batches cycled through")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per variant")
    parser.add_argument("--device", default="cpu", choices=list(DEVICES), help="where both variants run")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                        help="bf16: forward passes under bfloat16 autocast (tables, optimizer states, BCE fp32)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "ctr_throughput.json"))
    parser.add_argument("--memory-only", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_only:
        memory_only(args)
        return

    device = resolve_device(args.device)
    prepared = load_prepared(args.data)
    bf16_peak = matmul_peak(device, torch.bfloat16) if device.type == "cuda" else None
    results = []
    for name in args.models:
        row = measure(args, prepared, name, bf16_peak)
        for variant in ("ours", "baseline"):
            row[variant].update(peak_memory_mb(args, variant, name))
        results.append(row)
    report = {"benchmark": "P3/P5 CTR training and inference throughput", "data": args.data,
              "date": time.strftime("%Y-%m-%d"), "machine": machine(device, torch.get_num_threads()),
              "torch": torch.__version__, "settings": {k: v for k, v in vars(args).items() if k != "memory_only"},
              "device": str(device), "precision": args.precision, "results": results}
    if bf16_peak is not None:
        report["bf16_matmul_peak_gflops"] = bf16_peak / 1e9
        print(f"bf16 matmul peak ({device}): {bf16_peak / 1e9:,.0f} GFLOP/s")
    print(f"{'model':7} {'variant':9} {'train samples/s':>16} {'infer samples/s':>16} {'peak RSS':>9}")
    for row in results:
        for variant in ("ours", "baseline"):
            r = row[variant]
            print(f"{row['model']:7} {variant:9} {r['train_samples_per_s']:16,.0f} {r['infer_samples_per_s']:16,.0f} "
                  f"{r['peak_rss_mb']:7.0f} MB")
        print(f"{row['model']:7} ours / baseline: train {row['train_ratio_ours_over_baseline']:.2f}x, "
              f"inference {row['infer_ratio_ours_over_baseline']:.2f}x (logits agree to "
              f"{row['max_logit_diff_at_init']:.1e} at init)")
        print(f"{row['model']:7} matmul FLOPs per sample: train {row['train_flops_per_sample'] / 1e6:.2f} M, "
              f"inference {row['infer_flops_per_sample'] / 1e6:.2f} M"
              + (f"; ours MFU (bf16 peak): train {row['ours']['train_mfu_bf16']:.2%}, "
                 f"inference {row['ours']['infer_mfu_bf16']:.2%}" if bf16_peak is not None else ""))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
