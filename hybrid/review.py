"""``hybrid review``: read an experiment's runs from MLflow and show whether pretraining helped.

The page has one section per (protocol, ranker) — a sequence ranker on protocol A and DCN-v2 on protocol B are
never drawn on one axis or averaged together — and a pretraining section. Writes into ``--out``:

- ``summary.md`` / ``summary.csv``: one row per (protocol, ranker, strategy, model size): validation AUC at
  the end of epoch 1 and at its best (what selects the checkpoint), test AUC at that best-validation step and
  of the final weights, whether the one-epoch drop happened (on validation) — mean ± std over seeds;
- ``one_epoch.png`` / ``scaling.png``: the one-epoch curves and the scaling points of every section, one
  panel per section (the overview);
- per section ``delta_auc-<section>.png`` (validation-selected test AUC minus NT's, per strategy),
  ``one_epoch-<section>.png`` (validation AUC against fractional epochs, mean ± std band over seeds, epoch
  boundaries marked) and, with two or more model sizes, ``scaling-<section>.png`` (test AUC against dense
  parameters with the fitted ``AUC = a − b·N^−c`` and its R²);
- ``pretraining.png``: HR@k / NDCG@k of every pretraining run against the most-popular baseline;
- ``report.html``: one self-contained page (``templates/review.html.j2``, tables by pandas' Styler, plots
  embedded) with all of it, the transfer summary of every run, and each run's id, MLflow link and git commit.

Everything is read from the store alone: the metric histories (``valid/auc`` with its ``progress/epoch``,
``test/auc`` logged at each new best validation step and at the end, ``transfer/...`` at step 0, a
pretraining run's ``eval/hr_at_<k>`` / ``eval/ndcg_at_<k>`` and ``baseline/popularity_...``), the run tags
(``protocol``, ``ranker``, ``strategy``, ``model_size``, ``dense_params``, ``seed``, ``one_epoch_drop``,
``pretrain_run_id``, the git commit) and, for a transferred run without ``transfer/...`` metrics, its
``transfer_report.json`` artifact. The outputs are logged as artifacts of a ``review`` run.
"""
from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from markupsafe import escape

from hybrid.adapters.config import Strategy
from hybrid.core.errors import HybridInputError, TransferError
from hybrid.ctr_models.metrics import one_epoch_drop
from hybrid.tracking import PARENT_TAG, TAGS, Tracker

AUC_METRIC = "valid/auc"
TEST_AUC_METRIC = "test/auc"
EPOCH_METRIC = "progress/epoch"
TRANSFER_PREFIX = "transfer/"
TRANSFER_REPORT = "transfer_report.json"
PROGRESS_BAR_VARIABLE = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
#: the fine-tuning stage tags its prepared data's protocol under this name (``last-item``, ``ratings``)
PROTOCOL_TAG = "protocol"
#: where a run's git commit is: MLflow's reserved source tag first, the project's own tag for older runs
COMMIT_TAGS = ("mlflow.source.git.commit", TAGS.git_commit)
#: the strategy table's figures, each named by its split, and their column headers
TABLE_METRICS = {"valid_auc_epoch1": "validation AUC, end of epoch 1", "valid_best_auc": "best validation AUC",
                 "test_auc": "test AUC at best validation", "test_final_auc": "test AUC, final weights"}
DROP_HEADER = "one-epoch drop (validation)"
#: how the page names the registered rankers (an unknown name is shown as it is tagged)
RANKER_LABELS = {"gpsd": "GPSD ranker", "dcn_v2": "DCN-v2", "mmoe": "MMoE",
                 "multi_embedding_moe": "multi-embedding MoE", "tin": "TIN"}
UNTAGGED = "-"            # what a missing ranker / model size / protocol tag reads as in the tables
MISSING = "–"             # a cell without a value: no model size (no transformer), no commit, no pretraining run
FIGSIZE, DPI = (8.0, 4.5), 110   # 880 × 495 px: the page shows the PNGs at this natural width, never scaled up
STRATEGY_ORDER = [s.value for s in Strategy]


# -- names ---------------------------------------------------------------------------------------------------

def strategy_label(strategy: str) -> str:
    """GPSD's spelling (``NT``, ``FT``, ``ST``, ``FT&SF``, ``ST&SF``); a value that is no strategy, as it is."""
    try:
        return Strategy.parse(strategy).label
    except TransferError:
        return strategy


def strategy_rank(strategy: str) -> int:
    """Position in GPSD's order (NT first); unknown strategies after the known ones."""
    return STRATEGY_ORDER.index(strategy) if strategy in STRATEGY_ORDER else len(STRATEGY_ORDER)


def ranker_label(ranker: str) -> str:
    return "ranker not tagged" if ranker == UNTAGGED else RANKER_LABELS.get(ranker, ranker)


def size_text(model_size: str) -> str:
    """A model size as a table shows it: a dash for a ranker without a transformer."""
    return MISSING if model_size == UNTAGGED else model_size


def series_name(strategy: str, model_size: str) -> str:
    """A plot series: ``ST&SF, L4H64A4`` (the strategy alone for a ranker without a model size)."""
    label = strategy_label(strategy)
    return label if model_size == UNTAGGED else f"{label}, {model_size}"


