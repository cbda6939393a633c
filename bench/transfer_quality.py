"""Q (transfer): does generative pretraining help the CTR model? Every strategy, matched learning rates.

For each protocol (BENCHMARKS.md section Q):

* **A** (``last-item``): pretrain the LLaMA backbone L4H64A4 on protocol A's sequences, then fine-tune the
  GPSD sequence ranker (``configs/finetune_ml1m_last_item_gpsd.yaml``);
* **B** (``ratings``): pretrain L4H64A4 on protocol B's sequences (events before the time cut only), then
  fine-tune DCN-v2 (``configs/finetune_ml1m_ratings_dcn_v2.yaml``) — with a transformer history encoder by
  default, so FT (which also moves the transformer) differs from ST; ``--dcn-history target`` keeps the
  config's DIN attention (then FT = ST: there is no transformer to move, the report says so);

each with NT, FT, ST, FT&SF and ST&SF and every seed. Everything but the transfer is identical across
strategies: the same config, learning rates, epochs (>= 3) and architecture — the ranker's table width and
backbone are taken from the pretraining checkpoint's manifest for every strategy, NT included. Reported per
(protocol, strategy), mean ± std over seeds: eval AUC at the end of epoch 1, best AUC, AUC after the last
epoch, logloss and gAUC (after the last epoch), and how many seeds show the one-epoch drop. Every run is a
:func:`hybrid.jobs.finetune.run_finetune` nested under one parent MLflow run (tags ``strategy``,
``pretrain_run_id``), so ``hybrid review`` shows the strategy comparison from the same store.

Usage (the full study — hours on a CPU; run it on a bigger machine)::

    hybrid data prepare --config configs/prepare_ml1m_last_item.yaml
    hybrid data prepare --config configs/prepare_ml1m_ratings.yaml
    python bench/transfer_quality.py --last-item runs/ml1m/last-item --ratings runs/ml1m/ratings \\
        --tracking-uri sqlite:///runs/bench/mlflow.db --workers 4
    # reuse finished pretraining runs:  --pretrained-a runs/.../checkpoints --pretrained-b runs/.../checkpoints

Smoke run (minutes; ML-100K, one seed, tiny models, 3 epochs)::

    python bench/transfer_quality.py --quick --tracking-uri sqlite:///runs/bench/quick.db

Results go to ``--out`` (default ``bench/results/transfer_quality.json``, ``..._quick.json`` with ``--quick``)
after every run, so an interrupted study keeps what it finished.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _grid import load_finetune_config, mean_std, pm, timed, worker_pool  # noqa: E402

STRATEGIES = ("nt", "ft", "st", "ft_sf", "st_sf")
# validation selects (valid_*), test is reported at the selected step (test_*) and for the final weights
FIGURES = ("valid_auc_epoch1", "valid_best_auc", "test_auc", "test_logloss", "test_gauc", "test_final_auc")
MIN_EPOCHS = 3

#: fine-tuning recipes (issue 14.5): ``config`` = the fine-tuning config as it is; ``gpsd`` = the official GPSD
#: code's ranker recipe (github chqiwang/gpsd-rec, read side by side, not copied): 10 epochs, AdamW betas
#: (0.9, 0.98) and weight decay 0.1, cosine decay to 0.1 x the peak, peak lr 5e-3 without transfer and 1e-3
#: with it, and transfer moves (and SF freezes) the item table only. Its 500-step warm-up is longer than a
#: whole ml-1m-partial run's first epoch; the config's 10 steps are kept. Each recipe: overrides for every
#: strategy and per strategy (``transfer.*`` keys set the config's transfer section, which the runs apply).
RECIPES = {
    "config": {"all": [], "nt": [], "transfer": []},
    "gpsd": {"all": ["train.epochs=10", "train.optim.schedule=cosine", "train.optim.min_lr_ratio=0.1",
                     "train.optim.weight_decay=0.1", "train.optim.betas=[0.9, 0.98]", "train.eval_every=33",
                     "train.log_every=33"],
             "nt": ["train.optim.lr=0.005", "train.optim.sparse_lr=0.005"],
             "transfer": ["train.optim.lr=0.001", "train.optim.sparse_lr=0.001", "transfer.tables=[t_item_id]"]},
    # the config's schedule, with only the official recipe's choice of tables (moves and freezes t_item_id)
    "item_table": {"all": [], "nt": [], "transfer": ["transfer.tables=[t_item_id]"]},
}


def recipe_overrides(recipe: str, strategy: str) -> list[str]:
    """The fine-tuning overrides ``recipe`` gives ``strategy``."""
    spec = RECIPES[recipe]
    return [*spec["all"], *(spec["nt"] if strategy == "nt" else spec["transfer"])]

#: protocol → (prepared-data flag, pretraining config, fine-tuning config, ranker)
PROTOCOLS = {
    "A": ("last-item", "configs/pretrain_ml1m_last_item_llama.yaml", "configs/finetune_ml1m_last_item_gpsd.yaml",
          "gpsd"),
    "B": ("ratings", "configs/pretrain_ml1m_ratings_llama.yaml", "configs/finetune_ml1m_ratings_dcn_v2.yaml",
          "dcn_v2"),
}

#: --quick: tiny models on ML-100K (the pretraining side is configs/pretrain_tiny.yaml, L2H16A2).
QUICK_PRETRAIN = ["train.epochs=2", "train.eval_every=0", "train.checkpoint_every=0", "train.max_len=50",
                  "train.progress=false"]
QUICK_FINETUNE = {
    "A": ["train.epochs=3", "train.batch_size=64", "train.eval_batch_size=512", "train.eval_every=5",
          "train.max_history=50", "train.log_every=5", "ranker.config.head_mult=2"],
    "B": ["train.epochs=3", "train.batch_size=1024", "train.eval_batch_size=8192", "train.eval_every=30",
          "train.max_history=20", "train.log_every=30", "ranker.config.deep_hidden=[32, 16]",
          "ranker.config.num_cross_layers=2"],
}


# ---------------------------------------------------------------------------------------------- stages

def prepare_quick(root: Path, tracking_uri: str) -> dict[str, str]:
    """ML-100K prepared with both protocols (fetched through the project's own path when needed)."""
    from hybrid.data.fetch import fetch_movielens_100k
    from hybrid.jobs.prepare import PrepareConfig, run_prepare
    from hybrid.tracking import TrackingConfig

    raw = fetch_movielens_100k(root / "ml-100k")
    out = {}
    for protocol in ("last-item", "ratings"):
        target = root / f"ml100k-{protocol}"
        if not (target / "feature_map.json").is_file():
            cfg = PrepareConfig()
            cfg.data.dataset, cfg.data.path, cfg.protocol.protocol, cfg.out = "movielens-100k", str(raw), protocol, \
                str(target)
            cfg.tracking = TrackingConfig(tracking_uri=tracking_uri, experiment="transfer-quality-data")
            run_prepare(cfg)
        out[protocol] = str(target)
    return out


def pretrain(job: dict) -> dict:
    """One pretraining run (worker process); returns the checkpoint and its MLflow run id."""
    from hybrid.config import load_config
    from hybrid.jobs.pretrain import PretrainConfig, run_pretrain

    overrides = [f"data={json.dumps(job['data'])}", f"out={json.dumps(job['out'])}",
                 f"tracking.tracking_uri={json.dumps(job['tracking_uri'])}",
                 f"tracking.experiment={json.dumps(job['experiment'])}", "train.progress=false", *job["overrides"]]
    cfg = load_config(PretrainConfig, REPO / job["config"], overrides)
    started = time.perf_counter()
    summary = run_pretrain(cfg, parent_run=job["parent"])
    return {"protocol": job["protocol"], "checkpoint": summary["checkpoint"], "metrics": summary["metrics"],
            "wall_s": round(time.perf_counter() - started, 1)}


def matched_ranker(protocol: str, checkpoint: str, dcn_history: str) -> list[str]:
    """Overrides that give the ranker the pretrained table width and backbone (for every strategy)."""
    from hybrid.adapters import PretrainedCheckpoint

    source = PretrainedCheckpoint.open(checkpoint)
    width = next(iter(source.tables.values()))[1]
    backbone = dict(source.backbone_config or {})
    overrides = [f"ranker.config.features.embedding_dim={width}"]
    if protocol == "A":
        overrides.append(f"ranker.config.backbone={_yaml(backbone)}")
    elif dcn_history == "transformer":
        overrides.append(f"ranker.config.history={_yaml({'encoder': 'transformer', 'backbone': backbone})}")
    return overrides


def same_as(protocol: str, strategy: str, dcn_history: str) -> str | None:
    """The strategy whose run this one would repeat bit for bit, if any (then it is not run again).

    DCN-v2 with target attention has no transformer: FT moves exactly what ST moves (the report says the
    backbone is skipped), so FT = ST and FT&SF = ST&SF on protocol B with ``--dcn-history target``.
    """
    if protocol == "B" and dcn_history == "target":
        return {"ft": "st", "ft_sf": "st_sf"}.get(strategy)
    return None


def pretrain_overrides(given: list[str], protocol: str) -> list[str]:
    """The ``--pretrain-set`` values that apply to ``protocol`` (``A:key=value``, ``B:...`` or unprefixed)."""
    mine = []
    for item in given:
        prefix, sep, rest = item.partition(":")
        if sep and prefix in PROTOCOLS and "=" not in prefix:
            if prefix == protocol:
                mine.append(rest)
        else:
            mine.append(item)
    return mine


def _yaml(value) -> str:
    """A --set value the config loader reads back exactly (JSON's ``1e-05`` would be a string to YAML)."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()


def finetune(job: dict) -> dict:
    """One fine-tuning run with one strategy (worker process); returns its summary and identity.

    The strategy and checkpoint go into the config's ``transfer`` section (its other fields — the config's own
    or the recipe's — stay), which ``run_finetune`` applies, as ``hybrid finetune --init --strategy`` does.
    """
    from hybrid.jobs.finetune import run_finetune

    transfer = [] if job["strategy"] == "nt" else [f"transfer.strategy={job['strategy']}",
                                                   f"transfer.checkpoint={json.dumps(job['checkpoint'])}"]
    cfg = load_finetune_config(job, job["config"], transfer)
    if cfg.train.epochs < MIN_EPOCHS:
        raise ValueError(f"train.epochs={cfg.train.epochs}: the study needs >= {MIN_EPOCHS} epochs "
                         "(the one-epoch drop shows after the first)")
    if job["strategy"] == "nt":
        cfg.transfer = dataclasses.replace(cfg.transfer, strategy="nt", checkpoint=None)
    return {"protocol": job["protocol"], "ranker": job["ranker"], "recipe": job["recipe"],
            "strategy": job["strategy"], "seed": job["seed"], "transfer": cfg.transfer.to_dict(),
            "lr": cfg.train.optim.lr, "sparse_lr": cfg.train.optim.sparse_lr, "epochs": cfg.train.epochs,
            **timed(lambda: run_finetune(cfg, parent_run=job["parent"], strategy=job["strategy"]))}


# ---------------------------------------------------------------------------------------------- reporting

def aggregate(runs: list[dict]) -> list[dict]:
    """Mean ± std over seeds per (protocol, recipe, strategy); population std (0 for one seed)."""
    rows = []
    for protocol in PROTOCOLS:
        for recipe in RECIPES:
            for strategy in STRATEGIES:
                mine = [r for r in runs if r["protocol"] == protocol and r.get("recipe", "config") == recipe
                        and r["strategy"] == strategy]
                if mine:
                    rows.append(_aggregate_row(protocol, recipe, strategy, mine))
    return rows


def _aggregate_row(protocol: str, recipe: str, strategy: str, mine: list[dict]) -> dict:
    row = {"protocol": protocol, "ranker": mine[0]["ranker"], "recipe": recipe, "strategy": strategy,
           "seeds": len(mine), **mean_std(mine, FIGURES)}
    row["one_epoch_drop"] = sum(bool(r["one_epoch_drop"]) for r in mine)
    row["best_epoch"] = statistics.fmean(r["best_epoch"] for r in mine)
    row["wall_s"] = statistics.fmean(r["wall_s"] for r in mine)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| protocol | ranker | recipe | strategy | valid AUC end of epoch 1 | best valid AUC (mean epoch) | test AUC at "
             "best valid | test logloss | test gAUC | test AUC, final weights | one-epoch drop (valid) | s / run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = r["strategy"].upper().replace("_", "&")
        lines.append(f"| {r['protocol']} | {r['ranker']} | {r.get('recipe', 'config')} | {label} | {pm(r, 'valid_auc_epoch1')} | "
                     f"{pm(r, 'valid_best_auc')} ({r['best_epoch']:.2f}) | {pm(r, 'test_auc')} | {pm(r, 'test_logloss')} | "
                     f"{pm(r, 'test_gauc')} | {pm(r, 'test_final_auc')} | {r['one_epoch_drop']}/{r['seeds']} seeds | "
                     f"{r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: ML-100K, one seed, tiny models (pretrain_tiny, L2H16A2), 3 epochs")
    parser.add_argument("--last-item", default="runs/ml1m/last-item", help="prepared protocol-A directory")
    parser.add_argument("--ratings", default="runs/ml1m/ratings", help="prepared protocol-B directory")
    parser.add_argument("--pretrained-a", help="reuse a protocol-A pretraining checkpoint (dir or root)")
    parser.add_argument("--pretrained-b", help="reuse a protocol-B pretraining checkpoint (dir or root)")
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2 (--quick: 0)")
    parser.add_argument("--dcn-history", choices=["transformer", "target"], default="transformer",
                        help="protocol B's DCN-v2 history encoder (transformer: FT also moves it)")
    parser.add_argument("--pretrain-set", dest="pretrain_overrides", action="append", default=[],
                        metavar="[A:|B:]KEY=VALUE",
                        help="pretraining override, for one protocol with an A: / B: prefix, else for both "
                             "(e.g. B:model.size=L4H32A4: the ranker takes the width and backbone it gives)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra fine-tuning override for every run (all strategies alike)")
    parser.add_argument("--recipes", nargs="+", default=["config"], choices=list(RECIPES),
                        help="fine-tuning recipes, each run with every strategy and seed (config: the fine-tuning "
                             "config as it is; gpsd: the official GPSD code's ranker recipe; item_table: the config, "
                             "transferring the item table only)")
    parser.add_argument("--tracking-uri", required=True, help="MLflow store, e.g. sqlite:///runs/bench/mlflow.db")
    parser.add_argument("--experiment", default="transfer-quality")
    parser.add_argument("--runs-dir", default="runs/bench/transfer_quality", help="where each run's out dir goes")
    parser.add_argument("--out", help="results JSON (default bench/results/transfer_quality[_quick].json)")
    parser.add_argument("--workers", type=int, default=1, help="fine-tuning runs in parallel (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    out = Path(args.out or REPO / f"bench/results/transfer_quality{'_quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    from hybrid.tracking import Tracker

    started = time.perf_counter()
    runs_dir = Path(args.runs_dir) / time.strftime("%Y%m%d-%H%M%S")
    data = {"A": args.last_item, "B": args.ratings}
    if args.quick:
        prepared = prepare_quick(runs_dir / "data", args.tracking_uri)
        data = {"A": prepared["last-item"], "B": prepared["ratings"]}
    given = {"A": args.pretrained_a, "B": args.pretrained_b}
    tracker = Tracker(args.tracking_uri, args.experiment)
    runs: list[dict] = []
    pretrained: dict[str, dict] = {}
    with tracker.run("transfer-quality", tags={"stage": "pipeline", "quick": str(args.quick).lower()}) as parent, \
            worker_pool(args.workers, args.threads) as pool:
        # 1. pretraining, one per protocol (or the checkpoints given)
        jobs = []
        for protocol in args.protocols:
            name, pre_config, _, _ = PROTOCOLS[protocol]
            if given[protocol]:
                pretrained[protocol] = {"protocol": protocol, "checkpoint": given[protocol], "given": True}
                continue
            jobs.append({"protocol": protocol, "data": data[protocol], "parent": parent,
                         "config": "configs/pretrain_tiny.yaml" if args.quick else pre_config,
                         "out": str(runs_dir / f"pretrain-{name}"), "tracking_uri": args.tracking_uri,
                         "experiment": args.experiment,
                         "overrides": [*(QUICK_PRETRAIN if args.quick else []),
                                       *pretrain_overrides(args.pretrain_overrides, protocol)]})
        for result in pool.imap_unordered(pretrain, jobs):
            pretrained[result["protocol"]] = result
            print(f"[{time.perf_counter() - started:7.0f} s] pretrained protocol {result['protocol']}: "
                  f"{result['checkpoint']} ({result['wall_s']:.0f} s)", flush=True)

        # 2. fine-tuning: seeds outermost, so a cut-short study has every strategy at least once
        jobs = []
        for seed in seeds:
            for protocol in args.protocols:
                name, _, ft_config, ranker = PROTOCOLS[protocol]
                checkpoint = pretrained[protocol]["checkpoint"]
                overrides = [*(QUICK_FINETUNE[protocol] if args.quick else []),
                             *matched_ranker(protocol, checkpoint, args.dcn_history), *args.overrides]
                for recipe in args.recipes:
                    for strategy in args.strategies:
                        if same_as(protocol, strategy, args.dcn_history):
                            continue
                        jobs.append({"protocol": protocol, "ranker": ranker, "recipe": recipe, "strategy": strategy,
                                     "seed": seed, "config": ft_config, "data": data[protocol],
                                     "checkpoint": checkpoint,
                                     "out": str(runs_dir / f"{name}-{ranker}-{recipe}-{strategy}-seed{seed}"),
                                     "tracking_uri": args.tracking_uri, "experiment": args.experiment,
                                     "parent": parent,
                                     "overrides": [*overrides, *recipe_overrides(recipe, strategy)]})
        for result in pool.imap_unordered(finetune, jobs):
            runs.append(result)
            print(f"[{time.perf_counter() - started:7.0f} s] {result['protocol']} {result['ranker']} "
                  f"{result['recipe']} {result['strategy']} seed {result['seed']}: "
                  f"valid AUC@1 {result['valid_auc_epoch1']:.4f} best "
                  f"{result['valid_best_auc']:.4f}; test {result['test_auc']:.4f} logloss {result['test_logloss']:.4f}"
                  f" gAUC {result['test_gauc']:.4f} final {result['test_final_auc']:.4f} drop {result['one_epoch_drop']}"
                  f" ({result['wall_s']:.0f} s)",
                  flush=True)
            report = {"date": date.today().isoformat(), "quick": args.quick,
                      "machine": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})",
                      "workers": args.workers, "threads_per_worker": args.threads, "seeds": seeds,
                      "dcn_history": args.dcn_history, "overrides": args.overrides,
                      "recipes": {r: RECIPES[r] for r in args.recipes},
                      "pretrain_overrides": args.pretrain_overrides,
                      "not_run": {f"{p}/{s}": f"same as {same_as(p, s, args.dcn_history)}" for p in args.protocols
                                  for s in args.strategies if same_as(p, s, args.dcn_history)},
                      "pretrained": {p: {k: v for k, v in r.items() if k != "metrics"} | {
                          "metrics": r.get("metrics", {})} for p, r in pretrained.items()},
                      "study_seconds": round(time.perf_counter() - started, 1), "table": aggregate(runs),
                      "runs": runs}
            out.write_text(json.dumps(report, indent=2, default=str))
    print()
    print(table(aggregate(runs)))
    for protocol in args.protocols:
        for strategy in args.strategies:
            if same_as(protocol, strategy, args.dcn_history):
                print(f"{protocol} {strategy.upper().replace('_', '&')}: not run, identical to "
                      f"{same_as(protocol, strategy, args.dcn_history).upper().replace('_', '&')} (no transformer "
                      "in the ranker to move)")
    print(f"\nstudy: {len(runs)} fine-tuning runs in {time.perf_counter() - started:.0f} s; written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
