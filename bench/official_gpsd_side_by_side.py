"""Issue 14.5: the official GPSD code and ``hybrid`` on the same protocol-A rows, side by side, in one run.

Both sides get ml-1m-partial protocol A as ``hybrid data prepare`` wrote it (the same users, histories, targets,
negatives and validation/test split), the same model size (L4H64A4), the same seeds, and each its own recipe:

* **official** (github chqiwang/gpsd-rec, a checkout you fetched; run from its own environment, nothing of it
  copied here): the prepared rows are exported to its text format (``item2index.txt``, ``cate2index.txt``,
  ``pretrain_dataset.txt``, ``ft_*_dataset.txt``: item id + category per event, as its preprocessing writes);
  it pretrains with its ``*_pretrain.gin`` recipe and fine-tunes with its ``l4h64a4.gin`` (NT) and
  ``l4h64a4_stsf.gin`` (ST&SF; FT&SF loads every parameter) recipes: 10 epochs, AdamW wd 0.1, cosine to 0.1x,
  fine-tuning batch 512, evaluated after every epoch (:mod:`_official_gpsd_driver` wraps its ``eval`` so that
  validation and test are both scored). Changed for these rows: warm-up 20 / 10 steps (its 500 exceed a whole
  run: 70 fine-tuning steps), pretraining batch 128 as ours (its 512 leaves 50 steps in 10 epochs), 1024 sampled
  negatives as ours (its 4096: a CPU step would take seconds), max length 200 / 100 as ours;
* **hybrid**: ``bench/transfer_quality.py --protocols A`` (the configs as they are).

Selection is on validation for both; test AUC is reported at the selected evaluation and for the final weights,
mean ± std over seeds. The two sides run concurrently (``--threads`` each), so wall times are not a speed figure.

Usage::

    hybrid data prepare --config configs/prepare_ml1m_last_item.yaml
    python -m venv /tmp/gpsd-venv && /tmp/gpsd-venv/bin/pip install torch==2.13.0 gin-config loguru torcheval \\
        adamw_bf16 tensorboard tqdm
    git clone https://github.com/chqiwang/gpsd-rec /tmp/gpsd-rec       # outside this repository
    python bench/official_gpsd_side_by_side.py --official-repo /tmp/gpsd-rec --official-python \\
        /tmp/gpsd-venv/bin/python --work-dir /tmp/gpsd-side-by-side --tracking-uri sqlite:///runs/bench/sbs.db
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STRATEGIES = ("nt", "ft_sf", "st_sf")
ITEM_TABLE = ".*item_embeddings.*"


# ---------------------------------------------------------------------------------------------- export

def export(prepared: Path, out: Path) -> dict[str, str]:
    """Write the prepared protocol-A rows in the official code's text format; returns the file paths."""
    from hybrid.data.store import load_prepared

    data = load_prepared(prepared)  # ml-1m-sized: in memory
    items, cates = data.events["item_id"].to_numpy(), data.events["category"].to_numpy()
    out.mkdir(parents=True, exist_ok=True)
    ctr = {"train": data.ctr_train, "valid": data.ctr_valid, "test": data.ctr_test}
    # every id the rows use (CTR negatives and their categories need not occur in the events); the official
    # tokenizer wants indices 1..N (0 = unknown)
    item_ids = set(items.tolist()).union(*(set(c["item_id"].tolist()) for c in ctr.values()))
    cate_ids = set(cates.tolist()).union(*(set(c["category"].tolist()) for c in ctr.values()))
    files = {"item2index": out / "item2index.txt", "cate2index": out / "cate2index.txt"}
    files["item2index"].write_text("".join(f"{i},{k}\n" for k, i in enumerate(sorted(item_ids), 1)))
    files["cate2index"].write_text("".join(f"{c},{k}\n" for k, c in enumerate(sorted(cate_ids), 1)))

    def sequence(start: int, end: int) -> str:
        return ";".join(f"item__item_id:{items[k]}#item__cate_id:{cates[k]}" for k in range(start, end))

    pre = data.pretrain_train
    files["pretrain"] = out / "pretrain_dataset.txt"
    with open(files["pretrain"], "w") as f:
        for row in pre.itertuples():
            last = row.end - 1  # the official format: history, then the last event as the target (label 2 = AR only)
            f.write(f"{row.user_row},{items[last]},{cates[last]},2,{sequence(row.start, last)},{last - row.start}\n")
    for split, rows in ctr.items():
        files[split] = out / f"ft_{split}_dataset.txt"
        with open(files[split], "w") as f:
            for row in rows.itertuples():
                f.write(f"{row.user_row},{row.item_id},{row.category},{int(row.click)},"
                        f"{sequence(row.hist_start, row.hist_end)},{row.hist_end - row.hist_start}\n")
    return {k: str(v) for k, v in files.items()}