def seeds_phrase(counts: Sequence[int]) -> str:
    """``mean ± std over 3 seeds``, ``1 seed (no spread)`` or ``mean ± std over 1–3 seeds`` for a caption."""
    low, high = min(counts), max(counts)
    if high == 1:
        return "1 seed (no spread to show)"
    over = f"{low}–{high} seeds" if low != high else f"{high} seeds"
    return f"mean ± std over {over}" + (" (no spread where 1)" if low == 1 else "")


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
    protocol: str = UNTAGGED
    commit: str = ""
    pretrain_run: str | None = None
    experiment_id: str = ""
    #: ``transfer/...`` counts (tables loaded / frozen, rows aligned / new per table); empty without a transfer
    transfer: dict[str, float] = field(default_factory=dict)


@dataclass
class Section:
    """The runs of one (protocol, ranker): what one section of the page compares."""

    protocol: str
    ranker: str
    curves: list[RunCurve]

    @property
    def title(self) -> str:
        protocol = "protocol not tagged" if self.protocol == UNTAGGED else f"protocol {self.protocol}"
        return f"{ranker_label(self.ranker)} on {protocol}"

    @property
    def slug(self) -> str:
        """File-name and anchor form of the section: ``last-item-gpsd``."""
        return re.sub(r"[^a-z0-9]+", "-", f"{self.protocol}-{self.ranker}".lower()).strip("-") or "runs"


def _history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _search(tracker: Tracker, stage: str) -> list:
    """The experiment's FINISHED runs tagged ``stage=<stage>``."""
    found = tracker.client.get_experiment_by_name(tracker.experiment)
    if found is None:
        raise HybridInputError(f"{tracker.tracking_uri}: no experiment named '{tracker.experiment}'")
    runs = tracker.client.search_runs([found.experiment_id], filter_string=f"tags.{TAGS.stage} = '{stage}'",
                                      max_results=50_000)
    return [run for run in runs if run.info.status == "FINISHED"]


def _commit(tags: dict[str, str]) -> str:
    return next((tags[t] for t in COMMIT_TAGS if tags.get(t) and tags[t] != "unknown"), "")


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """MLflow draws a progress bar per download on stderr; a review downloads a few small JSON files."""
    saved = os.environ.get(PROGRESS_BAR_VARIABLE)
    os.environ[PROGRESS_BAR_VARIABLE] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(PROGRESS_BAR_VARIABLE, None)
        else:
            os.environ[PROGRESS_BAR_VARIABLE] = saved


def _transfer_counts(client, run) -> dict[str, float]:
    """The run's ``transfer/...`` metrics; a transferred run logged without them: the ``metrics`` of its
    ``transfer_report.json`` artifact (downloaded only then — metrics are the cheap read)."""
    counts = {k: v for k, v in run.data.metrics.items() if k.startswith(TRANSFER_PREFIX)}
    if counts or run.data.tags.get(TAGS.strategy, Strategy.NT.value) == Strategy.NT.value:
        return counts
    if TRANSFER_REPORT not in {a.path for a in client.list_artifacts(run.info.run_id)}:
        return {}
    with tempfile.TemporaryDirectory() as tmp, _no_progress_bar():
        report = json.loads(Path(client.download_artifacts(run.info.run_id, TRANSFER_REPORT, tmp)).read_text())
    return {k: float(v) for k, v in (report.get("metrics") or {}).items()}


def load_curves(tracker: Tracker, stage: str = "finetune") -> list[RunCurve]:
    """Every finished run of the experiment tagged ``stage=<stage>`` that logged ``valid/auc``."""
    client = tracker.client
    curves = []
    for run in _search(tracker, stage):
        auc = _history(client, run.info.run_id, AUC_METRIC)
        if not auc:
            continue
        epoch = _history(client, run.info.run_id, EPOCH_METRIC)
        test = _history(client, run.info.run_id, TEST_AUC_METRIC)
        steps = sorted(auc)
        tags = run.data.tags
        curves.append(RunCurve(
            run_id=run.info.run_id, name=run.info.run_name or run.info.run_id, ranker=tags.get(TAGS.ranker, UNTAGGED),
            strategy=tags.get(TAGS.strategy, "nt"), model_size=tags.get(TAGS.model_size, UNTAGGED),
            dense_params=float(tags.get(TAGS.dense_params, "nan")), seed=tags.get(TAGS.seed, "0"),
            steps=np.array(steps, dtype=np.int64),
            epochs=np.array([epoch.get(s, np.nan) for s in steps], dtype=float),
            auc=np.array([auc[s] for s in steps], dtype=float), test_auc=test,
            one_epoch_tag=tags.get(TAGS.one_epoch_drop), parent_run=tags.get(PARENT_TAG),
            protocol=tags.get(PROTOCOL_TAG, UNTAGGED), commit=_commit(tags),
            pretrain_run=tags.get(TAGS.pretrain_run), experiment_id=run.info.experiment_id,
            transfer=_transfer_counts(client, run)))
    return curves


def _pretrain_protocol(run) -> str:
    """A pretraining run's protocol: its ``protocol`` tag, else the protocol in the name of its dataset inputs
    (``<dataset>/<protocol>/<table>``, see ``Tracker.log_prepared_data``)."""
    if run.data.tags.get(PROTOCOL_TAG):
        return run.data.tags[PROTOCOL_TAG]
    inputs = run.inputs.dataset_inputs if run.inputs is not None else []
    names = {d.dataset.name.split("/")[1] for d in inputs if d.dataset.name.count("/") >= 2}
    return names.pop() if len(names) == 1 else UNTAGGED


