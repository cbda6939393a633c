"""The README's first command: the whole story on real ML-100K, on a fresh machine, in minutes.

1. fetch ML-100K (a local copy, else the files inside the PyPI wheel ``recbole==1.2.1``);
2. prepare both protocols (statistics logged to MLflow);
3. pretrain a small generative model (LLaMA-style L2H32A2, sampled softmax) once per protocol: on
   ``last-item``'s sequences (GPSD's transductive setting) and on ``ratings``' pre-cut sequences;
4. fine-tune, each from scratch (NT) and with the pretrained tables transferred and frozen (ST&SF), same
   learning rates: the GPSD sequence ranker on ``last-item`` (several seeds: the runs take seconds) and
   DCN-v2 on ``ratings`` (one seed; evaluated every third of an epoch, so the one-epoch picture shows);
5. review: the ranker × strategy table, the one-epoch picture and an HTML report.

Everything nests under one ``quickstart`` parent run in the experiment ``quickstart-ml-100k``, each stage's run
named for what it ran (``pretrain L2H32A2 last-item seed0``, ``finetune gpsd st_sf seed1``, ``review``).
"""
from __future__ import annotations

import importlib.resources
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from hybrid.config import load_config
from hybrid.core.checkpoint import resume_checkpoint
from hybrid.data.fetch import fetch_movielens_100k
from hybrid.data.protocols import ProtocolConfig
from hybrid.jobs.finetune import FinetuneConfig, run_finetune
from hybrid.jobs.prepare import DataConfig, PrepareConfig, run_prepare
from hybrid.jobs.pretrain import PretrainConfig, run_pretrain
from hybrid.jobs.transfer import transfer_config
from hybrid.review import run_review
from hybrid.tracking import FALLBACK_NAME, TrackingConfig, make_tracker

EXPERIMENT = "quickstart-ml-100k"
#: the stage configs ship inside the package (``configs/`` of the repository is ``hybrid.configs``)
CONFIGS = importlib.resources.files("hybrid.configs")
STRATEGIES = ("nt", "st_sf")
PROTOCOLS = ("last-item", "ratings")
#: ranker → (protocol, stage config)
FINETUNES = {"gpsd": ("last-item", "quickstart_finetune_gpsd.yaml"),
             "dcn_v2": ("ratings", "quickstart_finetune_dcn_v2.yaml")}
#: the stages ``hybrid quickstart --set STAGE:KEY=VALUE`` can override (their configs: configs/quickstart_*.yaml)
STAGES = ("pretrain", *FINETUNES)
#: fine-tuning seeds per ranker (a GPSD-ranker run takes seconds on ML-100K, a DCN-v2 run about a minute)
SEEDS = {"gpsd": (0, 1, 2), "dcn_v2": (0,)}


def _packaged(name: str) -> Path:
    """A config file shipped in ``hybrid.configs`` as a filesystem path (wheels install it unzipped)."""
    path = Path(str(CONFIGS / name))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: packaged config missing; reinstall hybrid-ctr")
    return path


def pretrain_stage(cfg: PretrainConfig, parent: str | None) -> dict:
    """One pretraining stage: a fresh run, or the continuation of an interrupted one from its newest checkpoint.

    A checkpoint that does not verify is refused in one line that says what quickstart can do (it has no
    ``--resume=previous``): start the stage again, or continue it with ``hybrid pretrain``.

    Raises:
        CheckpointError: ``<cfg.out>/checkpoints`` holds checkpoints, and the newest (``LATEST``) does not verify.
    """
    root = Path(cfg.out) / "checkpoints"
    if root.exists():
        resume_checkpoint(root, advice=f"remove {cfg.out} to pretrain this stage again, or continue it from that "
                                       f"checkpoint: hybrid pretrain --config {cfg.out}/config.yaml --resume=previous")
    return run_pretrain(cfg, resume=root.exists(), parent_run=parent)


def _step(n: int, text: str) -> None:
    print(f"\n[{n}/5] {text}", flush=True)


