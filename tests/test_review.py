"""`hybrid review` over a real SQLite MLflow store: the page's numbers equal the logged metrics, one section per
(protocol, ranker), human headers, Δ AUC vs NT, one-epoch bands, the scaling fit, pretraining against most
popular, transfer summaries, run links, captions, and a layout that fits 1280 and 1920 px in headless Chromium.

One store is filled once for the module (``study``): a sweep-like parent with
- the GPSD ranker on protocol ``last-item``: 4 sizes × NT / ST&SF × 2 seeds; NT peaks at epoch 1 then falls,
  ST&SF keeps rising to a known power law; ST&SF runs carry ``transfer/...`` metrics;
- DCN-v2 (no transformer, no size) on protocol ``ratings``: NT × 3 seeds (one-epoch drop on 2 of them), FT and
  ST&SF × 1 seed — ST&SF has only its ``transfer_report.json`` artifact, no ``transfer/...`` metrics;
- DCN-v2 on protocol ``last-item``: ST&SF only (no NT to compare with);
- three pretraining runs (protocol from their dataset inputs, or a tag) and one failed fine-tuning run.
"""
from __future__ import annotations

import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomllib
from mlflow import MlflowClient
from mlflow.entities import Metric

from hybrid.adapters.config import Strategy
from hybrid.adapters.report import TableEntry, TransferReport
from hybrid.cli import main
from hybrid.review import (
    delta_vs_nt,
    draw_delta,
    draw_one_epoch,
    draw_scaling,
    fit_power_law,
    load_curves,
    load_pretraining,
    mean_std_curve,
    run_review,
    run_url,
    runs_table,
    scaling_notes,
    split_sections,
    summary_table,
    transfer_table,
)
from hybrid.tracking import PARENT_TAG, PRETRAIN_INPUTS, TAGS, Tracker

REPO = Path(__file__).resolve().parents[1]
TRUE = dict(a=0.75, b=0.9, c=0.3)
SIZES = {"L4H32A4": 53_504, "L4H64A4": 213_568, "L4H128A4": 803_968, "L4H256A4": 3_211_520}
TEST_GAP = 0.01  # the synthetic runs' test AUC sits this far below their validation AUC
A, B = "last-item", "ratings"
DCN_PARAMS = 139_202
#: what an ST&SF run of the GPSD ranker loaded (its transfer/... metrics, as TransferReport.metrics names them)
GPSD_TRANSFER = {"transfer/tables_loaded": 2, "transfer/tables_frozen": 2, "transfer/tables_skipped": 1,
                 "transfer/modules_loaded": 0, "transfer/frozen_params": 27_000, "transfer/trainable_params": 45_678,
                 "transfer/rows_aligned/features.ec/t_item_id": 1616, "transfer/rows_new/features.ec/t_item_id": 1,
                 "transfer/rows_aligned/features.ec/t_user_id": 940, "transfer/rows_new/features.ec/t_user_id": 5}
#: DCN-v2's ST&SF on ratings: logged as the transfer_report.json artifact only
DCN_REPORT = TransferReport(strategy=Strategy.ST_SF, trainable_params=120_000, frozen_params=19_202, tables=[
    TableEntry(status="loaded", source="t_item_id", target="sparse.ec:t_item_id", rows_aligned=1500, rows_new=82,
               frozen=True)])
DCN_FT_TRANSFER = {"transfer/tables_loaded": 1, "transfer/tables_frozen": 0, "transfer/modules_loaded": 0,
                   "transfer/frozen_params": 0, "transfer/trainable_params": 139_202,
                   "transfer/rows_aligned/sparse.ec/t_item_id": 1500, "transfer/rows_new/sparse.ec/t_item_id": 82}
#: pretraining runs: size → (protocol, dense params, HR@10 history, NDCG@10 history, popular HR, popular NDCG);
#: the last evaluation is not the best one, and the page must show the last
PRETRAIN = {"L4H32A4": (A, 53_504, [0.12, 0.11], [0.060, 0.055], 0.046, 0.021),
            "L4H64A4": (A, 213_568, [0.13, 0.14], [0.065, 0.071], 0.046, 0.021),
            "L2H32A2": (B, 40_000, [0.05, 0.053], [0.024, 0.026], 0.023, 0.011)}


def _best(n):
    return TRUE["a"] - TRUE["b"] * n ** -TRUE["c"]


def _log(tracker: Tracker, run: str, history: dict[str, list[tuple[int, float]]]) -> None:
    """Every point of a run's metric histories in one ``log_batch`` (what the trainer logs step by step)."""
    tracker.client.log_batch(run, metrics=[Metric(key, float(value), 0, int(step))
                                           for key, points in history.items() for step, value in points])


