"""The CLI end to end on real ML-100K, and the one-line errors (exit code 2) that bad input gets."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_support import refused
from mlflow import MlflowClient

from hybrid.cli import EXIT_BAD_INPUT, main
from hybrid.data import store
from hybrid.data.store import load_prepared

REPO = Path(__file__).resolve().parents[1]


def _store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_prepare_writes_data_and_logs_stats(tmp_path, ml100k_dir, capsys):
    out = tmp_path / "prep"
    rc = main(["data", "prepare", "--dataset", "movielens-100k", "--path", str(ml100k_dir), "--protocol",
               "ratings", "--out", str(out), "--tracking-uri", _store(tmp_path), "--experiment", "e",
               "--set", "protocol.max_history=50"])
    assert rc == 0
    assert "prepared data written to" in capsys.readouterr().out
    prepared = load_prepared(out)
    assert ((prepared.ctr_train["hist_end"] - prepared.ctr_train["hist_start"]) <= 50).all()
    assert "max_history: 50" in (out / "config.yaml").read_text()
    stats = json.loads((out / "stats.json").read_text())
    client = MlflowClient(_store(tmp_path))
    run = client.search_runs([client.get_experiment_by_name("e").experiment_id])[0]
    assert run.data.metrics["data/ctr_train/samples"] == stats["ctr_train"]["samples"] == len(prepared.ctr_train)
    assert run.data.params["protocol.max_history"] == "50"
    assert run.data.tags["data_hash"] == stats["data_hash"]


def test_bad_inputs_get_one_line_and_exit_2(tmp_path, ml100k_dir, capsys):
    common = ["--out", str(tmp_path / "o"), "--tracking-uri", _store(tmp_path)]
    err = refused(["data", "prepare", "--dataset", "movielens-100k", "--path", str(tmp_path / "nowhere"), *common], capsys)
    assert "nowhere" in err
    err = refused(["data", "prepare", "--dataset", "movielens-100k", "--path", str(ml100k_dir), "--protocol", "clicks",
                *common], capsys)
    assert "key 'protocol.protocol' expects one of 'last-item', 'ratings', got 'clicks'" in err
    err = refused(["data", "prepare", "--dataset", "movielens-100k", "--path", str(ml100k_dir),
                "--set", "protocol.max_histroy=5", *common], capsys)
    assert "unknown key 'protocol.max_histroy' (did you mean 'protocol.max_history'?)" in err
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data:\n  dataset: netflix\n")
    err = refused(["data", "prepare", "--config", str(cfg), *common], capsys)
    assert "unknown dataset 'netflix'" in err
    events = tmp_path / "events.csv"
    events.write_text("user_id,item_id,timestamp,rating\n1,10,100,4\n1,11,200,\n")
    err = refused(["data", "prepare", "--dataset", "events", "--path", str(events), "--protocol", "ratings", *common],
               capsys)
    assert "events.csv" in err and "line 3" in err and "rating" in err
    missing_col = tmp_path / "nocol.csv"
    missing_col.write_text("user_id,item_id\n1,10\n")
    err = refused(["data", "prepare", "--dataset", "events", "--path", str(missing_col), *common], capsys)
    assert "nocol.csv" in err and "timestamp" in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="nowhere"):
        main(["--debug", "data", "prepare", "--path", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])


def test_failed_write_keeps_the_previous_output(tmp_path, ml100k_dir, monkeypatch, capsys):
    out = tmp_path / "prep"
    argv = ["data", "prepare", "--dataset", "movielens-100k", "--path", str(ml100k_dir), "--out", str(out),
            "--tracking-uri", _store(tmp_path), "--experiment", "keep"]
    assert main(argv) == 0
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def disk_full(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.FeatureMap, "save", disk_full)
    assert main(argv + ["--set", "protocol.max_history=10"]) == 2   # one line: the OS error
    assert capsys.readouterr().err == "error: No space left on device\n"
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before     # old output intact
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".prep")) == []   # no debris
    client = MlflowClient(_store(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("keep").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]


def test_python_dash_m_entry_point(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "hybrid", "data", "prepare", "--protocol", "bogus",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == EXIT_BAD_INPUT
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in done.stderr


def test_documented_commands_without_tracking_uri_share_the_default_store(tmp_path, ml100k_dir, monkeypatch, capsys):
    """No --tracking-uri anywhere: prepare (twice into the same --out, which is replaced atomically), finetune
    and review all use ./mlflow.db of the working directory — nothing crashes, review finds the runs."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    prepare = ["data", "prepare", "--dataset", "movielens-100k", "--path", str(ml100k_dir), "--protocol", "ratings",
               "--out", "runs/ratings", "--set", "protocol.max_history=20"]
    assert main(prepare) == 0
    assert main(prepare) == 0                                     # the out directory (not the store) is replaced
    assert main(["finetune", "--config", str(REPO / "configs/finetune_tiny.yaml"), "--set", "data=runs/ratings",
                 "--set", "out=runs/ft", "--set", "train.max_steps=6", "--set", "train.eval_every=3"]) == 0
    assert main(["review", "--experiment", "finetune-tiny", "--out", "runs/review"]) == 0
    assert "| DCN-v2 | NT |" in capsys.readouterr().out   # the strategy table, human names
    assert not list((tmp_path / "runs").rglob("mlflow.db"))       # one store, beside the outputs
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    stages = {r.data.tags["stage"] for e in client.search_experiments() for r in client.search_runs([e.experiment_id])}
    assert {"prepare", "finetune", "review"} <= stages


