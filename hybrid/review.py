"""``hybrid review``: read an experiment's runs from MLflow and show whether pretraining helped.

Writes into ``--out``:

- ``summary.md`` / ``summary.csv``: one row per (ranker, strategy, model size): validation AUC at the end of
  epoch 1 and at its best (what selects the checkpoint), test AUC at that best-validation step and of the final
  weights, whether the one-epoch drop happened (on validation) — mean ± std over seeds;
- ``one_epoch.png``: validation AUC against training progress (fractional epochs), one line per strategy
  (mean over seeds), epoch boundaries marked — the one-epoch picture;
- ``scaling.png``: validation-selected test AUC against dense parameters on a log axis with the fitted
  ``AUC = a − b·N^−c`` per strategy and its parameters;
- ``report.html``: one self-contained page (plots embedded) with all of it.

Everything is computed from the logged metric histories (``valid/auc`` with its ``progress/epoch``, and
``test/auc``, logged at each new best validation step and at the end) and the run tags (``ranker``,
``strategy``, ``model_size``, ``dense_params``, ``seed``), so a review reproduces from the store alone. The
outputs are logged as artifacts of a ``review`` run.
"""
from __future__ import annotations

import base64
import html
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hybrid.core.errors import HybridInputError
from hybrid.ctr_models.metrics import one_epoch_drop
from hybrid.tracking import PARENT_TAG, TAGS, Tracker

AUC_METRIC = "valid/auc"
TEST_AUC_METRIC = "test/auc"
EPOCH_METRIC = "progress/epoch"
#: the strategy table's figures, each named by its split, and their column headers
TABLE_METRICS = {"valid_auc_epoch1": "validation AUC, end of epoch 1", "valid_best_auc": "best validation AUC",
                 "test_auc": "test AUC at best validation", "test_final_auc": "test AUC, final weights"}


# -- reading -----------------------------------------------------------------------------------------------

@dataclass
class RunCurve:
    """One finetune run: its identity, its validation curve (``steps`` → fractional epoch, AUC) and its test
    AUC by step (logged where test was evaluated: new best validation steps and the last step)."""

    run_id: str
    name: str
    ranker: str
    strategy: str
    model_size: str
    dense_params: float
    seed: str
    steps: np.ndarray
    epochs: np.ndarray
    auc: np.ndarray
    test_auc: dict[int, float]
    one_epoch_tag: str | None = None
    parent_run: str | None = None   # the pipeline run it is nested under (sweep, quickstart)


def _history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def load_curves(tracker: Tracker, stage: str = "finetune") -> list[RunCurve]:
    """Every finished run of the experiment tagged ``stage=<stage>`` that logged ``valid/auc``."""
    client = tracker.client
    found = client.get_experiment_by_name(tracker.experiment)
    if found is None:
        raise HybridInputError(f"{tracker.tracking_uri}: no experiment named '{tracker.experiment}'")
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.{TAGS.stage} = '{stage}'",
                              max_results=50_000)
    curves = []
    for run in runs:
        if run.info.status != "FINISHED":
            continue
        auc = _history(client, run.info.run_id, AUC_METRIC)
        if not auc:
            continue
        epoch = _history(client, run.info.run_id, EPOCH_METRIC)
        test = _history(client, run.info.run_id, TEST_AUC_METRIC)
        steps = sorted(auc)
        tags = run.data.tags
        curves.append(RunCurve(
            run_id=run.info.run_id, name=run.info.run_name or run.info.run_id, ranker=tags.get(TAGS.ranker, "-"),
            strategy=tags.get(TAGS.strategy, "nt"), model_size=tags.get(TAGS.model_size, "-"),
            dense_params=float(tags.get(TAGS.dense_params, "nan")), seed=tags.get(TAGS.seed, "0"),
            steps=np.array(steps, dtype=np.int64),
            epochs=np.array([epoch.get(s, np.nan) for s in steps], dtype=float),
            auc=np.array([auc[s] for s in steps], dtype=float), test_auc=test,
            one_epoch_tag=tags.get(TAGS.one_epoch_drop), parent_run=tags.get(PARENT_TAG)))
    return curves


# -- summarising ---------------------------------------------------------------------------------------------

