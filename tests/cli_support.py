"""What every CLI test asserts of a refused command: exit 2 and one ``error: ...`` line, no traceback."""
from __future__ import annotations

from hybrid.cli import EXIT_BAD_INPUT, main


def refused(argv: list[str], capsys) -> str:
    """Run ``hybrid *argv``; assert it is refused with one line on stderr (exit 2) and return that line."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err