def test_every_set_example_in_the_help_is_valid_for_its_command():
    from hybrid.cli import SET_EXAMPLES
    from hybrid.config import load_config
    from hybrid.jobs.finetune import FinetuneConfig
    from hybrid.jobs.prepare import PrepareConfig
    from hybrid.jobs.pretrain import PretrainConfig
    from hybrid.jobs.sweep import SweepConfig

    configs = {"prepare": PrepareConfig, "pretrain": PretrainConfig, "finetune": FinetuneConfig, "sweep": SweepConfig}
    assert set(SET_EXAMPLES) == set(configs)
    for command, example in SET_EXAMPLES.items():
        load_config(configs[command], overrides=[example])   # an unknown key would raise, naming it
    help_text = subprocess.run([sys.executable, "-m", "hybrid", "pretrain", "--help"], capture_output=True,
                               text=True, cwd=REPO).stdout
    assert "--set train.epochs=5" in help_text


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--config", "missing.yaml"], "missing.yaml: config file not found"),
    (["finetune", "--config", "{repo}/configs/finetune_tiny.yaml", "--set", "data=nowhere"],
     "nowhere: prepared data directory not found"),
    (["pretrain", "--config", "{repo}/configs/pretrain_tiny.yaml", "--set", "train.epochs=["],
     "--set 'train.epochs=[': the value is not valid YAML"),
    (["score", "--model", "nowhere", "--input", "x.csv", "--out", "s.parquet"], "--model nowhere: checkpoint not found"),
    (["finetune", "--config", "{repo}/configs/finetune_tiny.yaml", "--init", "nowhere"],
     "--init nowhere: pretraining checkpoint not found"),
    (["data", "prepare", "--dataset", "events", "--path", "nowhere.csv", "--out", "o"],
     "--path nowhere.csv: dataset path not found"),
])
def test_typos_answer_before_the_heavy_stack_is_imported(tmp_path, argv, message):
    """A missing path or a bad --set value is reported before torch / TorchRec / MLflow load (what made such an
    error take 8 s); the start-up time itself is measured by bench/cli_startup.py."""
    argv = [a.replace("{repo}", str(REPO)) for a in argv]
    script = ("import sys; from hybrid.cli import main; rc = main(sys.argv[1:]); "
              "heavy = sorted(m for m in ('torch', 'torchrec', 'mlflow', 'duckdb') if m in sys.modules); "
              "print('loaded:', heavy); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == EXIT_BAD_INPUT, done.stderr
    assert done.stderr.strip() == f"error: {message}" or message in done.stderr.strip().splitlines()[-1]
    assert done.stderr.count("\n") == 1
    assert "loaded: []" in done.stdout


def test_quiet_turns_every_progress_off(monkeypatch, capsys, tmp_path):
    import hybrid.cli as cli
    from hybrid.core import progress

    seen = {}

    def run(args):
        bar = progress.Progress("finetune", total=10, enabled=True)
        bar.log(1, 0.1, {"loss": "0.69"})
        seen["enabled"] = bar.enabled
        return 0

    monkeypatch.setattr(progress, "_QUIET", False)
    monkeypatch.setitem(cli.COMMANDS, ("review", None), run)
    argv = ["review", "--experiment", "e", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert cli.main(argv) == 0 and seen["enabled"] and "finetune step 1/10" in capsys.readouterr().out
    assert cli.main(["--quiet", *argv]) == 0 and not seen["enabled"] and capsys.readouterr().out == ""
