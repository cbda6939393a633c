"""`hybrid review` over a real SQLite MLflow store: table values equal the logged metrics, the power-law fit
recovers known parameters, the one-epoch drop is flagged where the curve drops."""
import numpy as np
import pytest
from mlflow import MlflowClient

from hybrid.cli import main
from hybrid.review import fit_power_law, load_curves, run_review, summary_table
from hybrid.tracking import TAGS, Tracker

TRUE = dict(a=0.75, b=0.9, c=0.3)
SIZES = {"L4H32A4": 53_504, "L4H64A4": 213_568, "L4H128A4": 803_968, "L4H256A4": 3_211_520}
TEST_GAP = 0.01  # the synthetic runs' test AUC sits this far below their validation AUC


def _best(n):
    return TRUE["a"] - TRUE["b"] * n ** -TRUE["c"]


def _fill(store):
    """Finetune-like runs: NT peaks at epoch 1 then falls; ST&SF keeps rising to the power-law value."""
    tracker = Tracker(store, "study", enabled=True)
    logged = {}
    with tracker.run("sweep", tags={TAGS.stage: "sweep"}) as parent:
        for size, n in SIZES.items():
            for strategy in ("nt", "st_sf"):
                for seed in (0, 1):
                    tags = {TAGS.stage: "finetune", TAGS.strategy: strategy, TAGS.model_size: size,
                            TAGS.dense_params: n, TAGS.seed: seed}
                    with tracker.run(f"{strategy}-{size}-{seed}", parent=parent, tags=tags) as run:
                        peak = _best(n) - (0.02 if strategy == "nt" else 0.0) + 0.001 * seed
                        epochs = np.arange(1, 13) / 4                           # 0.25 ... 3.0
                        if strategy == "nt":
                            auc = np.where(epochs <= 1, peak - 0.05 * (1 - epochs), peak - 0.03 * (epochs - 1))
                        else:
                            auc = peak - 0.05 * (3 - epochs) / 3
                        best = -1.0
                        for step, (e, a) in enumerate(zip(epochs, auc), start=1):
                            tracker.log_metrics(run, {"valid/auc": a, "valid/logloss": 0.5 - a / 10}, step=step * 10,
                                                epoch=e)
                            if a > best or step == len(epochs):   # test where the trainer logs it
                                best = max(best, a)
                                tracker.log_metrics(run, {"test/auc": a - TEST_GAP}, step=step * 10, epoch=e)
                        logged[(strategy, size, seed)] = auc
    with pytest.raises(RuntimeError):
        with tracker.run("crashed", parent=parent, tags={TAGS.stage: "finetune", TAGS.strategy: "ft"}) as run:
            tracker.log_metrics(run, {"valid/auc": 0.99}, step=1, epoch=0.5)
            raise RuntimeError("a failed run is not reviewed")
    return tracker, logged


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