def summarise_run(curve: RunCurve) -> dict:
    """The per-run figures of the strategy table (validation selects, test is read at the selected step)."""
    at_boundary = curve.epochs <= 1.0 + 1e-9
    epoch1 = curve.auc[at_boundary][-1] if at_boundary.any() else np.nan
    points = [(e, a) for e, a in zip(curve.epochs, curve.auc) if not math.isnan(e)]
    best = int(np.nanargmax(curve.auc)) if np.isfinite(curve.auc).any() else -1
    best_step = int(curve.steps[best]) if best >= 0 else -1
    return {
        "run_id": curve.run_id, "ranker": curve.ranker, "strategy": curve.strategy, "model_size": curve.model_size,
        "dense_params": curve.dense_params, "seed": curve.seed,
        "valid_auc_epoch1": float(epoch1), "valid_best_auc": float(curve.auc[best]) if best >= 0 else np.nan,
        "test_auc": curve.test_auc.get(best_step, np.nan),
        "test_final_auc": curve.test_auc[max(curve.test_auc)] if curve.test_auc else np.nan,
        # the trainer's verdict (judged against its validation set's noise); recomputed with the fixed
        # default tolerance only for runs logged without it
        "one_epoch_drop": (curve.one_epoch_tag == "true" if curve.one_epoch_tag is not None
                           else bool(one_epoch_drop(points).flagged) if points else False),
    }


def summary_table(curves: Sequence[RunCurve]) -> pd.DataFrame:
    """(Ranker, strategy, size) table, mean ± std over seeds (std over one seed is 0).

    Rankers without a transformer have no size (``-``): grouping by ranker keeps them apart.
    """
    runs = pd.DataFrame([summarise_run(c) for c in curves])
    if runs.empty:
        return runs
    metrics = list(TABLE_METRICS)
    grouped = runs.groupby(["ranker", "strategy", "model_size"], sort=True)
    table = grouped[metrics].agg(["mean", "std"])
    table.columns = [f"{m}_{s}" for m, s in table.columns]
    table = table.fillna({c: 0.0 for c in table.columns if c.endswith("_std")})
    table["dense_params"] = grouped["dense_params"].first()
    table["seeds"] = grouped["seed"].nunique()
    table["one_epoch_drop"] = grouped["one_epoch_drop"].mean()   # fraction of seeds with a drop
    return table.reset_index().sort_values(["ranker", "strategy", "dense_params", "model_size"], kind="stable",
                                           ignore_index=True)


def series_label(ranker: str, strategy: str, rankers: int) -> str:
    """A plot series / fit name: the strategy, prefixed by the ranker when the experiment has several."""
    return strategy if rankers <= 1 else f"{ranker} {strategy}"


def to_markdown(table: pd.DataFrame) -> str:
    header = ("| ranker | strategy | size | dense params | seeds | " + " | ".join(TABLE_METRICS.values())
              + " | one-epoch drop (validation) |\n|" + "---|" * (6 + len(TABLE_METRICS)) + "\n")
    rows = []
    for r in table.itertuples():
        pm = lambda m: f"{getattr(r, m + '_mean'):.4f} ± {getattr(r, m + '_std'):.4f}"  # noqa: E731
        drop = "yes" if r.one_epoch_drop == 1 else "no" if r.one_epoch_drop == 0 else f"{r.one_epoch_drop:.0%} of seeds"
        dense = "-" if math.isnan(r.dense_params) else f"{int(r.dense_params):,}"
        figures = " | ".join(pm(m) for m in TABLE_METRICS)
        rows.append(f"| {r.ranker} | {r.strategy} | {r.model_size} | {dense} | {r.seeds} | {figures} | {drop} |")
    return header + "\n".join(rows) + "\n"


# -- power law -----------------------------------------------------------------------------------------------