def _curve(epochs, auc) -> dict[str, list[tuple[int, float]]]:
    """``valid/auc`` and ``progress/epoch`` every 10 steps, ``test/auc`` where the trainer logs it: at each new
    best validation AUC and at the last step."""
    history: dict[str, list] = {"valid/auc": [], "progress/epoch": [], "test/auc": []}
    best = -1.0
    for i, (e, a) in enumerate(zip(epochs, auc), start=1):
        history["valid/auc"].append((10 * i, a))
        history["progress/epoch"].append((10 * i, e))
        if a > best or i == len(epochs):
            best = max(best, a)
            history["test/auc"].append((10 * i, a - TEST_GAP))
    return history


@dataclass
class Study:
    tracker: Tracker
    store: str
    out: Path
    result: dict
    page: str
    sweep: str
    review_runs: int
    curves: list = field(default_factory=list)     # load_curves of the store, read once
    logged: dict = field(default_factory=dict)     # (protocol, ranker, strategy, size, seed) → validation AUC
    run_ids: dict = field(default_factory=dict)    # same key → run id
    pretrain_ids: dict = field(default_factory=dict)


def _finetune(study: Study, protocol, ranker, strategy, size, seed, epochs, auc, extra_tags=None):
    tags = {TAGS.stage: "finetune", "protocol": protocol, TAGS.ranker: ranker, TAGS.strategy: strategy,
            TAGS.seed: seed, TAGS.dense_params: SIZES.get(size, DCN_PARAMS), **(extra_tags or {})}
    if size != "-":
        tags[TAGS.model_size] = size
    with study.tracker.run(f"finetune {ranker} {protocol} {strategy} {size} seed{seed}", parent=study.sweep,
                           tags=tags) as run:
        _log(study.tracker, run, _curve(epochs, auc))
    key = (protocol, ranker, strategy, size, seed)
    study.logged[key], study.run_ids[key] = np.asarray(auc), run
    return run


def _fill_gpsd(study: Study) -> None:
    """The power-law sweep of the GPSD ranker on protocol A (the 16 runs of the earlier tests)."""
    epochs = np.arange(1, 13) / 4                           # 0.25 ... 3.0
    for size, n in SIZES.items():
        for strategy in ("nt", "st_sf"):
            for seed in (0, 1):
                peak = _best(n) - (0.02 if strategy == "nt" else 0.0) + 0.001 * seed
                if strategy == "nt":
                    auc = np.where(epochs <= 1, peak - 0.05 * (1 - epochs), peak - 0.03 * (epochs - 1))
                else:
                    auc = peak - 0.05 * (3 - epochs) / 3
                tags = {TAGS.pretrain_run: study.pretrain_ids[size]} if strategy == "st_sf" and size in PRETRAIN else {}
                run = _finetune(study, A, "gpsd", strategy, size, seed, epochs, auc, tags)
                if strategy == "st_sf":
                    _log(study.tracker, run, {k: [(0, v)] for k, v in GPSD_TRANSFER.items()})


def _fill_dcn(study: Study) -> None:
    """DCN-v2 on protocol B (NT over 3 seeds, FT and ST&SF over one) and on protocol A (ST&SF only)."""
    epochs = (0.5, 1.0, 1.5, 2.0)
    for seed, drop in zip((0, 1, 2), ("true", "true", "false")):
        auc = np.array([0.74, 0.78, 0.77, 0.765]) + 0.004 * seed
        _finetune(study, B, "dcn_v2", "nt", "-", seed, epochs, auc, {TAGS.one_epoch_drop: drop})
    run = _finetune(study, B, "dcn_v2", "st_sf", "-", 0, epochs, [0.73, 0.755, 0.76, 0.762],
                    {TAGS.one_epoch_drop: "false", TAGS.pretrain_run: study.pretrain_ids["L2H32A2"]})
    study.tracker.log_json(run, DCN_REPORT.to_dict(), "transfer_report.json")
    run = _finetune(study, B, "dcn_v2", "ft", "-", 0, epochs, [0.75, 0.79, 0.785, 0.78], {TAGS.one_epoch_drop: "true"})
    _log(study.tracker, run, {k: [(0, v)] for k, v in DCN_FT_TRANSFER.items()})
    for seed in (0, 1):
        _finetune(study, A, "dcn_v2", "st_sf", "-", seed, epochs, np.array([0.70, 0.72, 0.73, 0.735]) + 0.003 * seed)


