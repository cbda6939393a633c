"""``hybrid score`` and ``Predictor``: a fine-tuned ranker on raw-id events (real ML-100K, protocol ratings).

The reference is the fine-tuning evaluation itself: the test samples, scored from the raw events, get the scores
the trainer's ``predict`` gives on the prepared ``ctr_test`` split, and the AUC the checkpoint recorded.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from hybrid.cli import main
from hybrid.config import from_mapping
from hybrid.core.feature_map import FeatureMap
from hybrid.ctr_models.export import load_exported, serving_inputs
from hybrid.ctr_models.metrics import auc
from hybrid.ctr_models.trainer import predict
from hybrid.data.batching import CTRBatchConverter, make_loader
from hybrid.data.store import load_prepared
from hybrid.jobs.finetune import FinetuneConfig, load_finetuned, run_finetune
from hybrid.jobs.score import Predictor, read_score_report
from tests.torchrun_support import run_torchrun

TASKS = ["click", "rating5"]


@pytest.fixture(scope="module")
def prepared_dir(prepared_ratings_dir, ml100k_dir, tmp_path_factory):
    """The shared prepared ML-100K with the ``config.yaml`` ``hybrid data prepare`` writes (where the dataset's
    item and user tables are: what scoring falls back to)."""
    copy = tmp_path_factory.mktemp("prepared") / "ratings"
    shutil.copytree(prepared_ratings_dir, copy)
    (copy / "config.yaml").write_text(yaml.safe_dump({"data": {"dataset": "movielens-100k", "path": str(ml100k_dir)}}))
    return copy


@pytest.fixture(scope="module")
def finetuned(prepared_dir, tmp_path_factory):
    """A tiny two-task DCN-v2 fine-tuned on ML-100K protocol ratings; its best checkpoint."""
    out = tmp_path_factory.mktemp("finetune") / "dcn"
    cfg = from_mapping(FinetuneConfig, {
        "data": str(prepared_dir), "out": str(out), "task_names": TASKS,
        "ranker": {"name": "dcn_v2", "config": {"features": {"embedding_dim": 8},
                                               "history": {"encoder": "target", "attention_hidden": [16]},
                                               "cross_type": "low_rank", "deep_hidden": [32, 16]}},
        "train": {"epochs": 1, "batch_size": 512, "eval_batch_size": 4096, "eval_every": 60, "max_history": 20,
                  "progress": False, "optim": {"lr": 0.003, "warmup_steps": 0, "schedule": "constant"}},
        "tracking": {"experiment": "score-tests"}})
    summary = run_finetune(cfg)
    return summary["best_checkpoint"]


@pytest.fixture(scope="module")
def scored(finetuned, ml100k_dir, tmp_path_factory):
    """The whole of ML-100K scored through the CLI (its own item and user tables)."""
    out = tmp_path_factory.mktemp("scores") / "scores.parquet"
    assert main(["score", "--model", finetuned, "--input", str(ml100k_dir), "--dataset", "movielens-100k",
                 "--out", str(out)]) == 0
    return out


def _user_time_order(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows as the protocol orders its samples: by raw user, time, file row."""
    return frame.iloc[np.lexsort((frame["row"].to_numpy(), frame["timestamp"].to_numpy(),
                                  frame["user_id"].to_numpy()))]


def test_scores_of_test_samples_equal_the_finetuning_evaluation(finetuned, scored, prepared_dir):
    model, manifest = load_finetuned(finetuned)
    prepared = load_prepared(prepared_dir)
    converter = CTRBatchConverter(prepared, "ctr_test", max_history=20, fields=list(model.spec.kjt_keys),
                                  task_names=TASKS)
    labels, logits, _ = predict(model, make_loader(converter, 4096, shuffle=False))

    scores = pd.read_parquet(scored)
    assert scores["row"].tolist() == list(range(100_000))          # every input row, in input order
    assert list(scores.columns) == ["row", "user_id", "item_id", "timestamp", "history_length",
                                    "score_click", "score_rating5"]
    # protocol ratings' test samples: events after the time cut with at least one earlier event
    test = _user_time_order(scores[(scores["timestamp"] > prepared.stats["time_cut"]) & (scores["history_length"] > 0)])
    assert len(test) == len(labels)
    raw_users = np.asarray(prepared.users["raw_user_id"])[np.asarray(converter.user_row)]
    assert (test["user_id"].to_numpy() == raw_users).all()
    expected = torch.sigmoid(torch.from_numpy(logits).double()).numpy()
    np.testing.assert_allclose(test[["score_click", "score_rating5"]].to_numpy(), expected, rtol=0, atol=1e-6)
    assert auc(labels[:, 0], test["score_click"].to_numpy()) == pytest.approx(manifest["metrics"]["test/auc"], abs=1e-6)
    assert np.isfinite(scores[["score_click", "score_rating5"]].to_numpy()).all()   # empty histories too

    report = read_score_report(scored)
    assert report["rows"] == report["scored"] == 100_000 and report["users"] == 943
    assert report["empty_history"] == 943                             # each user's first event
    # users whose every event is after the validation cut are unknown to the feature map, as in training
    known_users = set(prepared.feature_map["user_id"].tokens)
    assert report["unknown_users"] == len(set(scores["user_id"]) - known_users)
    known_items = set(prepared.feature_map["item_id"].tokens)
    assert report["unknown_items"] == int((~scores["item_id"].isin(known_items)).sum()) > 0
    assert report["side_tables"] == {"items": "input", "users": "input"}