@dataclass
class PowerLaw:
    """``AUC = a − b·N^−c``."""

    a: float
    b: float
    c: float
    r2: float = float("nan")      # of the fit on the points it was fitted to
    at_bound: bool = False        # the exponent ended on a bound of its range: the points are not a power law

    def __call__(self, n):
        return self.a - self.b * np.power(np.asarray(n, dtype=float), -self.c)

    def __str__(self) -> str:
        text = f"AUC = {self.a:.4f} − {self.b:.4g}·N^−{self.c:.4f} (R² {self.r2:.2f})"
        return text + (" — poor fit: these points do not follow a power law" if self.poor else "")

    @property
    def poor(self) -> bool:
        """The exponent ended on a bound of its range, or the fit explains under half the variance."""
        return self.at_bound or not self.r2 >= 0.5


C_RANGE = (1e-4, 3.0)   # the exponent c is fitted within this range


def fit_power_law(n: Sequence[float], auc: Sequence[float]) -> PowerLaw:
    """Least-squares fit of ``AUC = a − b·N^−c`` (scipy's ``curve_fit``); needs ≥ 3 distinct sizes."""
    from scipy.optimize import OptimizeWarning, curve_fit

    n = np.asarray(n, dtype=float)
    auc = np.asarray(auc, dtype=float)
    if len(np.unique(n)) < 3:
        raise ValueError(f"a power-law fit needs at least 3 distinct model sizes, got {len(np.unique(n))}")

    def model(x, a, b, c):
        return a - b * np.power(x, -c)

    guess = (auc.max() + 0.01, (auc.max() - auc.min() + 1e-3) * n.min() ** 0.3, 0.3)
    with warnings.catch_warnings():  # 3 points fit 3 parameters exactly: no covariance, and that is fine
        warnings.simplefilter("ignore", OptimizeWarning)
        params, _ = curve_fit(model, n, auc, p0=guess, bounds=([0, 0, C_RANGE[0]], [2, np.inf, C_RANGE[1]]),
                              maxfev=20_000)
    a, b, c = map(float, params)
    residual = float(np.sum((auc - model(n, a, b, c)) ** 2))
    total = float(np.sum((auc - auc.mean()) ** 2))
    r2 = 1.0 - residual / total if total > 0 else float("nan")
    at_bound = bool(np.isclose(c, C_RANGE, rtol=1e-3, atol=1e-6).any())
    return PowerLaw(a, b, c, r2=r2, at_bound=at_bound)


# -- plots and page ------------------------------------------------------------------------------------------

def plot_one_epoch(curves: Sequence[RunCurve], path: Path) -> Path:
    """Validation AUC vs fractional epoch, one line per (ranker, strategy, size) (mean over seeds), epochs marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    groups: dict[tuple[str, str, str], list[RunCurve]] = {}
    for c in curves:
        groups.setdefault((c.ranker, c.strategy, c.model_size), []).append(c)
    rankers = len({r for r, _, _ in groups})
    # one colour per (ranker, strategy), one line style per size (smallest solid), so a dozen lines stay apart
    series = sorted({(r, st) for r, st, _ in groups})
    colours = {key: plt.get_cmap("tab10")(i % 10) for i, key in enumerate(series)}
    dense = {(c.ranker, c.strategy, c.model_size): c.dense_params for c in curves}
    sizes = sorted({s for _, _, s in groups}, key=lambda s: min(
        (n for (_, _, size), n in dense.items() if size == s and not math.isnan(n)), default=math.inf))
    styles = {s: ("-", "--", "-.", ":")[i % 4] for i, s in enumerate(sizes)}
    max_epoch = 1.0
    for (ranker, strategy, size), members in sorted(groups.items()):
        grid = np.unique(np.concatenate([m.epochs for m in members]))
        grid = grid[~np.isnan(grid)]
        mean = np.nanmean([np.interp(grid, m.epochs, m.auc) for m in members], axis=0)
        label = series_label(ranker, strategy, rankers)
        if len({s for _, _, s in groups}) > 1:
            label += f" {size}"
        ax.plot(grid, mean, marker=".", label=label, color=colours[(ranker, strategy)], linestyle=styles[size])
        max_epoch = max(max_epoch, float(grid.max()) if len(grid) else 1.0)
    for boundary in range(1, int(math.ceil(max_epoch)) + 1):
        ax.axvline(boundary, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("training progress (epochs)")
    ax.set_ylabel("validation AUC")
    ax.set_title("Validation AUC during training (dotted: epoch boundaries)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scaling(table: pd.DataFrame, path: Path) -> tuple[Path, dict[str, PowerLaw]]:
    """Validation-selected test AUC vs dense parameters (log axis), one series per (ranker,) strategy, with its
    power-law fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fits: dict[str, PowerLaw] = {}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    sized = table.dropna(subset=["dense_params"])
    rankers = sized["ranker"].nunique()
    for (ranker, strategy), rows in sized.groupby(["ranker", "strategy"]):
        strategy = series_label(ranker, strategy, rankers)
        rows = rows.sort_values("dense_params")
        n, auc, err = rows["dense_params"].to_numpy(), rows["test_auc_mean"].to_numpy(), rows["test_auc_std"].to_numpy()
        line = ax.errorbar(n, auc, yerr=err, marker="o", linestyle="none", capsize=3, label=strategy)
        try:
            fit = fit_power_law(n, auc)
        except (ValueError, RuntimeError):
            continue
        fits[strategy] = fit
        xs = np.geomspace(n.min(), n.max(), 100)
        ax.plot(xs, fit(xs), color=line[0].get_color(), linewidth=1, label=f"{strategy}: {fit}")
    ax.set_xscale("log")
    ax.set_xlabel("dense (backbone) parameters N")
    ax.set_ylabel("test AUC at best validation")
    ax.set_title("Scaling: AUC = a − b·N^−c")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, fits