def _fill_pretraining(study: Study, data: Path) -> None:
    """Pretraining runs as ``hybrid pretrain`` logs them: dataset inputs ``<dataset>/<protocol>/<table>``
    (one run tagged ``protocol`` instead), eval history, the most-popular baseline at step 0."""
    for table in PRETRAIN_INPUTS:
        pd.DataFrame({"user_id": [1, 2]}).to_parquet(data / f"{table}.parquet")
    for size, (protocol, n, hr, ndcg, popular_hr, popular_ndcg) in PRETRAIN.items():
        tags = {TAGS.stage: "pretrain", TAGS.model_size: size, TAGS.dense_params: n, TAGS.strategy: "none"}
        if protocol == B:
            tags["protocol"] = B
        with study.tracker.run(f"pretrain {size}", parent=study.sweep, tags=tags) as run:
            if protocol == A:
                study.tracker.log_prepared_data(run, data, {"dataset": "ml-100k", "protocol": protocol,
                                                            "data_hash": "0" * 16}, PRETRAIN_INPUTS)
            _log(study.tracker, run, {"eval/hr_at_10": [(100, hr[0]), (200, hr[1])],
                                      "eval/ndcg_at_10": [(100, ndcg[0]), (200, ndcg[1])],
                                      "baseline/popularity_hr_at_10": [(0, popular_hr)],
                                      "baseline/popularity_ndcg_at_10": [(0, popular_ndcg)]})
        study.pretrain_ids[size] = run


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Study:
    root = tmp_path_factory.mktemp("study")
    store = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker(store, "study", enabled=True)
    with tracker.run("sweep", tags={TAGS.stage: "sweep"}) as sweep:
        s = Study(tracker, store, root / "review", {}, "", sweep, 0)
        (root / "data").mkdir()
        _fill_pretraining(s, root / "data")
        _fill_gpsd(s)
        _fill_dcn(s)
        with pytest.raises(RuntimeError):
            with tracker.run("crashed", parent=sweep, tags={TAGS.stage: "finetune", TAGS.strategy: "ft"}) as run:
                tracker.log_metrics(run, {"valid/auc": 0.99}, step=1, epoch=0.5)
                raise RuntimeError("a failed run is not reviewed")
    s.result = run_review(tracker, s.out)
    s.page = s.result["html"].read_text()
    exp = tracker.client.get_experiment_by_name("study")
    s.curves = load_curves(tracker)
    s.review_runs = len(tracker.client.search_runs([exp.experiment_id], filter_string="tags.stage = 'review'"))
    return s


# -- reading the page back -----------------------------------------------------------------------------------

