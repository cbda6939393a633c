"""The CLI over a catalogue of bad inputs: each one is a ``HybridInputError`` — one line naming the file, row,
column or key, exit 2, nothing written — and anything else is a bug: one line saying so, exit 1, the traceback
only under ``--debug``.

Other files test the deeper classes through the same CLI (corrupt checkpoints: test_checkpoint_integrity.py;
degenerate data, duplicates, extra fields: test_prepare_validation.py; score inputs and a checkpoint of another
dataset: test_score.py; typos before the heavy imports: test_cli.py).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from hybrid.cli import EXIT_BAD_INPUT, EXIT_BUG, main

REPO = Path(__file__).resolve().parents[1]
HEADER = "user_id,item_id,timestamp,rating"
ROWS = [f"u{u},i{(7 * u + k) % 40},{1_000_000 + 1000 * k + u},{1 + (u + k) % 5}" for u in range(30) for k in range(12)]


def _write(path: Path, text: str | bytes) -> Path:
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def _with_row(index: int, row: str) -> str:
    rows = list(ROWS)
    rows[index] = row
    return "\n".join([HEADER, *rows]) + "\n"


FILES = {  # name: (file content, the message's telling part)
    "missing column": ("\n".join(["user_id,item_id,rating", *(r.rsplit(",", 2)[0] + "," + r.rsplit(",", 1)[1]
                                                             for r in ROWS)]) + "\n",
                       "missing required column 'timestamp'; columns present: user_id, item_id, rating"),
    "wrong type": (_with_row(6, "u0,i3,notatime,4"),
                   "line 8, column 'timestamp': cannot parse 'notatime' as a timestamp"),
    "NaN": (_with_row(6, "u0,i3,1000007,nan"), "line 8, column 'rating': value is empty/NaN"),
    "inf": (_with_row(6, "u0,i3,1000007,inf"), "line 8, column 'rating': 'inf' is not a finite number"),
    "empty file": ("", "file is empty"),
    "header only": (HEADER + "\n", "no events"),
    "not UTF-8": ((HEADER + "\nu\xe9,i1,1000010,3\n").encode("latin-1"), "not UTF-8 text"),
    "one timestamp": ("\n".join([HEADER, *(f"u{u},i{k},1000000,3" for u in range(20) for k in range(5))]) + "\n",
                      "all 100 events are at the same time"),
}


@pytest.mark.parametrize("case", list(FILES))
def test_bad_event_files_get_one_line_exit_2_and_no_output(tmp_path, capsys, case):
    content, message = FILES[case]
    path = _write(tmp_path / "events.csv", content)
    out = tmp_path / "prepared"
    code = main(["data", "prepare", "--dataset", "events", "--path", str(path), "--protocol", "ratings",
                 "--out", str(out), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert err.startswith(f"error: {path}") and message in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--set", "ranker.name=dcn_v3"], "dcn_v3"),
    (["--set", "train.lrr=0.1"], "train.lrr"),
    (["--strategy", "st_sff"], "st_sff"),
    (["--set", "train.batch_size=many"], "train.batch_size"),
    (["--init", "{missing}"], "pretraining checkpoint not found"),
])
def test_bad_finetune_options_name_the_key(tmp_path, capsys, prepared_ratings_dir, argv, message):
    argv = [a.replace("{missing}", str(tmp_path / "no-such-checkpoint")) for a in argv]
    out = tmp_path / "finetune"
    code = main(["finetune", "--config", str(REPO / "configs/finetune_tiny.yaml"), "--set",
                 f"data={prepared_ratings_dir}", "--set", f"out={out}", "--set", "tracking.enabled=false", *argv])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_quickstart_set_needs_a_stage(capsys):
    assert main(["quickstart", "--set", "train.epochs=2"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "expected STAGE:KEY=VALUE with STAGE one of pretrain, gpsd, dcn_v2" in err and err.count("\n") == 1


def test_anything_else_is_a_bug_in_one_line_and_the_traceback_under_debug(monkeypatch, capsys, tmp_path):
    import hybrid.cli as cli

    def broken(args):
        raise KeyError("feature 'x'")

    monkeypatch.setitem(cli.COMMANDS, ("review", None), broken)
    argv = ["review", "--experiment", "e", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(argv) == EXIT_BUG
    err = capsys.readouterr().err
    assert err.startswith("error: this is a bug in hybrid") and "KeyError: \"feature 'x'\"" in err
    assert "--debug" in err and err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(KeyError):
        main(["--debug", *argv])