def load_pretraining(tracker: Tracker) -> pd.DataFrame:
    """One row per finished ``stage=pretrain`` run with retrieval metrics: its last ``eval/hr_at_<k>`` and
    ``eval/ndcg_at_<k>`` (the latest step's value, what MLflow keeps as the run's metric) beside the
    most-popular baseline logged at step 0."""
    rows = []
    for run in _search(tracker, "pretrain"):
        metrics, tags = run.data.metrics, run.data.tags
        ks = sorted(int(m.group(1)) for m in map(re.compile(r"eval/hr_at_(\d+)$").match, metrics) if m)
        if not ks:
            continue
        k = ks[0]
        rows.append({"run_id": run.info.run_id, "name": run.info.run_name or run.info.run_id,
                     "experiment_id": run.info.experiment_id, "protocol": _pretrain_protocol(run),
                     "model_size": tags.get(TAGS.model_size, UNTAGGED),
                     "dense_params": float(tags.get(TAGS.dense_params, "nan")), "k": k,
                     "hr": metrics[f"eval/hr_at_{k}"], "ndcg": metrics.get(f"eval/ndcg_at_{k}", np.nan),
                     "popular_hr": metrics.get(f"baseline/popularity_hr_at_{k}", np.nan),
                     "popular_ndcg": metrics.get(f"baseline/popularity_ndcg_at_{k}", np.nan),
                     "commit": _commit(tags)})
    frame = pd.DataFrame(rows, columns=["run_id", "name", "experiment_id", "protocol", "model_size", "dense_params",
                                        "k", "hr", "ndcg", "popular_hr", "popular_ndcg", "commit"])
    return frame.sort_values(["protocol", "dense_params", "model_size"], kind="stable", ignore_index=True)


def split_sections(curves: Sequence[RunCurve]) -> list[Section]:
    """One section per (protocol, ranker), in that order."""
    groups: dict[tuple[str, str], list[RunCurve]] = {}
    for c in curves:
        groups.setdefault((c.protocol, c.ranker), []).append(c)
    return [Section(protocol, ranker, members) for (protocol, ranker), members in sorted(groups.items())]


# -- summarising ---------------------------------------------------------------------------------------------

def summarise_run(curve: RunCurve) -> dict:
    """The per-run figures of the strategy table (validation selects, test is read at the selected step)."""
    at_boundary = curve.epochs <= 1.0 + 1e-9
    epoch1 = curve.auc[at_boundary][-1] if at_boundary.any() else np.nan
    points = [(e, a) for e, a in zip(curve.epochs, curve.auc) if not math.isnan(e)]
    best = int(np.nanargmax(curve.auc)) if np.isfinite(curve.auc).any() else -1
    best_step = int(curve.steps[best]) if best >= 0 else -1
    return {
        "run_id": curve.run_id, "protocol": curve.protocol, "ranker": curve.ranker, "strategy": curve.strategy,
        "model_size": curve.model_size, "dense_params": curve.dense_params, "seed": curve.seed,
        "valid_auc_epoch1": float(epoch1), "valid_best_auc": float(curve.auc[best]) if best >= 0 else np.nan,
        "test_auc": curve.test_auc.get(best_step, np.nan),
        "test_final_auc": curve.test_auc[max(curve.test_auc)] if curve.test_auc else np.nan,
        # the trainer's verdict (judged against its validation set's noise); recomputed with the fixed
        # default tolerance only for runs logged without it
        "one_epoch_drop": (curve.one_epoch_tag == "true" if curve.one_epoch_tag is not None
                           else bool(one_epoch_drop(points).flagged) if points else False),
    }


def summary_table(curves: Sequence[RunCurve]) -> pd.DataFrame:
    """(Protocol, ranker, strategy, size) table, mean ± std over seeds (std over one seed is 0).

    Rankers without a transformer have no size (``-``): grouping by ranker keeps them apart; grouping by
    protocol keeps one ranker's runs on two protocols apart. ``one_epoch_drop`` is the share of runs with a
    drop, ``one_epoch_drops`` their number out of ``runs``. Rows follow GPSD's strategy order (NT first).
    """
    runs = pd.DataFrame([summarise_run(c) for c in curves])
    if runs.empty:
        return runs
    metrics = list(TABLE_METRICS)
    grouped = runs.groupby(["protocol", "ranker", "strategy", "model_size"], sort=True)
    table = grouped[metrics].agg(["mean", "std"])
    table.columns = [f"{m}_{s}" for m, s in table.columns]
    table = table.fillna({c: 0.0 for c in table.columns if c.endswith("_std")})
    table["dense_params"] = grouped["dense_params"].first()
    table["seeds"] = grouped["seed"].nunique()
    table["runs"] = grouped.size()
    table["one_epoch_drops"] = grouped["one_epoch_drop"].sum().astype(int)
    table["one_epoch_drop"] = grouped["one_epoch_drop"].mean()   # fraction of seeds with a drop
    table = table.reset_index()
    table["_order"] = table["strategy"].map(strategy_rank)
    return table.sort_values(["protocol", "ranker", "_order", "strategy", "dense_params", "model_size"],
                             kind="stable", ignore_index=True).drop(columns="_order")