class Page(HTMLParser):
    """The page's tables (caption, header cells, body rows as text, hrefs) and figures (alt, caption), each with
    the id of the ``<section>`` it is in."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: list[dict] = []
        self.figures: list[dict] = []
        self.section = ""
        self._cell: list[str] | None = None
        self._row: list[str] = []
        self._target: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.section = attrs.get("id", "")
        elif tag == "table":
            self.tables.append({"section": self.section, "caption": "", "headers": [], "rows": [], "hrefs": []})
        elif tag == "figure":
            self.figures.append({"section": self.section, "alt": "", "caption": "", "src": ""})
        elif tag == "img" and self.figures:
            self.figures[-1].update(alt=attrs.get("alt", ""), src=attrs.get("src", "")[:30])
        elif tag in ("td", "th", "caption", "figcaption"):
            self._cell, self._target = [], tag
        elif tag == "a" and self._cell is not None and self.tables:
            self.tables[-1]["hrefs"].append(attrs.get("href"))
        elif tag == "tr":
            self._row = []

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag != self._target or self._cell is None:
            if tag == "tr" and self._row and self.tables:
                table = self.tables[-1]
                (table["rows"] if table["headers"] else table["headers"]).append(self._row)
            return
        text = " ".join("".join(self._cell).split())
        if tag == "caption":
            self.tables[-1]["caption"] = text
        elif tag == "figcaption":
            self.figures[-1]["caption"] = text
        else:
            self._row.append(text)
        self._cell = self._target = None

    def table(self, section: str, caption_start: str) -> pd.DataFrame:
        """The one table of ``section`` whose caption starts with ``caption_start``, as strings."""
        [found] = [t for t in self.tables if t["section"] == section and t["caption"].startswith(caption_start)]
        return pd.DataFrame(found["rows"], columns=found["headers"][0])


def _cell(mean: float, std: float | None = None) -> str:
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


# -- tests ---------------------------------------------------------------------------------------------------

def test_power_law_fit_recovers_known_parameters():
    n = np.array(list(SIZES.values()) + [13_408, 25_000_000], dtype=float)
    fit = fit_power_law(n, _best(n))
    assert fit.a == pytest.approx(TRUE["a"], abs=1e-4)
    assert fit.b == pytest.approx(TRUE["b"], rel=1e-2)
    assert fit.c == pytest.approx(TRUE["c"], abs=1e-3)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9) and not fit.poor
    # points that rise then fall are no power law, and the fit says so
    bent = fit_power_law(list(SIZES.values()), [0.81, 0.82, 0.826, 0.796])
    assert bent.poor and bent.r2 < 0.5 and "do not follow a power law" in str(bent)
    with pytest.raises(ValueError, match="at least 3 distinct model sizes"):
        fit_power_law([1e4, 1e5], [0.6, 0.7])


def test_review_table_equals_logged_metrics(study):
    curves = study.curves
    assert len(curves) == 16 + 7                                            # the FAILED run is left out
    table = summary_table(curves)
    gpsd = table[table["ranker"] == "gpsd"].set_index(["strategy", "model_size"])
    for (strategy, size), row in gpsd.iterrows():
        runs = [study.logged[(A, "gpsd", strategy, size, seed)] for seed in (0, 1)]
        assert row["valid_best_auc_mean"] == pytest.approx(np.mean([r.max() for r in runs]))
        assert row["valid_best_auc_std"] == pytest.approx(np.std([r.max() for r in runs], ddof=1))
        assert row["valid_auc_epoch1_mean"] == pytest.approx(np.mean([r[3] for r in runs]))   # epoch 1.0 = 4th eval
        # test: read at the best validation step, and at the last step
        assert row["test_auc_mean"] == pytest.approx(np.mean([r.max() for r in runs]) - TEST_GAP)
        assert row["test_final_auc_mean"] == pytest.approx(np.mean([r[-1] for r in runs]) - TEST_GAP)
        assert row["one_epoch_drop"] == (1.0 if strategy == "nt" else 0.0)   # recomputed: these runs have no tag
        assert row["dense_params"] == SIZES[size] and row["seeds"] == 2
    # rows follow GPSD's strategy order, NT first; the trainer's one-epoch verdict is taken from the tag
    dcn = table[(table["ranker"] == "dcn_v2") & (table["protocol"] == B)]
    assert list(dcn["strategy"]) == ["nt", "ft", "st_sf"] and list(dcn["model_size"]) == ["-"] * 3
    assert dcn.iloc[0]["one_epoch_drops"] == 2 and dcn.iloc[0]["runs"] == 3

    assert {p.name for p in study.out.iterdir()} >= {"summary.md", "summary.csv", "one_epoch.png", "scaling.png",
                                                     "report.html", "pretraining.png"}
    assert len(pd.read_csv(study.out / "summary.csv")) == len(table)
    fit = study.result["fits"]["last-item gpsd st_sf"]
    # the scaling fit is on validation-selected test AUC; seeds add 0.000/0.001 → mean +0.0005
    assert fit.a == pytest.approx(TRUE["a"] + 0.0005 - TEST_GAP, abs=2e-3)
    assert study.result["runs"] == 23 and study.result["table"].equals(table)
    client = MlflowClient(study.store)
    exp = client.get_experiment_by_name("study")
    [review] = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'review'", max_results=1,
                                  order_by=["attributes.start_time ASC"])
    assert study.review_runs == 1 and review.data.tags[PARENT_TAG] == study.sweep   # nested under the sweep
    artifacts = {a.path for a in client.list_artifacts(review.info.run_id, "review")}
    assert {"review/report.html", "review/scaling.png", "review/one_epoch-last-item-gpsd.png"} <= artifacts


def test_one_section_per_protocol_and_ranker(study):
    sections = split_sections(study.curves)
    assert [(s.protocol, s.ranker, len(s.curves)) for s in sections] == [
        (A, "dcn_v2", 2), (A, "gpsd", 16), (B, "dcn_v2", 5)]
    assert [s.title for s in sections] == ["DCN-v2 on protocol last-item", "GPSD ranker on protocol last-item",
                                           "DCN-v2 on protocol ratings"]
    page = Page(study.page)
    headings = re.findall(r'<section id="([^"]+)">\s*<h2>([^<]+)</h2>', study.page)
    assert headings == [("pretraining", "Pretraining: retrieval against most popular"),
                        *((s.slug, s.title) for s in sections), ("markdown", "The strategy table as Markdown")]
    # each section's plots are its own files and show only its own runs
    for s in sections:
        assert (study.out / f"one_epoch-{s.slug}.png").is_file()
        figures = [f for f in page.figures if f["section"] == s.slug]
        assert figures and all(f["src"].startswith("data:image/png;base64,") for f in figures)
    plt = pytest.importorskip("matplotlib.pyplot")
    fig, ax = plt.subplots()
    draw_one_epoch(ax, sections[1])
    assert ax.get_legend_handles_labels()[1] == [f"NT, {s}" for s in SIZES] + [f"ST&SF, {s}" for s in SIZES]
    ax.clear()
    draw_one_epoch(ax, sections[2])
    assert ax.get_legend_handles_labels()[1] == ["NT", "FT", "ST&SF"]     # DCN-v2 has no size to name
    plt.close(fig)
    # DCN-v2's single size gets no scaling plot; its two protocols are never on one axis
    assert not (study.out / "scaling-ratings-dcn-v2.png").exists()
    assert "Fewer than two model sizes in this section: no scaling plot" in study.page
    assert set(study.result["fits"]) == {"last-item gpsd nt", "last-item gpsd st_sf"}


def test_strategy_tables_are_human_and_equal_the_logged_metrics(study):
    page = Page(study.page)
    gpsd = page.table("last-item-gpsd", "GPSD ranker on protocol last-item:")
    assert list(gpsd.columns) == ["strategy", "model size", "dense parameters", "seeds",
                                  "validation AUC, end of epoch 1", "best validation AUC",
                                  "test AUC at best validation", "test AUC, final weights",
                                  "one-epoch drop (validation)"]
    assert not [c for c in gpsd.columns if "_" in c]
    assert list(gpsd["strategy"]) == ["NT"] * 4 + ["ST&SF"] * 4
    assert list(gpsd["dense parameters"]) == [f"{n:,}" for n in SIZES.values()] * 2     # 3,211,520
    row = gpsd[(gpsd["strategy"] == "ST&SF") & (gpsd["model size"] == "L4H64A4")].iloc[0]
    runs = [study.logged[(A, "gpsd", "st_sf", "L4H64A4", seed)] for seed in (0, 1)]
    best = [r.max() for r in runs]
    assert row["best validation AUC"] == _cell(np.mean(best), np.std(best, ddof=1))
    assert row["test AUC at best validation"] == _cell(np.mean(best) - TEST_GAP, np.std(best, ddof=1))
    assert row["seeds"] == "2" and row["one-epoch drop (validation)"] == "no"
    assert set(gpsd[gpsd["strategy"] == "NT"]["one-epoch drop (validation)"]) == {"yes"}

    dcn = page.table("ratings-dcn-v2", "DCN-v2 on protocol ratings:").set_index("strategy")
    assert list(dcn.index) == ["NT", "FT", "ST&SF"] and set(dcn["model size"]) == {"–"}
    assert dcn.loc["NT", "one-epoch drop (validation)"] == "2 of 3 seeds"      # not 0.6667
    assert dcn.loc["NT", "dense parameters"] == "139,202"                        # not 139202.0000
    nt_best = [study.logged[(B, "dcn_v2", "nt", "-", seed)].max() for seed in (0, 1, 2)]
    assert dcn.loc["NT", "best validation AUC"] == _cell(np.mean(nt_best), np.std(nt_best, ddof=1))
    # one seed: the value alone, and the seeds column says 1
    assert dcn.loc["ST&SF", "seeds"] == "1" and dcn.loc["ST&SF", "test AUC at best validation"] == _cell(0.762 - TEST_GAP)
    assert dcn.loc["ST&SF", "one-epoch drop (validation)"] == "no" and dcn.loc["FT", "one-epoch drop (validation)"] == "yes"
    # the Markdown copy (summary.md, printed by the CLI) says the same
    markdown = (study.out / "summary.md").read_text()
    assert "| ratings | DCN-v2 | NT | – | 139,202 | 3 |" in markdown and "2 of 3 seeds" in markdown
    assert markdown == study.result["markdown"] and "_" not in markdown.splitlines()[0]


def test_delta_auc_vs_nt_per_section(study):
    table = summary_table(study.curves)
    dcn = table[(table["protocol"] == B) & (table["ranker"] == "dcn_v2")]
    delta = delta_vs_nt(dcn).set_index("strategy")
    nt = [study.logged[(B, "dcn_v2", "nt", "-", seed)].max() - TEST_GAP for seed in (0, 1, 2)]
    assert delta.loc["st_sf", "delta"] == pytest.approx(0.762 - TEST_GAP - np.mean(nt))
    assert delta.loc["ft", "delta"] == pytest.approx(0.79 - TEST_GAP - np.mean(nt))
    assert delta.loc["ft", "err"] == pytest.approx(np.std(nt, ddof=1))     # FT has one seed: NT's spread alone
    plt = pytest.importorskip("matplotlib.pyplot")
    fig, ax = plt.subplots()
    draw_delta(ax, delta.reset_index())
    assert sorted(round(p.get_height(), 6) for p in ax.patches) == sorted(round(v, 6) for v in delta["delta"])
    plt.close(fig)
    gpsd = delta_vs_nt(table[table["ranker"] == "gpsd"])
    assert len(gpsd) == 4 and gpsd["delta"].to_numpy() == pytest.approx([0.02] * 4)   # ST&SF peaks 0.02 above NT
    page = Page(study.page)
    captions = {f["section"]: f["caption"] for f in page.figures if "minus NT's" in f["caption"]}
    assert set(captions) == {"last-item-gpsd", "ratings-dcn-v2"}
    assert captions["ratings-dcn-v2"].startswith("Test AUC at the best validation step minus NT's at the same model "
                                                 "size, per strategy (strategies: 1 seed (no spread to show); NT: mean "
                                                 "± std over 3 seeds; error bars ± √(std² + std_NT²))")
    assert "(strategies: mean ± std over 2 seeds; NT: mean ± std over 2 seeds;" in captions["last-item-gpsd"]
    # no NT run: a sentence instead of a chart
    assert not (study.out / "delta_auc-last-item-dcn-v2.png").exists()
    assert not [f for f in page.figures if f["section"] == "last-item-dcn-v2" and "minus NT" in f["caption"]]
    assert "No NT run in this section" in study.page


def test_one_epoch_curves_have_seed_bands_and_epoch_boundaries(study):
    [section] = [s for s in split_sections(study.curves) if s.ranker == "gpsd"]
    members = [c for c in section.curves if c.strategy == "nt" and c.model_size == "L4H64A4"]
    grid, mean, std = mean_std_curve(members)
    runs = [study.logged[(A, "gpsd", "nt", "L4H64A4", seed)] for seed in (0, 1)]
    assert grid == pytest.approx(np.arange(1, 13) / 4)
    assert mean == pytest.approx(np.mean(runs, axis=0)) and std == pytest.approx(np.std(runs, axis=0, ddof=1))
    plt = pytest.importorskip("matplotlib.pyplot")
    fig, ax = plt.subplots()
    assert draw_one_epoch(ax, section) == [2] * 8                  # seeds per line, for the caption
    assert len(ax.collections) == 8                                # one ± std band (fill_between) per line
    boundaries = [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == ":" and len(line.get_xdata()) == 2]
    assert boundaries == [1, 2, 3]
    plt.close(fig)
    caption = Page(study.page).figures
    [one_epoch] = [f for f in caption if f["section"] == "last-item-gpsd" and f["caption"].startswith("Validation AUC")]
    assert "mean ± std over 2 seeds" in one_epoch["caption"] and "epoch boundaries" in one_epoch["caption"]


def test_scaling_plot_draws_the_fit_with_its_r2_or_says_why_not(study):
    page = Page(study.page)
    [scaling] = [f for f in page.figures if f["section"] == "last-item-gpsd" and "dense (backbone)" in f["caption"]]
    fit = study.result["fits"]["last-item gpsd st_sf"]
    assert f"ST&SF: AUC = {fit.a:.4f}" in scaling["caption"] and f"(R² {fit.r2:.2f})" in scaling["caption"]
    assert "mean ± std over 2 seeds" in scaling["caption"]
    # a bent curve: the fit is drawn but flagged; two sizes: no fit, and the page says so
    [section] = [sec for sec in split_sections(study.curves) if sec.ranker == "gpsd"]
    table = summary_table(section.curves)
    bent = table.assign(test_auc_mean=np.where(table["strategy"] == "st_sf",
                                               np.tile([0.81, 0.82, 0.826, 0.796], 2), table["test_auc_mean"]))
    plt = pytest.importorskip("matplotlib.pyplot")
    fig, ax = plt.subplots()
    fits = draw_scaling(ax, bent, "bent")
    labels = ax.get_legend_handles_labels()[1]
    assert f"NT fit, R² {fits['nt'].r2:.2f}" in labels and f"ST&SF fit, R² {fits['st_sf'].r2:.2f} (poor)" in labels
    assert len([line for line in ax.lines if len(line.get_xdata()) == 100]) == 2     # both fitted curves drawn
    plt.close(fig)
    [note] = scaling_notes(bent, fits)
    assert note.startswith("ST&SF: poor fit (R² ") and "do not follow a power law" in note
    two = table[table["model_size"].isin(["L4H32A4", "L4H64A4"])]
    assert scaling_notes(two, {}) == ["NT: 2 model sizes — no power-law fit (it needs at least 3).",
                                      "ST&SF: 2 model sizes — no power-law fit (it needs at least 3)."]
    assert "Scaling: Fewer than two model sizes in this section: no scaling plot" in study.page     # DCN-v2, no sizes


def test_pretraining_against_most_popular(study):
    frame = load_pretraining(study.tracker).set_index("model_size")
    for size, (protocol, n, hr, ndcg, popular_hr, popular_ndcg) in PRETRAIN.items():
        row = frame.loc[size]
        assert row["protocol"] == protocol                 # from the dataset inputs, or the tag
        assert (row["hr"], row["ndcg"]) == pytest.approx((hr[-1], ndcg[-1]))   # the last evaluation, not the best
        assert (row["popular_hr"], row["popular_ndcg"]) == pytest.approx((popular_hr, popular_ndcg))
    shown = Page(study.page).table("pretraining", "Retrieval of the pretrained models").set_index("model size")
    assert list(shown.columns[:6]) == ["protocol", "dense parameters", "HR@10", "HR@10, most popular", "NDCG@10",
                                       "NDCG@10, most popular"]
    assert shown.loc["L4H32A4", "HR@10"] == "0.1100" and shown.loc["L4H32A4", "HR@10, most popular"] == "0.0460"
    assert shown.loc["L4H64A4", "NDCG@10"] == "0.0710" and shown.loc["L2H32A2", "protocol"] == B
    assert shown.loc["L4H64A4", "dense parameters"] == "213,568"
    assert shown.loc["L4H32A4", "run id"] == study.pretrain_ids["L4H32A4"]
    [figure] = [f for f in Page(study.page).figures if f["section"] == "pretraining"]
    assert "HR@10 and NDCG@10" in figure["caption"] and "pretraining evaluation split" in figure["caption"]


def test_transfer_summary_per_run(study):
    page = Page(study.page)
    gpsd = page.table("last-item-gpsd", "What each transferred run loaded and froze")
    assert len(gpsd) == 8 and set(gpsd["strategy"]) == {"ST&SF"}                # NT runs transfer nothing
    row = gpsd[(gpsd["model size"] == "L4H64A4") & (gpsd["seed"] == "1")].iloc[0]
    assert (row["tables loaded"], row["tables frozen"], row["rows loaded"], row["rows new"]) == ("2", "2", "2,556", "6")
    assert row["frozen parameters"] == "27,000" and row["loaded tables"] == "t_item_id, t_user_id"
    assert row["run id"] == study.run_ids[(A, "gpsd", "st_sf", "L4H64A4", 1)]
    assert row["pretraining run"] == study.pretrain_ids["L4H64A4"]
    # DCN-v2's ST&SF logged only transfer_report.json: read from the artifact
    dcn = page.table("ratings-dcn-v2", "What each transferred run loaded and froze").set_index("strategy")
    assert list(dcn.index) == ["FT", "ST&SF"]
    assert (dcn.loc["ST&SF", "rows loaded"], dcn.loc["ST&SF", "rows new"], dcn.loc["ST&SF", "tables frozen"]) == (
        "1,500", "82", "1")
    assert dcn.loc["ST&SF", "frozen parameters"] == "19,202" and dcn.loc["FT", "tables frozen"] == "0"
    assert "No run of this section transferred" not in study.page.split('id="ratings-dcn-v2"')[1]


def test_runs_listed_with_ids_commits_and_links(study):
    client = MlflowClient(study.store)
    page = Page(study.page)
    runs = page.table("last-item-gpsd", "The 16 runs of this section")
    key = (A, "gpsd", "st_sf", "L4H128A4", 0)
    [row] = runs[runs["run id"] == study.run_ids[key]].to_dict("records")
    tags = client.get_run(study.run_ids[key]).data.tags
    assert row["git commit"] == tags["mlflow.source.git.commit"][:12] and row["strategy"] == "ST&SF"
    assert row["run"] == "finetune gpsd last-item st_sf L4H128A4 seed0"
    # a SQLite store has no UI URL: ids only, and how to open them
    assert not any(h for t in page.tables for h in t["hrefs"])
    assert f"<code>mlflow ui --backend-store-uri {study.store}</code> opens them" in study.page
    # a tracking server: every run id links to its page
    exp = client.get_experiment_by_name("study").experiment_id
    server = "http://mlflow.example:5000"
    assert run_url(server + "/", exp, "abc") == f"{server}/#/experiments/{exp}/runs/abc"
    assert run_url(study.store, exp, "abc") is None
    [section] = [s for s in split_sections(study.curves) if s.ranker == "gpsd"]
    assert f'href="{server}/#/experiments/{exp}/runs/{study.run_ids[key]}"' in runs_table(section, server)
    assert f'href="{server}/#/experiments/{exp}/runs/{study.pretrain_ids["L4H64A4"]}"' in transfer_table(section, server)


def test_every_plot_has_a_caption_naming_its_split_and_seeds(study):
    figures = Page(study.page).figures
    # pretraining; DCN-v2 on A: one-epoch; GPSD: Δ AUC, one-epoch, scaling; DCN-v2 on B: Δ AUC, one-epoch
    assert len(figures) == study.page.count("data:image/png;base64,") == 1 + 1 + 3 + 2
    for figure in figures:
        assert figure["caption"] and figure["alt"] == figure["caption"]
        assert re.search(r"validation|test|pretraining evaluation split", figure["caption"], re.I)
        assert re.search(r"seed", figure["caption"])


def test_template_ships_in_the_wheel_and_jinja2_is_a_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["hybrid"]
    assert any(p.name == "review.html.j2" for pattern in patterns for p in (REPO / "hybrid").glob(pattern))
    assert any(re.match(r"jinja2\b", d, re.I) for d in project["project"]["dependencies"])


def test_review_cli_and_errors(study, tmp_path, capsys):
    argv = ["review", "--experiment", "study", "--tracking-uri", study.store, "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| last-item | GPSD ranker | ST&SF | L4H64A4 | 213,568 | 2 |" in out
    assert "power law (last-item gpsd st_sf): AUC =" in out and (tmp_path / "r" / "report.html").is_file()
    assert main(["review", "--experiment", "nope", "--tracking-uri", study.store, "--out", str(tmp_path / "r2")]) == 2
    assert "no experiment named 'nope'" in capsys.readouterr().err


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=5000", "--dump-dom"]
#: writes what the layout test reads into <body> attributes: images decoded, page width against the viewport,
#: images shown wider than their pixels, tables that neither fit nor sit in a horizontally scrolling box
PROBE = """<script>window.addEventListener("load", () => {
  const body = document.body, root = document.documentElement, images = [...document.images];
  const scrolls = e => { for (let p = e.parentElement; p; p = p.parentElement) {
    if (["auto", "scroll"].includes(getComputedStyle(p).overflowX)) return true; } return false; };
  body.setAttribute("data-images", images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0)
                                   ? "loaded" : "broken");
  body.setAttribute("data-scroll-width", root.scrollWidth);
  body.setAttribute("data-client-width", root.clientWidth);
  body.setAttribute("data-scaled-up", images.filter(i => i.getBoundingClientRect().width > i.naturalWidth).length);
  body.setAttribute("data-tables", document.querySelectorAll("table").length);
  body.setAttribute("data-loose-tables", [...document.querySelectorAll("table")].filter(
    t => !scrolls(t) && t.getBoundingClientRect().right > root.clientWidth).length);
});</script>"""


def _render(chromium: str, page: Path, tmp_path: Path, width: int) -> tuple[dict[str, str], Path]:
    """Load ``page`` (with :data:`PROBE`) at ``width`` × 900: the probe's attributes, and a screenshot."""
    probe = tmp_path / f"probe-{page.stem}-{width}.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    shot = tmp_path / f"{page.stem}-{width}.png"
    done = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--window-size={width},900", f"--screenshot={shot}",
                           f"--user-data-dir={tmp_path / 'chromium-profile'}", probe.as_uri()],
                          capture_output=True, text=True, timeout=120)
    body = re.search(r"<body([^>]*)>", done.stdout)
    assert body, done.stderr[-2000:]
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1))), shot