def test_predictor_and_events_file_with_training_side_tables(finetuned, scored, ml100k, tmp_path):
    """An events file without side tables takes the training data's; ``since`` scores only later rows, whose
    histories (the earlier rows) are the same, so their scores are too; the Python API gives the same numbers."""
    events = ml100k.events[["user_id", "item_id", "timestamp", "rating"]]
    since = int(np.quantile(events["timestamp"], 0.9))
    path = tmp_path / "events.csv"
    events.to_csv(path, index=False)
    out = tmp_path / "later.parquet"
    assert main(["score", "--model", finetuned, "--input", str(path), "--out", str(out), "--since", str(since),
                 "--chunk-rows", "4999"]) == 0               # small chunks: users cut across record batches
    later = pd.read_parquet(out)
    full = pd.read_parquet(scored).set_index("row")
    assert len(later) == int((events["timestamp"] >= since).sum())
    np.testing.assert_allclose(later[["score_click", "score_rating5"]].to_numpy(),
                               full.loc[later["row"], ["score_click", "score_rating5"]].to_numpy(), rtol=0, atol=1e-6)
    assert read_score_report(out)["side_tables"] == {"items": "training data", "users": "training data"}

    predictor = Predictor.load(finetuned)
    sample = events.iloc[:5000]
    result = predictor.predict(sample, since=since)
    assert result.index.equals(sample.index)
    before = sample["timestamp"].to_numpy() < since
    assert result.loc[before, "score_click"].isna().all()
    in_memory = predictor.predict(sample)
    # the first 5000 rows alone: a history is what those rows give, so compare with a run over them only
    small = tmp_path / "small.csv"
    sample.to_csv(small, index=False)
    assert main(["score", "--model", finetuned, "--input", str(small), "--out", str(tmp_path / "s.parquet")]) == 0
    cli = pd.read_parquet(tmp_path / "s.parquet")
    np.testing.assert_allclose(in_memory[["score_click", "score_rating5"]].to_numpy(dtype=float),
                               cli[["score_click", "score_rating5"]].to_numpy(dtype=float), rtol=0, atol=1e-7)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_write_one_file_equal_to_one_process(finetuned, scored, ml100k_dir, tmp_path):
    out = tmp_path / "scores.parquet"
    done = run_torchrun(["-m", "hybrid", "score", "--model", finetuned, "--input", ml100k_dir,
                         "--dataset", "movielens-100k", "--out", out], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("scores written to") == 1        # rank 0 reports
    two, one = pd.read_parquet(out), pd.read_parquet(scored)
    pd.testing.assert_frame_equal(two, one)
    assert read_score_report(out)["rows"] == 100_000
    assert [p.name for p in tmp_path.iterdir()] == ["scores.parquet"]   # no parts left behind


def test_exported_program_scores_as_the_predictor(finetuned, ml100k, tmp_path):
    """``hybrid export`` writes the program, its sidecar and the feature map; on the Predictor's batches of new
    events the program's scores are the Predictor's (an input without ratings: OOV history actions)."""
    sample = ml100k.events[["user_id", "item_id", "timestamp"]].iloc[:3000]
    path = tmp_path / "events.parquet"
    sample.to_parquet(path)
    out = tmp_path / "serve" / "ranker.pt2"
    assert main(["export", "--model", finetuned, "--input", str(path), "--out", str(out), "--batch-size", "256"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["ranker.feature_map.json", "ranker.json", "ranker.pt2"]
    program, meta = load_exported(out)
    assert meta["parity"]["example_rows"] == 256 and meta["parity"]["max_abs_diff"] <= 1e-6
    assert meta["task_names"] == TASKS and meta["feature_map"] == "ranker.feature_map.json"
    fm = FeatureMap.from_dict(json.loads((out.parent / meta["feature_map"]).read_text()))
    assert fm["item_id"].encode(["50"])[0] == Predictor.load(finetuned).feature_map["item_id"].encode(["50"])[0]

    predictor = Predictor.load(finetuned)
    logits = []
    with torch.no_grad():
        for batch in predictor.batches(sample, batch_size=1000):       # another batch size than the example's
            served = program.module()(*serving_inputs(predictor.model, batch))
            torch.testing.assert_close(served, predictor.model(batch), rtol=0, atol=1e-6)
            logits.append(served)
    served_scores = torch.sigmoid(torch.cat(logits).double()).numpy()
    expected = predictor.predict(sample)
    order = np.lexsort((np.arange(len(sample)), sample["timestamp"].to_numpy(), sample["user_id"].astype(str)))
    np.testing.assert_allclose(served_scores, expected[["score_click", "score_rating5"]].to_numpy(float)[order],
                               rtol=0, atol=1e-6)


# -- bad input: one line, exit 2, nothing written --------------------------------------------------------------

def _fails(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: "), err
    return err


def test_bad_inputs_get_one_line_and_leave_no_output(finetuned, tmp_path, capsys):
    out = tmp_path / "scores.parquet"
    out.write_bytes(b"earlier scores")                         # a failed run must leave it as it was
    base = ["score", "--model", finetuned, "--out", str(out), "--input"]

    foreign = tmp_path / "foreign.csv"
    pd.DataFrame({"user_id": ["u1", "u2"], "item_id": ["x1", "x2"], "timestamp": [1, 2]}).to_csv(foreign, index=False)
    assert "none of its 2 users and none of its candidate items is in the model's feature map" in \
        _fails(capsys, [*base, str(foreign)])

    missing = tmp_path / "missing.csv"
    pd.DataFrame({"user_id": ["1"], "timestamp": [1]}).to_csv(missing, index=False)
    assert f"{missing}: missing required column 'item_id'" in _fails(capsys, [*base, str(missing)])

    bad_time = tmp_path / "bad_time.csv"
    bad_time.write_text("user_id,item_id,timestamp\n1,2,881250949\n1,3,yesterday\n")
    err = _fails(capsys, [*base, str(bad_time)])
    assert f"{bad_time}, line 3, column 'timestamp'" in err

    assert "no complete fine-tuning checkpoint" in _fails(
        capsys, ["score", "--model", str(tmp_path), "--out", str(out), "--input", str(foreign)])
    assert "--since 'soon'" in _fails(capsys, [*base, str(foreign), "--since", "soon"])

    nothing_later = tmp_path / "early.csv"
    pd.DataFrame({"user_id": ["1"], "item_id": ["2"], "timestamp": [5]}).to_csv(nothing_later, index=False)
    assert "no row to score at or after --since 10" in _fails(capsys, [*base, str(nothing_later), "--since", "10"])

    assert out.read_bytes() == b"earlier scores"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    program = tmp_path / "ranker.pt2"
    export = ["export", "--model", finetuned, "--input"]
    assert "the exported program is written as a .pt2 file" in _fails(
        capsys, [*export, str(foreign), "--out", str(tmp_path / "ranker.onnx")])
    assert "no row to score at or after --since 10: the export needs one example batch" in _fails(
        capsys, [*export, str(nothing_later), "--out", str(program), "--since", "10"])
    assert not program.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_a_ranker_that_reads_side_fields_refuses_an_input_without_them(finetuned, ml100k):
    model, manifest = load_finetuned(finetuned)
    manifest = json.loads(json.dumps(manifest))
    manifest["config"]["data"] = "/nonexistent/prepared"   # the training data is not on this machine
    predictor = Predictor(model, manifest)
    with pytest.raises(Exception, match=r"the ranker reads item fields \['category', 'year', 'genres'.*--items"):
        predictor.predict(ml100k.events.iloc[:10])
    scores = predictor.predict(ml100k.events.iloc[:10], items=ml100k.items, users=ml100k.users)
    assert scores["score_click"].notna().all()


def test_events_frame_errors_name_the_column_and_row(finetuned):
    predictor = Predictor.load(finetuned)
    frame = pd.DataFrame({"user_id": ["1", "2"], "item_id": ["1", None], "timestamp": [1, 2]})
    with pytest.raises(Exception, match=r"events, row 1, column 'item_id': empty value"):
        predictor.predict(frame)
    with pytest.raises(Exception, match=r"expected integer unix seconds"):
        predictor.predict(frame.assign(item_id="1", timestamp=["a", "b"]))
    with pytest.raises(Exception, match=r"row 0, column 'rating': expected a finite number"):
        predictor.predict(frame.assign(item_id="1", rating=[np.inf, 4.0]))