# ---------------------------------------------------------------------------------------------- official side

def common_bindings(files: dict, work: Path, max_len: int, batch_size: int) -> list[str]:
    return [f'ItemTokenizer.table_path="{files["item2index"]}"', f'CateTokenizer.table_path="{files["cate2index"]}"',
            f"SeqRecDataset.max_seq_len={max_len}", "ModelArgs.dim=64", "ModelArgs.n_layers=4",
            "ModelArgs.n_heads=4", f'train.ckpt_root_dir="{work / "output"}"', "train.shuffle=True",
            "train.use_bf16=False", "train.max_grads_norm=1.0", "train.weight_decay=0.1", f"train.batch_size={batch_size}",
            "train.num_data_workers=1", "train.prefetch_factor=8", "train.restore=False"]


def pretrain_bindings(files: dict, work: Path) -> list[str]:
    """Its ``l4h64a4_pretrain.gin`` recipe (10 epochs, 5e-3 cosine to 5e-4, wd 0.1, item + category AR)."""
    return [*common_bindings(files, work, 200, 128), f'train.data_path="{files["pretrain"]}"', "train.epoch=10",
            "train.learning_rate=5e-3", "train.min_learning_rate=5e-4", "train.warmup_steps=20",
            "train.random_seed=0", "train.log_steps=20", "train.eval_steps=0", "eval.data_path=None",
            "ModelArgs.item_ar_loss_weight=1", "ModelArgs.cate_ar_loss_weight=1", "ModelArgs.rank_loss_weight=0",
            "ModelArgs.n_samples=1024"]


def finetune_bindings(files: dict, work: Path, strategy: str, seed: int, pretrained: Path) -> list[str]:
    """Its ``l4h64a4.gin`` (NT: 5e-3 → 5e-4) / ``l4h64a4_stsf.gin`` (1e-3 → 1e-4, item table loaded and frozen)."""
    bindings = [*common_bindings(files, work, 100, 512), f'train.data_path="{files["train"]}"', "train.epoch=10",
                "train.warmup_steps=10", f"train.random_seed={seed}", "train.eval_steps=0", "train.log_steps=1",
                "eval.batch_size=2048", "eval.max_steps=-1", "eval.drop_last=False", "eval.num_data_workers=1",
                "eval.prefetch_factor=8", "ModelArgs.item_ar_loss_weight=0", "ModelArgs.cate_ar_loss_weight=0",
                "ModelArgs.rank_loss_weight=1"]
    if strategy == "nt":
        return [*bindings, "train.learning_rate=5e-3", "train.min_learning_rate=5e-4", "train.load_ckpt=None",
                "train.frozen_params=None"]
    load = {"st_sf": ITEM_TABLE, "st": ITEM_TABLE, "ft_sf": ".*", "ft": ".*"}[strategy]
    frozen = f'"{ITEM_TABLE}"' if strategy.endswith("_sf") else "None"
    return [*bindings, "train.learning_rate=1e-3", "train.min_learning_rate=1e-4", f'train.load_ckpt="{pretrained}"',
            f'train.load_params="{load}"', f"train.frozen_params={frozen}"]