def test_html_report_fits_1280_and_1920_px_in_headless_chromium(study, tmp_path):
    """.ci/run installs Debian's chromium; the page renders with every plot decoded, nothing wider than the
    window, plots never scaled above their pixel size, wide tables inside a scrolling box."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs it from Debian's packages)")
    page = study.result["html"]
    for width in (1280, 1920):
        probe, shot = _render(chromium, page, tmp_path, width)
        assert probe["images"] == "loaded"
        assert int(probe["client-width"]) == width and int(probe["scroll-width"]) <= width, probe
        assert probe["scaled-up"] == "0" and probe["loose-tables"] == "0", probe
        assert int(probe["tables"]) == page.read_text().count("<table") == 9    # every table was looked at
        assert struct.unpack(">II", shot.read_bytes()[16:24]) == (width, 900)    # the PNG header's size
    broken = tmp_path / "broken.html"                      # the probe can fail: a corrupt image is caught
    broken.write_text(page.read_text().replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    assert _render(chromium, broken, tmp_path, 1280)[0]["images"] == "broken"
    wide = tmp_path / "wide.html"                          # and a page wider than the window is caught
    wide.write_text(page.read_text().replace("<body>", '<body><div style="width:2500px">wide</div>', 1))
    assert int(_render(chromium, wide, tmp_path, 1920)[0]["scroll-width"]) > 1920
