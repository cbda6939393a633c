"""Copy one experiment's runs from other MLflow stores into one store, so one `hybrid review` sees them all.

Before the fix of 2026-11-29, `hybrid sweep` without a tracking URI let every stage default to a SQLite
store in its own output directory (`<out>/pretrain/<size>/mlflow.db`, `<out>/finetune/.../mlflow.db`); only
the sweep's parent run was in `<out>/mlflow.db`. This gathers such runs into the parent's store:

    python scripts/merge_mlflow_stores.py --into sqlite:///$PWD/runs/sweep/x/mlflow.db --experiment sweep-x \\
        $(find runs/sweep/x/pretrain runs/sweep/x/finetune -name mlflow.db -printf 'sqlite:///%p ')

Each run is copied whole — name, start/end time, status, tags, params, every metric's full history (values,
steps, timestamps) and artifacts — with a `merged_from` tag; a run already copied is skipped, so the script
can be re-run. Tags that hold the id of another copied run (`mlflow.parentRunId`, `pretrain_run_id`) are
rewritten to the copy's id; ids of runs already in the target (the sweep's parent) are kept.
"""
from __future__ import annotations

import argparse
import sys
import tempfile

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from hybrid.tracking import Tracker

ID_TAGS = ("mlflow.parentRunId", "pretrain_run_id")
SKIP_TAGS = ("mlflow.runName",)


def copy_run(source: MlflowClient, target: MlflowClient, run, experiment_id: str, origin: str) -> str:
    tags = {k: v for k, v in run.data.tags.items() if k not in SKIP_TAGS}
    tags["merged_from"] = origin
    copy = target.create_run(experiment_id, start_time=run.info.start_time, run_name=run.info.run_name,
                             tags=tags)
    new_id = copy.info.run_id
    params = [Param(k, v) for k, v in run.data.params.items()]
    for i in range(0, len(params), 100):
        target.log_batch(new_id, params=params[i:i + 100])
    for key in run.data.metrics:
        history = [Metric(m.key, m.value, m.timestamp, m.step) for m in source.get_metric_history(run.info.run_id, key)]
        for i in range(0, len(history), 1000):
            target.log_batch(new_id, metrics=history[i:i + 1000])
    if source.list_artifacts(run.info.run_id):
        with tempfile.TemporaryDirectory() as tmp:
            local = source.download_artifacts(run.info.run_id, "", tmp)
            target.log_artifacts(new_id, local)
    target.set_terminated(new_id, status=run.info.status, end_time=run.info.end_time)
    return new_id


def merge(into: str, experiment: str, sources: list[str]) -> dict[str, str]:
    """Copy every run of ``experiment`` in ``sources`` into ``into``; returns ``{old run id: new run id}``."""
    target = MlflowClient(into)
    experiment_id = Tracker(into, experiment, enabled=True).experiment_id   # created as our jobs create it
    done = {r.data.tags["merged_from"]: r.info.run_id
            for r in target.search_runs([experiment_id], max_results=50_000) if "merged_from" in r.data.tags}
    ids: dict[str, str] = {}
    for uri in sources:
        source = MlflowClient(uri)
        found = source.get_experiment_by_name(experiment)
        if found is None:
            print(f"{uri}: no experiment '{experiment}', skipped", file=sys.stderr)
            continue
        for run in source.search_runs([found.experiment_id], max_results=50_000):
            origin = f"{uri}#{run.info.run_id}"
            ids[run.info.run_id] = done.get(origin) or copy_run(source, target, run, experiment_id, origin)
    # a tag naming a copied run now names its copy
    for new_id in set(ids.values()):
        tags = target.get_run(new_id).data.tags
        for key in ID_TAGS:
            if tags.get(key) in ids:
                target.set_tag(new_id, key, ids[tags[key]])
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--into", required=True, help="the store that receives the runs")
    parser.add_argument("--experiment", required=True, help="experiment name (the same in every store)")
    parser.add_argument("sources", nargs="+", help="tracking URIs to copy from")
    args = parser.parse_args(argv)
    ids = merge(args.into, args.experiment, args.sources)
    print(f"{len(ids)} runs of '{args.experiment}' are in {args.into}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