def test_review_table_equals_logged_metrics(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker, logged = _fill(store)
    curves = load_curves(tracker)
    assert len(curves) == 16                                            # the FAILED run is left out
    table = summary_table(curves).set_index(["strategy", "model_size"])
    assert set(summary_table(curves)["ranker"]) == {"-"}               # these runs carry no ranker tag
    for (strategy, size), row in table.iterrows():
        runs = [logged[(strategy, size, seed)] for seed in (0, 1)]
        assert row["valid_best_auc_mean"] == pytest.approx(np.mean([r.max() for r in runs]))
        assert row["valid_best_auc_std"] == pytest.approx(np.std([r.max() for r in runs], ddof=1))
        assert row["valid_auc_epoch1_mean"] == pytest.approx(np.mean([r[3] for r in runs]))   # epoch 1.0 = 4th eval
        # test: read at the best validation step, and at the last step
        assert row["test_auc_mean"] == pytest.approx(np.mean([r.max() for r in runs]) - TEST_GAP)
        assert row["test_final_auc_mean"] == pytest.approx(np.mean([r[-1] for r in runs]) - TEST_GAP)
        assert row["one_epoch_drop"] == (1.0 if strategy == "nt" else 0.0)
        assert row["dense_params"] == SIZES[size] and row["seeds"] == 2

    out = tmp_path / "review"
    result = run_review(tracker, out)
    assert {p.name for p in out.iterdir()} >= {"summary.md", "summary.csv", "one_epoch.png", "scaling.png",
                                                "report.html"}
    fit = result["fits"]["st_sf"]
    # the scaling fit is on validation-selected test AUC; seeds add 0.000/0.001 → mean +0.0005
    assert fit.a == pytest.approx(TRUE["a"] + 0.0005 - TEST_GAP, abs=2e-3)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("study")
    review_runs = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'review'")
    assert len(review_runs) == 1
    artifacts = {a.path for a in client.list_artifacts(review_runs[0].info.run_id, "review")}
    assert "review/report.html" in artifacts and "review/scaling.png" in artifacts


def test_rankers_without_a_size_get_their_own_rows(tmp_path):
    """Two rankers with no transformer (no model size) and one strategy: two rows, never averaged together."""
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "rankers", enabled=True)
    best = {"dcn_v2": 0.78, "tin": 0.76}
    for ranker, auc in best.items():
        for seed in (0, 1):
            tags = {TAGS.stage: "finetune", TAGS.strategy: "nt", TAGS.ranker: ranker, TAGS.dense_params: 1000,
                    TAGS.seed: seed}
            with tracker.run(f"{ranker}-{seed}", tags=tags) as run:
                for step, e in enumerate((0.5, 1.0, 1.5), start=1):
                    tracker.log_metrics(run, {"valid/auc": auc - 0.01 * (2 - step) + 0.002 * seed,
                                              "valid/logloss": 0.5}, step=step, epoch=e)
    table = summary_table(load_curves(tracker)).set_index(["ranker", "strategy", "model_size"])
    assert len(table) == 2
    for ranker, auc in best.items():
        assert table.loc[(ranker, "nt", "-"), "valid_best_auc_mean"] == pytest.approx(auc + 0.01 + 0.001)  # last eval
    result = run_review(tracker, tmp_path / "review")
    assert "| dcn_v2 | nt | - |" in result["markdown"] and "| tin | nt | - |" in result["markdown"]


def test_review_cli_and_errors(tmp_path, capsys):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _fill(store)
    assert main(["review", "--experiment", "study", "--tracking-uri", store, "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "| - | st_sf | L4H64A4 |" in out and "power law (st_sf): AUC =" in out
    assert main(["review", "--experiment", "nope", "--tracking-uri", store, "--out", str(tmp_path / "r2")]) == 2
    assert "no experiment named 'nope'" in capsys.readouterr().err


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=5000", "--dump-dom"]
IMAGE_PROBE = ('<script>window.addEventListener("load",()=>{const im=[...document.images];'
               'document.body.setAttribute("data-images",im.length>0&&im.every(i=>i.complete&&i.naturalWidth>0)'
               '?"loaded":"broken");});</script>')


def _render(chromium, page, tmp_path):
    import subprocess

    probe = tmp_path / f"probe-{page.stem}.html"
    probe.write_text(page.read_text().replace("</body>", IMAGE_PROBE + "</body>"))
    done = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}",
                           probe.as_uri()], capture_output=True, text=True, timeout=120)
    return done.stdout


def test_html_report_renders_in_headless_chromium_with_its_plots(tmp_path):
    """.ci/run installs Debian's chromium; the page must render with both plots decoded."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs it from Debian's packages)")
    tracker, _ = _fill(f"sqlite:///{tmp_path / 'mlflow.db'}")
    page = run_review(tracker, tmp_path / "review")["html"]
    dom = _render(chromium, page, tmp_path)
    assert 'data-images="loaded"' in dom and "Power-law fits" in dom
    broken = tmp_path / "broken.html"                      # the probe can fail: a corrupt image is caught
    broken.write_text(page.read_text().replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    assert 'data-images="broken"' in _render(chromium, broken, tmp_path)
