"""The ``hybrid`` command line.

    hybrid data fetch movielens-100k --out DIR [--local DIR]
    hybrid data prepare --dataset NAME --path DIR --protocol last-item|ratings --out DIR [--config F] [--set k=v]
    hybrid pretrain --config FILE [--set k=v ...] [--resume[=previous]] [--tracking-uri URI]
    torchrun --nproc_per_node=N -m hybrid pretrain --config FILE ...     (sharded)
    hybrid finetune --config FILE [--set k=v ...] [--resume[=previous]] [--tracking-uri URI]
        [--init PRETRAIN_CHECKPOINT --strategy nt|ft|st|ft_sf|st_sf [--transfer key=value ...]]
    hybrid score --model FINETUNE_CHECKPOINT --input EVENTS --out scores.parquet [--since T] [--items F]
    torchrun --nproc_per_node=N -m hybrid score ...                      (each rank its users, one output)
    hybrid export --model FINETUNE_CHECKPOINT --input EVENTS --out ranker.pt2   (torch.export, for serving)
    hybrid quickstart [--out DIR] [--set STAGE:KEY=VALUE ...]
    hybrid tracking import OUT/mlflow_fallback.jsonl [--tracking-uri URI]   (calls a store missed during a run)

Bad input (and an OS error: disk full, no permission) prints one line naming the file / row / column / key
and exits with code 2; any other exception is a bug: one line saying so, exit 1. ``--debug`` shows the
traceback instead; ``--quiet`` turns progress off.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import TypeVar

import yaml

from hybrid import __version__
from hybrid.bootstrap import bootstrap, check_stack
from hybrid.core.errors import ConfigError, HybridInputError

EXIT_BAD_INPUT = 2
#: an exception that is not a HybridInputError: a bug (one line; the traceback under --debug)
EXIT_BUG = 1
_Config = TypeVar("_Config")
_TRACKING_URI_HELP = ("MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<working dir>/mlflow.db, "
                      "which `mlflow ui` and `hybrid review` started there also read)")


def _add_common(parser: argparse.ArgumentParser, top: bool = False) -> None:
    # Sub-commands must not reset a --debug / --quiet given before them, hence SUPPRESS there.
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="show tracebacks")
    parser.add_argument("--quiet", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="no progress output (bars or per-step lines); results and errors still print")


#: the ``--set`` example each command's help shows (a test loads each against its command's config)
SET_EXAMPLES = {"prepare": "protocol.max_history=100", "pretrain": "train.epochs=5", "finetune": "train.seed=1",
                "sweep": "seeds=[0,1]"}


def _add_config(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config key, e.g. --set {SET_EXAMPLES[command]} (repeatable)")
    parser.add_argument("--tracking-uri", help=_TRACKING_URI_HELP)
    parser.add_argument("--experiment", help="MLflow experiment name")


def _load_config(config_cls: type[_Config], args: argparse.Namespace,
                 flags: tuple[tuple[str, object], ...] = ()) -> _Config:
    """``config_cls`` from the flags of :func:`_add_config`: ``--config``, then the ``--set`` overrides, then
    ``flags`` (``(config key, flag value)`` pairs) and ``--tracking-uri`` / ``--experiment`` as overrides of
    their keys; a flag not given (``None``) overrides nothing. Bad input raises ``HybridInputError``."""
    from hybrid.config import load_config

    overrides = list(args.overrides)
    for key, value in (*flags, ("tracking.tracking_uri", args.tracking_uri), ("tracking.experiment", args.experiment)):
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    return load_config(config_cls, args.config, overrides)


def _add_input(parser: argparse.ArgumentParser, out_help: str, input_help: str | None = None) -> None:
    """The model / input / side-table options ``score`` and ``export`` share."""
    parser.add_argument("--model", required=True, metavar="CHECKPOINT",
                        help="a fine-tuning checkpoint: <finetune out>/checkpoints/best (or a step-... directory)")
    parser.add_argument("--input", required=True,
                        help=input_help or "events with raw ids: a CSV/TSV/parquet file, or a dataset directory "
                                           "(--dataset)")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--dataset", help="the input's reader: events (default for a file) | taobao | movielens-100k "
                                          "| movielens-1m | recbole (default for a directory: the training data's)")
    parser.add_argument("--columns", dest="column_map", action="append", default=[], metavar="CANONICAL=FILE_COLUMN",
                        help="events only: a column of the file under another name, e.g. --columns user_id=uid")
    parser.add_argument("--items", help="events only: item side table (default: the training data's)")
    parser.add_argument("--users", help="events only: user side table (default: the training data's)")
    parser.add_argument("--since", help="score only rows at or after this time (unix seconds or a date); earlier "
                                        "rows are history")
    parser.add_argument("--batch-size", type=int, default=1024, help="samples per forward pass (default 1024)")
    parser.add_argument("--memory-limit", default="2GB", help="DuckDB memory for sorting the input (default 2GB)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrid", description="Hybrid generative-discriminative CTR stacks.")
    parser.add_argument("--version", action="version", version=f"hybrid {__version__}")
    _add_common(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="fetch and prepare datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    fetch = data_commands.add_parser("fetch", help="obtain a public dataset with no manual download")
    fetch.add_argument("name", choices=["movielens-100k"])
    fetch.add_argument("--out", required=True, help="directory to write the dataset into")
    fetch.add_argument("--local", help="use this local copy instead of searching / downloading")
    _add_common(fetch)

    prep = data_commands.add_parser("prepare", help="build pretraining sequences and CTR samples")
    prep.add_argument("--dataset", help="movielens-100k | movielens-1m | recbole | taobao | events | sequences")
    prep.add_argument("--path", help="dataset directory or file")
    prep.add_argument("--protocol", help="last-item | ratings")
    prep.add_argument("--out", help="output directory")
    _add_config(prep, "prepare")
    _add_common(prep)

    pre = commands.add_parser("pretrain", help="train the generative model on prepared sequences")
    pre.add_argument("--resume", nargs="?", const=True, default=False, choices=["previous"],
                     help="continue from the newest complete checkpoint in <out>/checkpoints; --resume=previous: "
                          "from the newest one that verifies when the one LATEST names is corrupt or incomplete")
    _add_config(pre, "pretrain")
    _add_common(pre)

    fine = commands.add_parser("finetune", help="train a CTR ranker on prepared CTR samples")
    fine.add_argument("--init", metavar="PRETRAIN_CHECKPOINT",
                      help="transfer from this pretraining checkpoint (a step-... directory or its checkpoints root)")
    fine.add_argument("--strategy", help="transfer strategy: nt | ft | st | ft_sf | st_sf (GPSD's NT, FT, ST, FT&SF, "
                                         "ST&SF; default: st_sf with --init, nt without)")
    fine.add_argument("--transfer", dest="transfer_options", action="append", default=[], metavar="KEY=VALUE",
                      help="a TransferConfig option, e.g. --transfer new_rows=mean --transfer 'tables=[t_item_id]'")
    fine.add_argument("--resume", nargs="?", const=True, default=False, choices=["previous"],
                      help="continue an interrupted run of <out> from <out>/checkpoints/last, exactly; "
                           "--resume=previous: from the newest one that verifies when the one LATEST names is corrupt")
    fine.add_argument("--allow-foreign-ids", action="store_true",
                      help="transfer even when few of the target's raw ids are known to the checkpoint (pretrained "
                           "on another dataset): transfer.min_overlap=0")
    _add_config(fine, "finetune")
    _add_common(fine)

    score = commands.add_parser("score", help="score new events (raw ids) with a fine-tuned ranker")
    _add_input(score, "the scores' parquet file (written atomically)")
    score.add_argument("--chunk-rows", type=int, default=200_000,
                       help="input rows handed over per chunk; memory scales with it (default 200000)")
    _add_common(score)

    export = commands.add_parser("export", help="a fine-tuned ranker as a torch.export program for serving")
    _add_input(export, "the program's .pt2 file; its .json sidecar and .feature_map.json are written beside it",
               input_help="events to take the example batch from (the first scored rows), read as score reads them")
    export.set_defaults(chunk_rows=20_000)
    _add_common(export)

    sweep = commands.add_parser("sweep", help="sizes x strategies x seeds as nested MLflow runs")
    _add_config(sweep, "sweep")
    _add_common(sweep)

    review = commands.add_parser("review", help="tables, plots and an HTML page from an experiment's runs")
    review.add_argument("--experiment", required=True, help="MLflow experiment name")
    review.add_argument("--tracking-uri", help=_TRACKING_URI_HELP)
    review.add_argument("--out", default="runs/review", help="output directory (default: runs/review)")
    _add_common(review)

    tracking = commands.add_parser("tracking", help="tracking store utilities")
    tracking_commands = tracking.add_subparsers(dest="tracking_command", required=True)
    load = tracking_commands.add_parser("import", help="replay a fallback log (calls a store did not take during a "
                                                        "run: <out>/mlflow_fallback.jsonl) into a store")
    load.add_argument("file", help="the fallback log")
    load.add_argument("--tracking-uri", help=_TRACKING_URI_HELP)
    _add_common(load)

    boot = commands.add_parser("bootstrap", help="install torchrec without its CUDA-only deps, check the stack")
    _add_common(boot)

    quick = commands.add_parser("quickstart", help="the whole story on real ML-100K")
    quick.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    quick.add_argument("--tracking-uri", help="MLflow tracking URI")
    quick.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE:KEY=VALUE",
                       help="override a key of one stage's config: STAGE is pretrain, gpsd or dcn_v2, e.g. "
                            "--set pretrain:train.epochs=2 (repeatable)")
    _add_common(quick)
    return parser


def _cmd_fetch(args: argparse.Namespace) -> int:
    from hybrid.data.fetch import fetch_movielens_100k

    path = fetch_movielens_100k(args.out, local=args.local)
    print(f"ML-100K ready in {path}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from hybrid.jobs.prepare import PrepareConfig, run_prepare

    cfg = _load_config(PrepareConfig, args, (("data.dataset", args.dataset), ("data.path", args.path),
                                             ("protocol.protocol", args.protocol), ("out", args.out)))
    started = time.perf_counter()
    prepared = run_prepare(cfg)
    _print_stats(prepared.stats)
    print(f"prepared data written to {cfg.out} in {time.perf_counter() - started:.1f} s")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from hybrid.jobs.pretrain import PretrainConfig, run_pretrain
    from hybrid.tracking import is_rank_zero

    cfg = _load_config(PretrainConfig, args)
    result = run_pretrain(cfg, resume=args.resume)
    if is_rank_zero():
        metrics, base, k = result["metrics"], result["baseline"], cfg.train.k
        print(f"pretrained {result['step']} steps ({result['epoch']:.2f} epochs) in {result['seconds']:.1f} s: "
              f"HR@{k} {metrics.get(f'eval/hr_at_{k}', float('nan')):.4f}, "
              f"NDCG@{k} {metrics.get(f'eval/ndcg_at_{k}', float('nan')):.4f} "
              f"(most popular: {base[f'hr_at_{k}']:.4f} / {base[f'ndcg_at_{k}']:.4f}) over "
              f"{int(metrics.get('eval/targets', 0))} held-out targets, {int(metrics.get('eval/oov_targets', 0))} "
              "of them unknown to the feature map (counted as misses)")
        print(f"checkpoint: {result['checkpoint']}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from hybrid.jobs.finetune import run_finetune
    from hybrid.tracking import is_rank_zero

    cfg = _load_finetune_config(args)
    result = run_finetune(cfg, resume=args.resume)
    if is_rank_zero():
        print(f"fine-tuned {cfg.ranker.name} for {result['steps']} steps ({result['epochs']:.2f} epochs) in "
              f"{result['seconds']:.1f} s")
        print(f"  validation (selects): AUC end of epoch 1 {result['valid_auc_epoch1']:.4f}, best "
              f"{result['valid_best_auc']:.4f} (epoch {result['best_epoch']:.2f}), final {result['valid_final_auc']:.4f}, "
              f"one-epoch drop: {'yes' if result['one_epoch_drop'] else 'no'}")
        print(f"  test at the selected step: AUC {result['test_auc']:.4f}, logloss {result['test_logloss']:.4f}, "
              f"gAUC {result['test_gauc']:.4f}; final weights: AUC {result['test_final_auc']:.4f}")
        print(f"best checkpoint: {result['best_checkpoint']}")
    return 0


def _load_finetune_config(args: argparse.Namespace):
    """The finetune config; ``--init`` / ``--strategy`` / ``--transfer k=v`` override its ``transfer`` section
    (``--init`` alone means ST&SF unless the config names a strategy)."""
    from hybrid.adapters import Strategy
    from hybrid.jobs.finetune import FinetuneConfig

    flags: list[tuple[str, object]] = []
    for item in args.transfer_options:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise HybridInputError(f"--transfer {item!r}: expected KEY=VALUE, e.g. new_rows=mean")
        flags.append((f"transfer.{key.strip()}", yaml.safe_load(value)))
    if args.strategy is not None:
        flags.append(("transfer.strategy", Strategy.parse(args.strategy).value))  # an unknown name: one line
    if args.init is not None:
        flags.append(("transfer.checkpoint", args.init))
    if getattr(args, "allow_foreign_ids", False):
        flags.append(("transfer.min_overlap", 0.0))
    try:
        return _load_config(FinetuneConfig, args, tuple(flags))
    except HybridInputError as err:
        if args.init is None and args.strategy is not None and "needs a pretraining checkpoint" in str(err):
            raise HybridInputError(f"--strategy {args.strategy} needs --init PRETRAIN_CHECKPOINT (a `hybrid "
                                   "pretrain` checkpoint) or transfer.checkpoint in the config") from None
        raise


def _score_config(args: argparse.Namespace):
    from hybrid.jobs.score import ScoreConfig

    columns = {}
    for item in args.column_map:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise HybridInputError(f"--columns {item!r}: expected CANONICAL=FILE_COLUMN, e.g. user_id=uid")
        columns[key.strip()] = value.strip()
    return ScoreConfig(model=args.model, input=args.input, out=args.out, dataset=args.dataset, columns=columns,
                       items_path=args.items, users_path=args.users, since=args.since, batch_size=args.batch_size,
                       chunk_rows=args.chunk_rows, memory_limit=args.memory_limit)


def _cmd_score(args: argparse.Namespace) -> int:
    from hybrid.jobs.score import ScoreReport, run_score
    from hybrid.tracking import is_rank_zero

    result = run_score(_score_config(args))
    if is_rank_zero():
        report = ScoreReport(**{k: result[k] for k in ScoreReport.__dataclass_fields__})
        print(report.summary())
        print(f"scores written to {result['out']} in {result['seconds']:.1f} s ({result['rows_per_s']:.0f} rows/s)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from hybrid.jobs.score import run_export

    meta = run_export(_score_config(args))
    inputs = ", ".join(f"{i['name']} {i['shape']}" for i in meta["inputs"])
    print(f"exported {meta['ranker']} ({', '.join(meta['task_names'])}) to {meta['out']}: inputs {inputs}; "
          f"program == eager on {meta['parity']['example_rows']} example rows (max |diff| "
          f"{meta['parity']['max_abs_diff']:.1e}); sidecar {Path(meta['out']).with_suffix('.json').name}, "
          f"feature map {meta['feature_map']}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from hybrid.jobs.sweep import SweepConfig, run_sweep

    cfg = _load_config(SweepConfig, args)
    result = run_sweep(cfg)
    print(f"sweep: {len(result['done'])} points run, {len(result['skipped'])} already finished, "
          f"{len(result['failed'])} failed")
    for point, error in result["failed"].items():
        print(f"  failed {point}: {error}")
    print(f"review it: hybrid review --experiment {cfg.tracking.experiment}"
          + (f" --tracking-uri {cfg.tracking.tracking_uri}" if cfg.tracking.tracking_uri else ""))
    return 0


def _cmd_review(args: argparse.Namespace) -> int:
    from hybrid.review import run_review
    from hybrid.tracking import Tracker, resolve_tracking_uri

    out = Path(args.out)
    tracker = Tracker(resolve_tracking_uri(args.tracking_uri), args.experiment)
    result = run_review(tracker, out)
    print(result["markdown"])
    for strategy, fit in result["fits"].items():
        print(f"power law ({strategy}): {fit}")
    print(f"reviewed {result['runs']} runs; report: {result['html']}")
    return 0


def _cmd_tracking_import(args: argparse.Namespace) -> int:
    from hybrid.tracking import check_tracking, import_fallback, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking(uri)
    result = import_fallback(args.file, uri)
    print(f"imported {result['records'] - result['failed']} of {result['records']} tracking calls into {uri} "
          f"({result['runs_created']} runs created); the log is now {args.file}.imported")
    return 0 if not result["failed"] else EXIT_BAD_INPUT


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from hybrid.jobs.quickstart import STAGES, run_quickstart

    overrides: dict[str, list[str]] = {}
    for item in args.overrides:
        stage, sep, override = item.partition(":")
        if not sep or stage not in STAGES or "=" not in override:
            raise ConfigError(f"--set {item}: expected STAGE:KEY=VALUE with STAGE one of {', '.join(STAGES)} "
                              "(e.g. pretrain:train.epochs=2)")
        overrides.setdefault(stage, []).append(override)
    run_quickstart(Path(args.out), tracking_uri=args.tracking_uri, overrides=overrides)
    return 0


def _print_stats(stats: dict) -> None:
    ctr_train, ctr_valid, ctr_test = stats["ctr_train"], stats["ctr_valid"], stats["ctr_test"]
    print(f"{stats['dataset']} / {stats['protocol']}: {stats['users']} users, {stats['items']} items, "
          f"{stats['events']} events")
    print(f"  pretraining: {stats['pretrain_train']['sequences']} sequences "
          f"({stats['pretrain_train']['events']} events), eval {stats['pretrain_eval']['sequences']}")
    print(f"  CTR train: {ctr_train['samples']} samples, label rate {ctr_train['label_rate']}; "
          f"validation: {ctr_valid['samples']} samples, label rate {ctr_valid['label_rate']}; "
          f"test: {ctr_test['samples']} samples, label rate {ctr_test['label_rate']}")


COMMANDS = {("data", "fetch"): _cmd_fetch, ("data", "prepare"): _cmd_prepare, ("pretrain", None): _cmd_pretrain,
            ("finetune", None): _cmd_finetune, ("score", None): _cmd_score, ("export", None): _cmd_export,
            ("sweep", None): _cmd_sweep, ("review", None): _cmd_review, ("quickstart", None): _cmd_quickstart,
            ("tracking", "import"): _cmd_tracking_import, ("bootstrap", None): lambda args: bootstrap()}
#: commands that build TorchRec models: the stack is checked before they start
NEEDS_TORCHREC = {"pretrain", "finetune", "score", "export", "sweep", "quickstart"}


def _quiet_third_party_logs() -> None:
    """Keep the terminal for our progress: MLflow's schema-migration INFO lines and torch.fx's warning
    (printed when torchrec is imported) say nothing a user can act on."""
    for name, level in (("mlflow.store.db.utils", logging.WARNING), ("alembic", logging.WARNING),
                        ("torch.fx._symbolic_trace", logging.ERROR), ("torchrec.distributed.planner", logging.ERROR)):
        logging.getLogger(name).setLevel(level)
    # torchrec's sharding planner and DMP warn about their own internal defaults (FutureWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchrec\.")


#: path arguments that must exist, by option: what the path is (for the message)
_EXISTING_PATHS = {"config": "config file", "model": "checkpoint", "input": "input", "init": "pretraining checkpoint",
                   "items": "items table", "users": "users table", "path": "dataset path", "file": "fallback log"}


def _preflight(args: argparse.Namespace) -> None:
    """Check what needs no heavy import — the paths named on the command line, the config's YAML and its
    ``--set`` overrides, the prepared data it names — so that a typo answers in a second, not after torch,
    TorchRec and MLflow have loaded (``bench/cli_startup.py``)."""
    from hybrid.core.config import read_config_mapping

    for option, what in _EXISTING_PATHS.items():
        value = getattr(args, option, None)
        if value and not Path(value).exists():
            flag = "" if option == "file" else f"--{option} "  # a positional argument has no flag to name
            raise (ConfigError if option == "config" else HybridInputError)(
                f"{value}: config file not found" if option == "config" else f"{flag}{value}: {what} not found")
    if getattr(args, "config", None) is not None or getattr(args, "overrides", None):
        raw = read_config_mapping(getattr(args, "config", None), getattr(args, "overrides", ()))
        data = raw.get("data")
        if args.command in ("pretrain", "finetune") and isinstance(data, str) and data and not Path(data).exists():
            raise HybridInputError(f"{data}: prepared data directory not found (run `hybrid data prepare` first)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_third_party_logs()
    handler = COMMANDS[(args.command, getattr(args, "data_command", None) or getattr(args, "tracking_command", None))]
    if args.quiet:
        from hybrid.core.progress import set_quiet

        set_quiet(True)
    try:
        _preflight(args)
        if args.command in NEEDS_TORCHREC:
            check_stack()
        return handler(args)
    except HybridInputError as err:  # the whole hierarchy (config, checkpoint, transfer, dependency errors)
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as err:  # a TrainingInterrupted says where it stopped: exit 128 + signal (143: SIGTERM)
        print(f"{err}" if str(err) else "interrupted", file=sys.stderr)
        return getattr(err, "exit_code", 130)
    except OSError as err:  # the machine, not hybrid: disk full, permissions, a path that is a file
        if args.debug:
            raise
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:  # noqa: BLE001 - anything else is a bug: say so in one line, traceback on --debug
        if args.debug:
            raise
        first = str(err).splitlines()[0] if str(err) else ""
        print(f"error: this is a bug in hybrid {__version__}, not a problem with your input "
              f"({type(err).__name__}: {first}); rerun with --debug for the traceback and report it",
              file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