def write_html(path: Path, experiment: str, table_md: str, table: pd.DataFrame, images: Sequence[Path],
               fits: dict[str, PowerLaw]) -> Path:
    """One self-contained page: the table, the fits and the plots (embedded as data URIs)."""
    figures = "\n".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(p.stem)}</figcaption></figure>'
        for p in images)
    fit_items = "".join(f"<li>{html.escape(s)}: {html.escape(str(f))}</li>" for s, f in fits.items()) or \
        "<li>no fit (fewer than 3 model sizes per strategy)</li>"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hybrid review: {html.escape(experiment)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}img{{max-width:100%}}</style></head>
<body><h1>Experiment <code>{html.escape(experiment)}</code></h1>
<h2>Strategies × sizes (mean ± std over seeds)</h2>
{table.to_html(index=False, float_format=lambda v: f"{v:.4f}", border=0)}
<h2>Power-law fits</h2><ul>{fit_items}</ul>
<h2>Plots</h2>{figures}
<details><summary>Markdown table</summary><pre>{html.escape(table_md)}</pre></details>
</body></html>"""
    path.write_text(page)
    return path


# -- the command ---------------------------------------------------------------------------------------------

def run_review(tracker: Tracker, out: Path, stage: str = "finetune", parent_run: str | None = None) -> dict:
    """Read, summarise, plot, write, log as artifacts of a ``review`` run; returns the paths and fits.

    The ``review`` run nests under ``parent_run``; by default under the pipeline run (``sweep``,
    ``quickstart``) every reviewed run is nested under, when they share one."""
    curves = load_curves(tracker, stage=stage)
    if not curves:
        raise HybridInputError(f"experiment '{tracker.experiment}' at {tracker.tracking_uri} has no finished "
                               f"'{stage}' runs with '{AUC_METRIC}' to review")
    out.mkdir(parents=True, exist_ok=True)
    table = summary_table(curves)
    table_md = to_markdown(table)
    (out / "summary.md").write_text(table_md)
    table.to_csv(out / "summary.csv", index=False)
    images = [plot_one_epoch(curves, out / "one_epoch.png")]
    scaling, fits = plot_scaling(table, out / "scaling.png")
    images.append(scaling)
    page = write_html(out / "report.html", tracker.experiment, table_md, table, images, fits)
    if parent_run is None:
        parents = {c.parent_run for c in curves}
        parent_run = parents.pop() if len(parents) == 1 else None
    with tracker.run("review", parent=parent_run, tags={TAGS.stage: "review"}) as run:
        tracker.log_params(run, {"runs_reviewed": len(curves), "stage": stage})
        tracker.log_artifact(run, out, artifact_path="review")
    return {"table": table, "markdown": table_md, "fits": fits, "html": page, "runs": len(curves)}
