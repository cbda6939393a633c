"""``hybrid finetune --init CKPT --strategy S`` end to end on real ML-100K with a SQLite MLflow store: the run
records the strategy, links the pretraining run (its id from the checkpoint manifest), logs the transfer
report as a JSON artifact and its counts as params/metrics; bad strategies and mismatched tables are
one-line errors (exit 2)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from adapters_support import one_thread  # noqa: F401 (autouse fixture)
from cli_support import refused
from mlflow import MlflowClient

from hybrid.adapters import TransferReport
from hybrid.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_finetune_init_strategy_transfers_and_records_it(prepared_ratings_dir, tmp_path, capsys):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--tracking-uri", store, "--experiment", "transfer"]
    data = f"data={prepared_ratings_dir}"
    assert main(["pretrain", "--config", str(REPO / "configs/pretrain_tiny.yaml"), "--set", data,
                 "--set", f"out={tmp_path / 'pre'}", "--set", "train.epochs=1", "--set", "train.eval_every=0",
                 *common]) == 0
    finetune = ["finetune", "--config", str(REPO / "configs/finetune_tiny.yaml"), "--set", data,
                "--set", "train.epochs=1", "--set", "train.eval_every=0", *common]
    capsys.readouterr()

    # errors first (nothing is trained): bad strategy, a strategy without --init, tables of another width
    err = refused([*finetune, "--set", f"out={tmp_path / 'x'}", "--strategy", "sfst"], capsys)
    assert "unknown transfer strategy 'sfst'" in err
    err = refused([*finetune, "--set", f"out={tmp_path / 'x'}", "--strategy", "ft"], capsys)
    assert "--strategy ft needs --init PRETRAIN_CHECKPOINT" in err
    err = refused([*finetune, "--set", f"out={tmp_path / 'x'}", "--init", str(tmp_path / "pre" / "checkpoints")], capsys)
    assert "table t_action: pretrained [7, 16] vs target input.features.ec:t_action [7, 8]" in err

    out = tmp_path / "ft"
    assert main([*finetune, "--set", f"out={out}", "--set", "ranker.config.features.embedding_dim=16",
                 "--init", str(tmp_path / "pre" / "checkpoints"), "--strategy", "ST&SF",
                 "--transfer", "new_rows=mean"]) == 0
    printed = capsys.readouterr().out
    assert "Transfer ST&SF from " in printed and "fine-tuned dcn_v2" in printed

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("transfer")
    runs = {r.data.tags["stage"]: r for r in client.search_runs([experiment.experiment_id])}
    pre, ft = runs["pretrain"], runs["finetune"]
    assert ft.data.tags["strategy"] == "st_sf"
    assert ft.data.tags["pretrain_run_id"] == pre.info.run_id
    assert ft.data.tags["pretrain_checkpoint"].endswith("checkpoints/step-00000022")
    assert "transfer_report.json" in [a.path for a in client.list_artifacts(ft.info.run_id)]
    report = TransferReport.load(client.download_artifacts(ft.info.run_id, "transfer_report.json", str(tmp_path)))
    assert report == TransferReport.from_dict(json.loads((out / "transfer_report.json").read_text()))
    assert sorted(report.frozen_tables) == ["input.features.ec:t_action", "input.features.ec:t_category",
                                            "input.features.ec:t_item_id"]
    assert ft.data.params["transfer.new_rows"] == "mean" and ft.data.params["transfer.strategy"] == "st_sf"
    assert ft.data.metrics["transfer/frozen_params"] == report.frozen_params > 0
    assert ft.data.metrics["transfer/rows_aligned/input.features.ec/t_item_id"] == 1573

    # the same transfer written as the config's `transfer:` section (no flags) does the same thing, and the
    # resolved config saved beside the run holds it, so the run can be repeated from its config.yaml alone
    import yaml

    raw = yaml.safe_load((REPO / "configs/finetune_tiny.yaml").read_text())
    raw["ranker"]["config"].setdefault("features", {})["embedding_dim"] = 16
    raw["transfer"] = {"strategy": "ST&SF", "checkpoint": str(tmp_path / "pre" / "checkpoints"), "new_rows": "mean"}
    section = tmp_path / "with_transfer.yaml"
    section.write_text(yaml.safe_dump(raw))
    out2 = tmp_path / "ft-yaml"
    assert main(["finetune", "--config", str(section), "--set", data, "--set", "train.epochs=1",
                 "--set", "train.eval_every=0", "--set", f"out={out2}", *common]) == 0
    report2 = TransferReport.from_dict(json.loads((out2 / "transfer_report.json").read_text()))
    assert report2.tables == report.tables and report2.frozen_params == report.frozen_params
    saved = yaml.safe_load((out2 / "config.yaml").read_text())["transfer"]
    assert saved["strategy"] == "st_sf" and saved["new_rows"] == "mean"
    assert yaml.safe_load((out / "config.yaml").read_text())["transfer"] == saved   # flags → the same section

    # the Python API with a prepare_model hook (what bench/transfer_quality.py does): the config's transfer
    # section stays nt, the hook moves the item table only — the run's transfer.* params are the hook's, logged
    # once (MLflow refuses a changed param: nothing may land in the fallback log)
    from hybrid.adapters import TransferConfig, apply_transfer
    from hybrid.config import load_config
    from hybrid.jobs.finetune import FinetuneConfig, run_finetune

    out3 = tmp_path / "ft-hook"
    cfg = load_config(FinetuneConfig, REPO / "configs/finetune_tiny.yaml",
                      [data, "train.epochs=1", "train.eval_every=0", f"out={out3}",
                       "ranker.config.features.embedding_dim=16", f"tracking.tracking_uri={store}",
                       "tracking.experiment=transfer"])
    assert cfg.transfer.strategy.value == "nt"
    hook = TransferConfig(strategy="st_sf", checkpoint=tmp_path / "pre" / "checkpoints", tables=("t_item_id",))
    summary = run_finetune(cfg, prepare_model=lambda model, fm: apply_transfer(model, hook, fm).to_dict(),
                           strategy="st_sf")
    hooked = client.get_run(summary["run_id"])
    assert hooked.data.params["transfer.strategy"] == "st_sf"
    assert "t_item_id" in hooked.data.params["transfer.tables"]
    assert not (out3 / "mlflow_fallback.jsonl").exists()