# -- human tables --------------------------------------------------------------------------------------------

def mean_std_text(mean: float, std: float, seeds: int) -> str:
    """``0.7786 ± 0.0022`` over two or more seeds; over one seed the value alone (there is no spread)."""
    if math.isnan(mean):
        return MISSING
    return f"{mean:.4f} ± {std:.4f}" if seeds >= 2 else f"{mean:.4f}"


def drop_text(drops: int, runs: int) -> str:
    """The one-epoch verdict over seeds: ``yes`` (every run), ``no`` (none) or ``2 of 3 seeds``."""
    return "yes" if drops == runs else "no" if drops == 0 else f"{drops} of {runs} seeds"


def strategy_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The summary table as the page shows it: human headers that name each number's split, GPSD's strategy
    names, ``± std`` only over two or more seeds, the one-epoch verdict as words."""
    frame = pd.DataFrame({
        "protocol": table["protocol"], "ranker": table["ranker"].map(ranker_label),
        "strategy": table["strategy"].map(strategy_label),
        "model size": table["model_size"].replace(UNTAGGED, MISSING),
        "dense parameters": table["dense_params"], "seeds": table["seeds"]})
    for metric, header in TABLE_METRICS.items():
        frame[header] = [mean_std_text(m, s, n) for m, s, n in
                         zip(table[f"{metric}_mean"], table[f"{metric}_std"], table["seeds"])]
    frame[DROP_HEADER] = [drop_text(d, n) for d, n in zip(table["one_epoch_drops"], table["runs"])]
    return frame


INTEGER_FORMAT = "{:,.0f}"   # 139,202 — never 139202.0000


def styled(frame: pd.DataFrame, integers: Sequence[str], escape: bool, uuid: str = "") -> "pd.io.formats.style.Styler":
    """A Styler of ``frame`` without its index, integers with thousands separators and a dash for missing;
    ``escape``: HTML-escape the text cells and headers (not for the markdown copy)."""
    styler = frame.style.hide(axis="index").format(INTEGER_FORMAT, subset=list(integers), na_rep=MISSING)
    if escape:
        text = [c for c in frame.columns if c not in integers]
        styler = styler.format(escape="html", subset=text, na_rep=MISSING).format_index(escape="html", axis=1)
    return styler.set_uuid(uuid) if uuid else styler


def to_markdown(table: pd.DataFrame) -> str:
    """The strategy table (every section, protocol and ranker as columns) as a Markdown table."""
    lines = styled(strategy_frame(table), ["dense parameters"], escape=False).to_string(delimiter="\t").splitlines()
    cells = [line.split("\t") for line in lines if line]
    rows = ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join([rows[0], "|" + "---|" * len(cells[0]), *rows[1:]]) + "\n"


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


def fit_key(section: Section, strategy: str, sections: int) -> str:
    """The name of a fit in ``run_review``'s ``fits``: the strategy, prefixed by protocol and ranker when the
    experiment has several sections."""
    return strategy if sections <= 1 else f"{section.protocol} {section.ranker} {strategy}"


# -- plots ---------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")   # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def strategy_colour(strategy: str):
    """One colour per strategy on every plot of the page, so NT is the same grey everywhere."""
    plt = _pyplot()
    return plt.get_cmap("tab10")((7, 0, 2, 1, 3, 4)[min(strategy_rank(strategy), 5)])


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def _by_size(table: pd.DataFrame) -> list[str]:
    """The model sizes of ``table``, smallest dense parameter count first."""
    return list(table.sort_values("dense_params", kind="stable")["model_size"].drop_duplicates())


def mean_std_curve(members: Sequence[RunCurve]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validation AUC over seeds on the union of their evaluation epochs: ``(epochs, mean, std)``; a seed
    counts only inside its own range of epochs (no extrapolation); std is 0 where one seed is left."""
    grid = np.unique(np.concatenate([m.epochs[~np.isnan(m.epochs)] for m in members]))
    values = []
    for m in members:
        keep = ~np.isnan(m.epochs)
        x, y = m.epochs[keep], m.auc[keep]
        inside = (grid >= x.min()) & (grid <= x.max()) if len(x) else np.zeros(len(grid), bool)
        values.append(np.where(inside, np.interp(grid, x, y) if len(x) else np.nan, np.nan))
    stacked = np.array(values)
    with warnings.catch_warnings():   # an epoch only one seed reached: its std is undefined, shown as none
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(stacked, axis=0)
        std = np.nan_to_num(np.nanstd(stacked, axis=0, ddof=1)) if len(members) > 1 else np.zeros(len(grid))
    return grid, mean, std