def run_official(args, name: str, bindings: list[str], files: dict, work: Path, log) -> dict:
    out = work / f"{name}.json"
    cmd = [args.official_python, str(REPO / "bench" / "_official_gpsd_driver.py"), "--official-repo",
           args.official_repo, "--name", name, "--threads", str(args.threads), "--out", str(out),
           *[x for b in bindings for x in ("--bind", b)]]
    if "valid" in files:
        cmd += ["--valid", files["valid"], "--test", files["test"]]
    with open(work / f"{name}.log", "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=work)
    result = json.loads(out.read_text())
    log(f"official {name}: {result['wall_s']:.0f} s")
    return result


def summarise_official(result: dict, strategy: str, seed: int) -> dict:
    evals = result["evals"]
    best = max(range(len(evals)), key=lambda k: (evals[k]["valid_auc"], -k))  # the first best
    return {"side": "official", "strategy": strategy, "seed": seed, "valid_best_auc": evals[best]["valid_auc"],
            "best_step": evals[best]["step"], "test_auc": evals[best]["test_auc"],
            "test_final_auc": evals[-1]["test_auc"], "evaluations": len(evals), "wall_s": result["wall_s"]}


# ---------------------------------------------------------------------------------------------- report

def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def aggregate(runs: list[dict]) -> list[dict]:
    rows = []
    for side in ("official", "hybrid"):
        for strategy in STRATEGIES:
            mine = [r for r in runs if r["side"] == side and r["strategy"] == strategy]
            if mine:
                rows.append({"side": side, "strategy": strategy, "seeds": len(mine),
                             **{k: mean_std([r[k] for r in mine]) for k in
                                ("valid_best_auc", "test_auc", "test_final_auc")}})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--last-item", default="runs/ml1m/last-item", help="prepared protocol-A directory")
    parser.add_argument("--official-repo", required=True, help="checkout of github chqiwang/gpsd-rec (outside)")
    parser.add_argument("--official-python", required=True, help="python of an environment with its requirements")
    parser.add_argument("--work-dir", required=True, help="scratch directory outside the repository")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--tracking-uri", required=True, help="MLflow store for the hybrid side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for each side")
    parser.add_argument("--hybrid-json", help="reuse a finished transfer_quality.py JSON for the hybrid side")
    parser.add_argument("--out", default=str(REPO / "bench/results/official_side_by_side.json"))
    args = parser.parse_args(argv)
    work = Path(args.work_dir).resolve()
    if work.is_relative_to(REPO):
        parser.error(f"--work-dir {work} is inside the repository: the official code must run outside it")
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f} s] {message}", flush=True)

    hybrid_json = Path(args.hybrid_json) if args.hybrid_json else work / "hybrid.json"
    ours = None
    if not args.hybrid_json:  # the hybrid side runs beside the official one
        ours = subprocess.Popen(
            [sys.executable, str(REPO / "bench/transfer_quality.py"), "--protocols", "A", "--last-item",
             args.last_item, "--strategies", *args.strategies, "--seeds", *map(str, args.seeds),
             "--threads", str(args.threads), "--tracking-uri", args.tracking_uri, "--out", str(hybrid_json),
             "--runs-dir", str(work / "hybrid-runs")],
            stdout=open(work / "hybrid.log", "w"), stderr=subprocess.STDOUT, cwd=REPO)
    files = export(Path(args.last_item), work / "data")
    log(f"exported the prepared rows to {work / 'data'}")
    pre = run_official(args, "official-pretrain", pretrain_bindings(files, work),
                       {k: v for k, v in files.items() if k not in ("valid", "test")}, work, log)
    pretrained = work / "output" / "official-pretrain"
    runs = []

    def write() -> None:
        report = {"date": date.today().isoformat(),
                  "machine": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})",
                  "threads_per_side": args.threads, "seeds": args.seeds,
                  "official_pretrain_wall_s": pre["wall_s"],
                  "official_bindings": {"pretrain": pretrain_bindings(files, work),
                                        **{s: finetune_bindings(files, work, s, 0, pretrained)
                                           for s in args.strategies}},
                  "table": aggregate(runs), "runs": runs}
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))

    for seed in args.seeds:
        for strategy in args.strategies:
            result = run_official(args, f"official-{strategy}-seed{seed}",
                                  finetune_bindings(files, work, strategy, seed, pretrained), files, work, log)
            runs.append(summarise_official(result, strategy, seed))
            log(f"official {strategy} seed {seed}: best valid {runs[-1]['valid_best_auc']:.4f} test "
                f"{runs[-1]['test_auc']:.4f} final {runs[-1]['test_final_auc']:.4f}")
            write()
    if ours is not None and ours.wait() != 0:
        raise SystemExit(f"the hybrid side failed: see {work / 'hybrid.log'}")
    hybrid = json.loads(hybrid_json.read_text())
    runs += [{"side": "hybrid", "strategy": r["strategy"], "seed": r["seed"], "valid_best_auc": r["valid_best_auc"],
              "test_auc": r["test_auc"], "test_final_auc": r["test_final_auc"], "wall_s": r["wall_s"]}
             for r in hybrid["runs"] if r["strategy"] in args.strategies]
    write()
    print("\n| side | strategy | best valid AUC | test AUC at best valid | test AUC, final weights |\n|---|---|---|---|---|")
    for r in aggregate(runs):
        cells = [f"{r[k]['mean']:.4f} ± {r[k]['std']:.4f}" for k in ("valid_best_auc", "test_auc", "test_final_auc")]
        print(f"| {r['side']} | {r['strategy'].upper().replace('_', '&')} | " + " | ".join(cells) + " |")
    print(f"\nwritten to {args.out} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