def run_quickstart(out: Path, tracking_uri: str | None = None,
                   overrides: dict[str, list[str]] | None = None,
                   seeds: dict[str, Sequence[int]] | None = None) -> dict:
    """Run every stage under ``out``; returns the per-stage results.

    ``overrides`` (``{"pretrain": [...], "gpsd": [...], "dcn_v2": [...]}``, ``key=value`` strings) and
    ``seeds`` (``{"gpsd": [0], ...}``) shrink the budget for tests; the defaults are the configs in
    ``configs/quickstart_*.yaml`` and :data:`SEEDS`.
    """
    started = time.perf_counter()
    out = Path(out)
    overrides = overrides or {}
    seeds = {**SEEDS, **(seeds or {})}
    out.mkdir(parents=True, exist_ok=True)
    # the quickstart keeps its store inside its own output (which is never replaced): one folder to look at
    tracking = TrackingConfig(tracking_uri=tracking_uri or f"sqlite:///{out.resolve() / 'mlflow.db'}",
                              experiment=EXPERIMENT)
    tracker = make_tracker(tracking, fallback=out / FALLBACK_NAME)
    tracking = replace(tracking, tracking_uri=tracker.tracking_uri)   # every stage writes to the same store
    results: dict = {"pretrain": {}, "finetune": {}}
    with tracker.run("quickstart", tags={"stage": "pipeline", "dataset": "movielens-100k"}) as parent:
        _step(1, f"fetching ML-100K into {out / 'data' / 'ml-100k'}")
        data_dir = fetch_movielens_100k(out / "data" / "ml-100k")

        _step(2, "preparing both protocols")
        prepared = {}
        for protocol in PROTOCOLS:
            cfg = PrepareConfig(data=DataConfig(dataset="movielens-100k", path=str(data_dir)),
                                protocol=ProtocolConfig(protocol=protocol), out=str(out / "prepared" / protocol),
                                tracking=tracking)
            stats = run_prepare(cfg, tracker=tracker, parent_run=parent).stats
            prepared[protocol] = cfg.out
            print(f"      {protocol}: CTR train {stats['ctr_train']['samples']} / validation "
                  f"{stats['ctr_valid']['samples']} / test {stats['ctr_test']['samples']} samples, pretraining "
                  f"{stats['pretrain_train']['sequences']} sequences", flush=True)
        results["prepare"] = prepared

        _step(3, "pretraining a small generative model (L2H32A2, next-item sampled softmax) per protocol")
        pcfg = load_config(PretrainConfig, _packaged("quickstart_pretrain.yaml"), overrides.get("pretrain", []))
        for protocol in PROTOCOLS:
            target = out / "pretrain" / protocol
            name = f"pretrain {pcfg.model.size} {protocol} seed{pcfg.train.seed}"   # one per protocol: say which
            cfg = replace(pcfg, data=prepared[protocol], out=str(target), tracking=replace(tracking, run_name=name))
            pretrained = pretrain_stage(cfg, parent)
            results["pretrain"][protocol] = pretrained
            m, b = pretrained["metrics"], pretrained["baseline"]
            print(f"      {protocol}: HR@10 {m.get('eval/hr_at_10', float('nan')):.4f} "
                  f"(most popular: {b.get('hr_at_10', float('nan')):.4f}) over {int(m.get('eval/targets', 0))} "
                  f"held-out targets ({int(m.get('eval/oov_targets', 0))} unknown: misses)", flush=True)

        _step(4, "fine-tuning without transfer (NT) and with transferred + frozen tables (ST&SF)")
        for ranker, (protocol, config) in FINETUNES.items():
            fcfg = load_config(FinetuneConfig, _packaged(config), overrides.get(ranker, []))
            checkpoint = results["pretrain"][protocol]["checkpoint"]
            for strategy in STRATEGIES:
                for seed in seeds[ranker]:
                    cfg = replace(fcfg, data=prepared[protocol], train=replace(fcfg.train, seed=seed),
                                  out=str(out / "finetune" / ranker / strategy / f"seed{seed}"),
                                  tracking=replace(tracking, run_name=f"finetune {ranker} {strategy} seed{seed}"),
                                  transfer=transfer_config(strategy, checkpoint))
                    summary = run_finetune(cfg, parent_run=parent)
                    results["finetune"][(ranker, strategy, seed)] = summary
                    print(f"      {ranker} ({protocol}) {strategy} seed {seed}: validation AUC end of epoch 1 "
                          f"{summary['valid_auc_epoch1']:.4f}, best {summary['valid_best_auc']:.4f}; test AUC at "
                          f"the best validation step {summary['test_auc']:.4f}, final {summary['test_final_auc']:.4f}; "
                          f"one-epoch drop (validation): {'yes' if summary['one_epoch_drop'] else 'no'}",
                          flush=True)

        _step(5, "reviewing the runs")
        review = run_review(tracker, out / "review", parent_run=parent)
        results["review"] = review
        print(review["markdown"], flush=True)
    print(f"done in {time.perf_counter() - started:.0f} s")
    print(f"report:       {review['html']}")
    print(f"MLflow store: {tracker.tracking_uri}")
    print(f"browse:       .venv/bin/mlflow ui --backend-store-uri {tracker.tracking_uri}")
    return results