def draw_one_epoch(ax, section: Section) -> list[int]:
    """Validation AUC vs fractional epoch, one line per (strategy, size) with a ± std band over seeds; colour =
    strategy, line style = size; dotted verticals at epoch boundaries. Returns the seed count of each line."""
    groups: dict[tuple[str, str], list[RunCurve]] = {}
    for c in section.curves:
        groups.setdefault((c.strategy, c.model_size), []).append(c)
    sizes = sorted({s for _, s in groups}, key=lambda s: min(c.dense_params for c in section.curves
                                                              if c.model_size == s))
    styles = {s: ("-", "--", "-.", ":")[i % 4] for i, s in enumerate(sizes)}
    seeds, max_epoch = [], 1.0
    for (strategy, size), members in sorted(groups.items(), key=lambda kv: (strategy_rank(kv[0][0]), kv[0][0],
                                                                              sizes.index(kv[0][1]))):
        grid, mean, std = mean_std_curve(members)
        colour = strategy_colour(strategy)
        ax.plot(grid, mean, marker=".", color=colour, linestyle=styles[size], label=series_name(strategy, size))
        if len(members) > 1:
            ax.fill_between(grid, mean - std, mean + std, color=colour, alpha=0.18, linewidth=0)
        seeds.append(len({m.seed for m in members}))
        max_epoch = max(max_epoch, float(grid.max()) if len(grid) else 1.0)
    for boundary in range(1, int(math.ceil(max_epoch)) + 1):
        ax.axvline(boundary, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("training progress (epochs)")
    ax.set_ylabel("validation AUC")
    ax.set_title(section.title, fontsize=10)
    ax.legend(fontsize=8)
    return seeds


def delta_vs_nt(table: pd.DataFrame) -> pd.DataFrame:
    """Per (size, strategy ≠ NT) of one section: validation-selected test AUC minus NT's at the same size,
    ``err`` = √(std² + std_NT²) over seeds (0 where both have one seed), ``seeds`` / ``nt_seeds`` behind each.
    Empty without a matching NT row."""
    nt = table[table["strategy"] == Strategy.NT.value].set_index("model_size")
    others = table[(table["strategy"] != Strategy.NT.value) & table["model_size"].isin(nt.index)]
    reference = nt.loc[others["model_size"]]
    return pd.DataFrame({
        "model_size": others["model_size"].to_numpy(), "strategy": others["strategy"].to_numpy(),
        "dense_params": others["dense_params"].to_numpy(),
        "delta": others["test_auc_mean"].to_numpy() - reference["test_auc_mean"].to_numpy(),
        "err": np.hypot(others["test_auc_std"].to_numpy(), reference["test_auc_std"].to_numpy()),
        "seeds": others["seeds"].to_numpy(), "nt_seeds": reference["seeds"].to_numpy()})


def draw_delta(ax, delta: pd.DataFrame) -> None:
    """Grouped bars: one group per model size, one bar per strategy, seed error bars, values written on them."""
    sizes = _by_size(delta)
    strategies = sorted(delta["strategy"].unique(), key=strategy_rank)
    width = 0.8 / len(strategies)
    for i, strategy in enumerate(strategies):
        rows = delta[delta["strategy"] == strategy].set_index("model_size")
        x = [sizes.index(s) + (i - (len(strategies) - 1) / 2) * width for s in rows.index]
        err = rows["err"].to_numpy() if (rows["err"] > 0).any() else None
        bars = ax.bar(x, rows["delta"], width, yerr=err, capsize=4, color=strategy_colour(strategy),
                      label=strategy_label(strategy))
        ax.bar_label(bars, fmt="%+.4f", fontsize=8, padding=2)
    ax.axhline(0, color="black", linewidth=0.8)
    if sizes == [UNTAGGED]:    # a ranker without a transformer: one group, nothing to name on the axis
        ax.set_xticks([])
    else:
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_xlabel("model size")
    ax.set_ylabel("Δ test AUC vs NT")
    ax.margins(y=0.2)   # room for the value labels above and below the bars
    ax.legend(fontsize=8)


def draw_scaling(ax, table: pd.DataFrame, title: str) -> dict[str, PowerLaw]:
    """Test AUC at the best validation step against dense parameters (log axis), one series per strategy, with
    its power-law fit drawn (R² in the legend) where there are ≥ 3 sizes. Returns the fits by strategy."""
    fits: dict[str, PowerLaw] = {}
    sized = table.dropna(subset=["dense_params"])
    for strategy, rows in sorted(sized.groupby("strategy"), key=lambda kv: strategy_rank(kv[0])):
        rows = rows.sort_values("dense_params")
        n, auc = rows["dense_params"].to_numpy(), rows["test_auc_mean"].to_numpy()
        colour = strategy_colour(strategy)
        ax.errorbar(n, auc, yerr=rows["test_auc_std"].to_numpy(), marker="o", linestyle="none", capsize=3,
                    color=colour, label=strategy_label(strategy))
        try:
            fit = fit_power_law(n, auc)
        except (ValueError, RuntimeError):
            continue
        fits[strategy] = fit
        xs = np.geomspace(n.min(), n.max(), 100)
        ax.plot(xs, fit(xs), color=colour, linewidth=1, linestyle="--" if fit.poor else "-",
                label=f"{strategy_label(strategy)} fit, R² {fit.r2:.2f}" + (" (poor)" if fit.poor else ""))
    ax.set_xscale("log")
    ax.set_xlabel("dense (backbone) parameters N")
    ax.set_ylabel("test AUC at best validation")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return fits


def _panels(count: int):
    """A figure with ``count`` stacked panels of the page's size each."""
    fig, axes = _pyplot().subplots(count, 1, figsize=(FIGSIZE[0], FIGSIZE[1] * count), squeeze=False)
    return fig, list(axes[:, 0])


def plot_one_epoch(curves: Sequence[RunCurve], path: Path) -> Path:
    """The overview ``one_epoch.png``: :func:`draw_one_epoch` of every (protocol, ranker) in its own panel."""
    sections = split_sections(curves)
    fig, axes = _panels(len(sections))
    for ax, section in zip(axes, sections):
        draw_one_epoch(ax, section)
    return _save(fig, path)


def plot_scaling(table: pd.DataFrame, path: Path) -> tuple[Path, dict[str, PowerLaw]]:
    """The overview ``scaling.png``: :func:`draw_scaling` of every (protocol, ranker) in its own panel, and the
    fits named by :func:`fit_key`."""
    groups = list(table.groupby(["protocol", "ranker"], sort=True))
    fig, axes = _panels(len(groups))
    fits = {}
    for ax, ((protocol, ranker), rows) in zip(axes, groups):
        section = Section(protocol, ranker, [])
        for strategy, fit in draw_scaling(ax, rows, section.title).items():
            fits[fit_key(section, strategy, len(groups))] = fit
    return _save(fig, path), fits


def plot_pretraining(frame: pd.DataFrame, path: Path) -> Path:
    """Two panels (HR@k, NDCG@k): per pretraining run the model's bar beside the most-popular baseline's."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=FIGSIZE)
    labels = [f"{size}\n{protocol}" for size, protocol in zip(frame["model_size"], frame["protocol"])]
    x = np.arange(len(frame))
    k = "k" if frame["k"].nunique() > 1 else str(frame["k"].iloc[0])
    for ax, metric, name in zip(axes, ("hr", "ndcg"), (f"HR@{k}", f"NDCG@{k}")):
        model = ax.bar(x - 0.2, frame[metric], 0.4, label="pretrained model", color=plt.get_cmap("tab10")(0))
        popular = ax.bar(x + 0.2, frame[f"popular_{metric}"], 0.4, label="most popular", color="0.65")
        for bars in (model, popular):
            ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylabel(name)
        ax.margins(y=0.15)
        ax.legend(fontsize=8)
    return _save(fig, path)


# -- the page ------------------------------------------------------------------------------------------------

@dataclass
class Figure:
    """A PNG on the page with the caption saying what it shows."""

    path: Path
    caption: str

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.path.read_bytes()).decode()


@dataclass
class SectionView:
    """What the template shows of one (protocol, ranker); a ``None`` figure comes with a note saying why."""

    title: str
    slug: str
    strategy_table: str
    delta: Figure | None
    delta_note: str
    one_epoch: Figure
    scaling: Figure | None
    scaling_notes: list[str]
    transfer_table: str | None
    runs_table: str


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI of an ``http(s)://`` tracking server; ``None`` for other stores (a
    SQLite file has no UI of its own: ``mlflow ui --backend-store-uri <uri>`` serves one)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _run_link(tracking_uri: str, experiment_id: str):
    """A Styler formatter: a run id as a link to its UI page when the store has one, else the id as text."""
    def link(run_id: str) -> str:
        if not run_id:
            return MISSING
        url = run_url(tracking_uri, experiment_id, run_id)
        return f'<a href="{escape(url)}"><code>{escape(run_id)}</code></a>' if url else f"<code>{escape(run_id)}</code>"

    return link


def _html_styler(frame: pd.DataFrame, caption: str, uuid: str, integers: Sequence[str] = (),
                 links: dict | None = None) -> "pd.io.formats.style.Styler":
    """``frame`` through :func:`styled` for the page, with a caption; ``links``: column → formatter writing HTML."""
    styler = styled(frame, integers, escape=True, uuid=uuid).set_caption(str(escape(caption)))
    for column, formatter in (links or {}).items():
        styler = styler.format(formatter, subset=[column])
    return styler


def strategy_table_html(table: pd.DataFrame, section: Section) -> str:
    """The section's strategy table; the best test AUC at the best validation step of each size in bold."""
    frame = strategy_frame(table).drop(columns=["protocol", "ranker"])
    caption = (f"{section.title}: validation selects the checkpoint, test is read at that step; "
               f"{seeds_phrase(list(table['seeds']))}. Bold: the highest test AUC at best validation of each model size.")
    best = (table["test_auc_mean"] == table.groupby("model_size")["test_auc_mean"].transform("max")).to_numpy()
    styler = _html_styler(frame, caption, f"strategies-{section.slug}", ["dense parameters"])
    return styler.apply(lambda column: np.where(best, "font-weight: bold", ""),
                        subset=[TABLE_METRICS["test_auc"]]).to_html()


def transfer_frame(curves: Sequence[RunCurve]) -> pd.DataFrame:
    """One row per run that transferred weights: what its ``transfer/...`` counts say was loaded and frozen."""
    rows = []
    for c in sorted(curves, key=lambda c: (strategy_rank(c.strategy), c.dense_params, c.seed)):
        if not c.transfer:
            continue
        t = c.transfer
        aligned = {k[len("transfer/rows_aligned/"):]: v for k, v in t.items() if k.startswith("transfer/rows_aligned/")}
        new = sum(v for k, v in t.items() if k.startswith("transfer/rows_new/"))
        rows.append({"strategy": strategy_label(c.strategy), "model size": size_text(c.model_size),
                     "seed": c.seed, "tables loaded": t.get("transfer/tables_loaded", np.nan),
                     "tables frozen": t.get("transfer/tables_frozen", np.nan),
                     "modules loaded": t.get("transfer/modules_loaded", np.nan),
                     "rows loaded": sum(aligned.values()) if aligned else np.nan,
                     "rows new": new if aligned else np.nan,
                     "frozen parameters": t.get("transfer/frozen_params", np.nan),
                     "trainable parameters": t.get("transfer/trainable_params", np.nan),
                     # the table names after the module path: features.ec/t_item_id → t_item_id
                     "loaded tables": ", ".join(sorted(k.rsplit("/", 1)[-1] for k in aligned)) or MISSING,
                     "pretraining run": c.pretrain_run or "", "run id": c.run_id})
    return pd.DataFrame(rows)


TRANSFER_INTEGERS = ["tables loaded", "tables frozen", "modules loaded", "rows loaded", "rows new",
                     "frozen parameters", "trainable parameters"]


def runs_frame(curves: Sequence[RunCurve]) -> pd.DataFrame:
    """One row per run of a section: name, strategy, size, seed, run id, git commit, pretraining run."""
    ordered = sorted(curves, key=lambda c: (strategy_rank(c.strategy), c.dense_params, c.seed))
    return pd.DataFrame({"run": [c.name for c in ordered], "strategy": [strategy_label(c.strategy) for c in ordered],
                         "model size": [size_text(c.model_size) for c in ordered],
                         "seed": [c.seed for c in ordered], "run id": [c.run_id for c in ordered],
                         "git commit": [c.commit[:12] or MISSING for c in ordered],
                         "pretraining run": [c.pretrain_run or "" for c in ordered]})


def delta_figure(section: Section, table: pd.DataFrame, out: Path) -> tuple[Figure | None, str]:
    """The section's Δ AUC vs NT chart, or ``None`` and the sentence saying why there is none."""
    delta = delta_vs_nt(table)
    if Strategy.NT.value not in set(table["strategy"]):
        return None, "No NT run in this section: there is no from-scratch baseline to compare the strategies with."
    if delta.empty:
        return None, "Only NT runs in this section (or no other strategy at an NT run's model size): nothing to compare."
    fig, ax = _pyplot().subplots(figsize=FIGSIZE)
    draw_delta(ax, delta)
    ax.set_title(f"{section.title}: Δ test AUC vs NT", fontsize=10)
    spread = "error bars ± √(std² + std_NT²)" if (delta["err"] > 0).any() else "no error bars"
    return Figure(_save(fig, out / f"delta_auc-{section.slug}.png"),
                  f"Test AUC at the best validation step minus NT's at the same model size, per strategy (strategies: "
                  f"{seeds_phrase(list(delta['seeds']))}; NT: {seeds_phrase(list(delta['nt_seeds']))}; {spread}). "
                  f"Above 0: the strategy beat training from scratch."), ""


def one_epoch_figure(section: Section, out: Path) -> Figure:
    """The section's one-epoch curves (:func:`draw_one_epoch`) with their caption."""
    fig, ax = _pyplot().subplots(figsize=FIGSIZE)
    seeds = draw_one_epoch(ax, section)
    return Figure(_save(fig, out / f"one_epoch-{section.slug}.png"),
                  f"Validation AUC during training against fractional epochs, one line per strategy and model size: "
                  f"{seeds_phrase(seeds)}, shaded band ± std. Dotted verticals: epoch boundaries — a peak at epoch 1 "
                  f"followed by a fall is the one-epoch drop.")


def scaling_notes(table: pd.DataFrame, fits: dict[str, PowerLaw]) -> list[str]:
    """Per strategy of a section, why its scaling points have no trustworthy fit: too few sizes, or a poor fit."""
    notes = []
    for strategy in sorted(set(table["strategy"]), key=strategy_rank):
        if strategy not in fits:
            n = table[table["strategy"] == strategy]["dense_params"].nunique()
            notes.append(f"{strategy_label(strategy)}: {n} model size{'s' * (n != 1)} — no power-law fit (it needs "
                         f"at least 3).")
        elif fits[strategy].poor:
            notes.append(f"{strategy_label(strategy)}: poor fit (R² {fits[strategy].r2:.2f}) — these points do not "
                         f"follow a power law; read the points, not the line.")
    return notes


def scaling_figure(section: Section, table: pd.DataFrame, out: Path) -> tuple[Figure | None, list[str]]:
    """The section's scaling plot (two or more sizes) with the fits in its caption, and the warnings."""
    if table.dropna(subset=["dense_params"])["dense_params"].nunique() < 2:
        return None, ["Fewer than two model sizes in this section: no scaling plot (a power-law fit needs at least 3)."]
    fig, ax = _pyplot().subplots(figsize=FIGSIZE)
    fits = draw_scaling(ax, table, f"{section.title}: scaling")
    fit_text = "; ".join(f"{strategy_label(s)}: {f}" for s, f in fits.items())
    figure = Figure(_save(fig, out / f"scaling-{section.slug}.png"),
                    f"Test AUC at the best validation step against dense (backbone) parameters N, log axis; points: "
                    f"{seeds_phrase(list(table['seeds']))}; lines: the fitted AUC = a − b·N^−c"
                    + (f" — {fit_text}." if fit_text else "."))
    return figure, scaling_notes(table, fits)


def transfer_table(section: Section, tracking_uri: str) -> str | None:
    """The section's transfer summary as HTML (``None`` when no run transferred anything)."""
    transfers = transfer_frame(section.curves)
    if transfers.empty:
        return None
    link = _run_link(tracking_uri, section.curves[0].experiment_id)
    return _html_styler(transfers, "What each transferred run loaded and froze (its transfer/... metrics, logged at "
                        "step 0); rows loaded: embedding rows filled from the pretrained table, rows new: rows the "
                        "pretraining never saw.", f"transfer-{section.slug}", TRANSFER_INTEGERS,
                        {"pretraining run": link, "run id": link}).to_html()


def runs_table(section: Section, tracking_uri: str) -> str:
    """The section's runs as HTML: ids (links on a tracking server), git commits, pretraining runs."""
    link = _run_link(tracking_uri, section.curves[0].experiment_id)
    return _html_styler(runs_frame(section.curves), f"The {len(section.curves)} runs of this section.",
                        f"runs-{section.slug}", links={"run id": link, "pretraining run": link}).to_html()


def section_view(section: Section, table: pd.DataFrame, out: Path, tracking_uri: str) -> SectionView:
    """Tables, figures (written into ``out``) and notes of one section."""
    delta, delta_note = delta_figure(section, table, out)
    scaling, notes = scaling_figure(section, table, out)
    return SectionView(section.title, section.slug, strategy_table_html(table, section), delta, delta_note,
                       one_epoch_figure(section, out), scaling, notes, transfer_table(section, tracking_uri),
                       runs_table(section, tracking_uri))


def pretraining_view(frame: pd.DataFrame, out: Path, tracking_uri: str) -> tuple[str, Figure] | None:
    """The pretraining table and plot (``None`` without pretraining runs)."""
    if frame.empty:
        return None
    k = "k" if frame["k"].nunique() > 1 else str(frame["k"].iloc[0])
    shown = pd.DataFrame({
        "protocol": frame["protocol"], "model size": frame["model_size"], "dense parameters": frame["dense_params"],
        **({"k": frame["k"]} if k == "k" else {}),
        f"HR@{k}": frame["hr"].map("{:.4f}".format), f"HR@{k}, most popular": frame["popular_hr"].map("{:.4f}".format),
        f"NDCG@{k}": frame["ndcg"].map("{:.4f}".format),
        f"NDCG@{k}, most popular": frame["popular_ndcg"].map("{:.4f}".format),
        "run id": frame["run_id"], "git commit": frame["commit"].str[:12].replace("", MISSING)})
    link = _run_link(tracking_uri, str(frame["experiment_id"].iloc[0]))
    what = ("on the pretraining evaluation split (each user's held-out next item), the run's last evaluation; most "
            "popular: every user gets the same ranking, by training frequency")
    table = _html_styler(shown, f"Retrieval of the pretrained models {what}.", "pretraining", ["dense parameters"],
                         {"run id": link}).to_html()
    figure = Figure(plot_pretraining(frame, out / "pretraining.png"),
                    f"HR@{k} and NDCG@{k} of each pretraining run (one run each, no seeds to average) {what}.")
    return table, figure


def browse_hint(tracking_uri: str, experiment_id: str) -> str:
    """How to open the runs: the experiment's UI page on a server; the ``mlflow ui`` command for a file store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def write_html(path: Path, experiment: str, tracking_uri: str, sections: Sequence[SectionView],
               pretraining: tuple[str, Figure] | None, table_md: str, experiment_id: str, runs: int) -> Path:
    """Render ``templates/review.html.j2`` into one self-contained page (plots embedded as data URIs)."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("hybrid", "templates"), autoescape=select_autoescape(["j2", "html"]))
    page = env.get_template("review.html.j2").render(
        experiment=experiment, tracking_uri=tracking_uri, server=run_url(tracking_uri, "", "") is not None,
        browse=browse_hint(tracking_uri, experiment_id), sections=sections, pretraining=pretraining,
        table_md=table_md, runs=runs)
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
    plot_one_epoch(curves, out / "one_epoch.png")    # the overview files; the page shows the per-section plots
    _, fits = plot_scaling(table, out / "scaling.png")
    sections = split_sections(curves)
    views = [section_view(s, table[(table["protocol"] == s.protocol) & (table["ranker"] == s.ranker)],
                          out, tracker.tracking_uri) for s in sections]
    pretraining = pretraining_view(load_pretraining(tracker), out, tracker.tracking_uri)
    page = write_html(out / "report.html", tracker.experiment, tracker.tracking_uri, views, pretraining, table_md,
                      curves[0].experiment_id, len(curves))
    if parent_run is None:
        parents = {c.parent_run for c in curves}
        parent_run = parents.pop() if len(parents) == 1 else None
    with tracker.run("review", parent=parent_run, tags={TAGS.stage: "review"}) as run:
        tracker.log_params(run, {"runs_reviewed": len(curves), "stage": stage})
        tracker.log_artifact(run, out, artifact_path="review")
    return {"table": table, "markdown": table_md, "fits": fits, "html": page, "runs": len(curves)}
