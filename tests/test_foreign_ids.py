"""A checkpoint pretrained on another dataset shares raw ids with the target only by accident (ML-100K movie 42
is not ML-1M movie 42): ``apply_transfer`` measures, per table aligned through feature maps, the share of the
target's known raw values the checkpoint knows, refuses below ``TransferConfig.min_overlap`` (one line naming
the table, the share and how to proceed), shows the share in the report, and notes when the two feature maps
were fitted on differently named datasets. Through the CLI: a finetune on a foreign events CSV is refused
(exit 2) unless ``--allow-foreign-ids``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from adapters_support import (
    feature_map,
    one_thread,  # noqa: F401 (autouse fixture)
    snapshot,
    source_and_target_maps,
    write_pretrain_checkpoint,
)

from hybrid.adapters import TransferConfig, TransferError, TransferReport, apply_transfer
from hybrid.core.feature_map import FeatureMap
from hybrid.ctr_models import DCNv2Config, FeatureConfig, HistoryConfig, build_ranker

REPO = Path(__file__).resolve().parents[1]


def dcn(fm, seed=1):
    torch.manual_seed(seed)
    config = DCNv2Config(features=FeatureConfig(embedding_dim=16, max_len=8),
                         history=HistoryConfig(encoder="target", attention_hidden=(8,)), deep_hidden=(8,))
    return build_ranker("dcn_v2", config, fm.vocab_sizes(), ("click",))


def named(fm: FeatureMap, dataset: str) -> FeatureMap:
    return FeatureMap(fm.vocabularies, shared=fm.shared, metadata={"dataset": dataset})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    src, _ = source_and_target_maps()   # items i0..i39
    return write_pretrain_checkpoint(tmp_path_factory.mktemp("pretrain"), named(src, "ml-100k"))[0]


def foreign_map() -> FeatureMap:
    """Items i30..i79: 10 of its 50 items are known to the checkpoint (20 %); categories and actions all are."""
    return feature_map([f"i{k}" for k in range(30, 80)], 2)


def test_a_target_with_little_overlap_is_refused_naming_the_table_and_the_share(pretrained):
    model = dcn(foreign_map())
    before = snapshot(model)
    with pytest.raises(TransferError) as info:
        apply_transfer(model, TransferConfig("st_sf", pretrained), named(foreign_map(), "ml-1m"))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("table t_item_id → input.features.ec:t_item_id: only 20 % of the target's 50 items are "
                              "known to the checkpoint (10; min_overlap 50 %): the checkpoint was pretrained on "
                              "'ml-100k', the target's data is 'ml-1m'")
    assert "--allow-foreign-ids" in message and "TransferConfig(min_overlap=0.0)" in message
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())   # refused before anything was written
    assert all(p.requires_grad for p in model.parameters())


def test_min_overlap_zero_accepts_it_and_the_report_shows_the_share(pretrained):
    model = dcn(foreign_map())
    report = apply_transfer(model, TransferConfig("st", pretrained, min_overlap=0.0), named(foreign_map(), "ml-1m"))
    item = next(e for e in report.tables if e.source == "t_item_id")
    assert item.overlap == pytest.approx(0.2) and item.rows_aligned == 10
    assert any("pretrained on 'ml-100k'" in n and "fitted on 'ml-1m'" in n for n in report.notes)
    # a stricter threshold refuses even the normal 60 % overlap
    _, target = source_and_target_maps()
    with pytest.raises(TransferError, match=r"only 60 % of the target's 50 items .*min_overlap 70 %"):
        apply_transfer(dcn(target), TransferConfig("st", pretrained, min_overlap=0.7), target)


def test_a_normal_overlap_passes_and_is_reported_per_table(pretrained):
    _, target = source_and_target_maps()   # 30 of the target's 50 items are known: 60 %
    report = apply_transfer(dcn(target), TransferConfig("st_sf", pretrained), target)
    overlaps = {e.source: e.overlap for e in report.tables if e.status == "loaded"}
    assert overlaps == {"t_item_id": pytest.approx(0.6), "t_category": 1.0, "t_action": 1.0}
    assert not any("pretrained on" in n for n in report.notes)   # the target map names no dataset
    text = str(report)
    header = text.splitlines()[1]
    assert "known" in header
    item_line = next(line for line in text.splitlines() if line.strip().startswith("loaded") and "t_item_id" in line)
    assert "60 %" in item_line
    data = report.to_dict()
    assert [t["overlap"] for t in data["tables"] if t["source"] == "t_item_id"] == [pytest.approx(0.6)]
    assert data["metrics"]["transfer/overlap/input.features.ec/t_item_id"] == pytest.approx(0.6)
    assert data["config"]["min_overlap"] == 0.5
    assert TransferReport.from_dict(json.loads(json.dumps(data))).tables == report.tables


def test_a_different_dataset_is_noted_even_when_the_overlap_passes(pretrained):
    _, target = source_and_target_maps()
    report = apply_transfer(dcn(target), TransferConfig("st", pretrained), named(target, "ml-1m"))
    assert [n for n in report.notes if "pretrained on" in n] == [
        "the checkpoint was pretrained on 'ml-100k', the target's feature map was fitted on 'ml-1m': rows are "
        "aligned by raw id, which means the same thing in both only if the two datasets share their id space"]
    same = apply_transfer(dcn(target), TransferConfig("st", pretrained), named(target, "ml-100k"))
    assert not any("pretrained on" in n for n in same.notes)


@pytest.mark.parametrize("bad", [1.5, -0.1, "half", True])
def test_min_overlap_must_be_a_share(bad):
    with pytest.raises(TransferError, match="TransferConfig.min_overlap: expected a share between 0 and 1"):
        TransferConfig("st", "ckpt", min_overlap=bad)


def test_alignments_given_by_the_caller_are_not_checked(pretrained):
    target = foreign_map()
    model = dcn(target)
    ids = np.full(target.vocab_sizes()["item_id"], -1)   # one entry per target row: all new
    config = TransferConfig("st", pretrained, tables=("t_item_id",))
    report = apply_transfer(model, config, target, alignments={"t_item_id": ids})
    item = next(e for e in report.tables if e.source == "t_item_id")
    assert item.overlap is None and item.rows_aligned == 0


# -- through the CLI, on real ML-100K ------------------------------------------------------------------------

def _foreign_events(path: Path) -> Path:
    """An events CSV (user, item, rating, timestamp) whose items are mostly not ML-100K movie ids: 10 of the
    60 items (1..10) exist in ML-100K, the others (5001..5050) do not."""
    rng = np.random.default_rng(0)
    pool = [str(k) for k in range(1, 11)] + [str(k) for k in range(5001, 5051)]
    rows = []
    for u in range(1, 61):
        for k, item in enumerate(rng.choice(pool, size=15, replace=False)):
            rows.append((f"u{u}", item, int(rng.integers(1, 6)), 880_000_000 + u * 1000 + k * 3600))
    pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"]).to_csv(path, index=False)
    return path


@pytest.mark.slow
def test_finetune_on_another_dataset_is_refused_unless_allowed(prepared_ratings, tmp_path, capsys):
    from hybrid.cli import EXIT_BAD_INPUT, main

    # a pretraining checkpoint over ML-100K's feature map (dataset 'movielens-100k'), written as the trainer does
    checkpoint, _ = write_pretrain_checkpoint(tmp_path / "pre", prepared_ratings.feature_map)
    events = _foreign_events(tmp_path / "events.csv")
    off = ["--set", "tracking.enabled=false"]
    assert main(["data", "prepare", "--dataset", "events", "--path", str(events), "--protocol", "ratings",
                 "--out", str(tmp_path / "prepared"), *off]) == 0
    finetune = ["finetune", "--config", str(REPO / "configs/finetune_tiny.yaml"), "--set",
                f"data={tmp_path / 'prepared'}", "--set", "ranker.config.features.embedding_dim=16",
                "--set", "train.epochs=1", "--set", "train.max_steps=1", "--set", "train.eval_every=0", *off,
                "--init", str(checkpoint)]
    capsys.readouterr()

    rc = main([*finetune, "--set", f"out={tmp_path / 'refused'}"])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT, err
    assert err.startswith("error: table t_item_id → input.features.ec:t_item_id: only ") and err.count("\n") == 1
    assert "items are known to the checkpoint" in err and "'movielens-100k', the target's data is 'events'" in err
    assert "--allow-foreign-ids" in err and "Traceback" not in err
    assert not (tmp_path / "refused" / "checkpoints").exists()

    out = tmp_path / "allowed"
    assert main([*finetune, "--set", f"out={out}", "--allow-foreign-ids"]) == 0
    printed = capsys.readouterr().out
    assert "fine-tuned dcn_v2 for 1 steps" in printed
    assert "note: the checkpoint was pretrained on 'movielens-100k'" in printed
    report = TransferReport.from_dict(json.loads((out / "transfer_report.json").read_text()))
    item = next(e for e in report.tables if e.source == "t_item_id")
    assert item.overlap is not None and item.overlap < 0.5 and report.config["min_overlap"] == 0.0
