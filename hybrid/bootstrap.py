"""The pinned training stack — torch 2.13, fbgemm-gpu 1.8.0, torchrec 1.8.0 — checked, and completed by pip.

pip alone cannot install torchrec here: its wheel names the CUDA build of ``fbgemm-gpu`` as a dependency,
which a CPU machine must not pull (``fbgemm-gpu-cpu`` installs the same ``fbgemm_gpu`` module). So
``pip install "hybrid-ctr[cpu]"`` installs everything else, and ``hybrid bootstrap`` adds torchrec
without its dependencies (they are already declared by ``hybrid-ctr``). Every command that trains checks the
stack first (:func:`check_stack`) and says in one line what to install (exit 2) instead of a traceback.

Example:
    >>> isinstance(TORCHREC, str) and TORCHREC.startswith("torchrec==")
    True
"""
from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys

from hybrid.core.errors import DependencyError

TORCH_SERIES = "2.13"
FBGEMM_SERIES = "1.8"
TORCHREC = "torchrec==1.8.0"
_CPU_HINT = ('pip install "hybrid-ctr[cpu]" (CPU: torch==2.13.0 + fbgemm-gpu-cpu==1.8.0) or "hybrid-ctr[cuda]" '
             "(CUDA: fbgemm-gpu==1.8.0)")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_stack(need_torchrec: bool = True) -> None:
    """Raise :class:`DependencyError` (one line: what is wrong, what to run) unless torch, fbgemm-gpu and
    torchrec are installed in mutually compatible versions and load."""
    torch_version = _version("torch")
    if torch_version is None or not torch_version.startswith(TORCH_SERIES + "."):
        found = f"torch {torch_version}" if torch_version else "no torch"
        raise DependencyError(f"hybrid needs torch {TORCH_SERIES}.x (found {found}): {_CPU_HINT}")
    fbgemm = [(d, v) for d in ("fbgemm-gpu-cpu", "fbgemm-gpu") if (v := _version(d)) is not None]
    if not fbgemm:
        raise DependencyError(f"hybrid needs fbgemm-gpu {FBGEMM_SERIES}.x (none installed): {_CPU_HINT}")
    if len(fbgemm) > 1:
        raise DependencyError("both fbgemm-gpu-cpu and fbgemm-gpu are installed (they overwrite one module): "
                              "pip uninstall -y fbgemm-gpu fbgemm-gpu-cpu, then reinstall the one you need")
    dist, fbgemm_version = fbgemm[0]
    if not fbgemm_version.startswith(FBGEMM_SERIES + "."):
        raise DependencyError(f"{dist} {fbgemm_version} does not load on torch {torch_version} (needs "
                              f"{FBGEMM_SERIES}.x): pip install '{dist}=={FBGEMM_SERIES}.0'")
    try:
        importlib.import_module("fbgemm_gpu")
    except Exception as err:  # noqa: BLE001 - a broken native library raises anything
        raise DependencyError(f"{dist} {fbgemm_version} fails to load ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}): {_CPU_HINT}") from None
    if not need_torchrec:
        return
    if _version("torchrec") is None:
        raise DependencyError(f"torchrec is not installed: run `hybrid bootstrap` (= pip install --no-deps "
                              f"{TORCHREC}; its wheel would pull the CUDA fbgemm-gpu)")
    if _version("torchrec") != TORCHREC.split("==")[1]:
        raise DependencyError(f"torchrec {_version('torchrec')} installed, hybrid is tested with {TORCHREC}: "
                              f"pip install --no-deps {TORCHREC}")


def bootstrap() -> int:
    """Install torchrec without its dependencies if it is missing, then check the whole stack."""
    check_stack(need_torchrec=False)
    if _version("torchrec") is None:
        print(f"installing {TORCHREC} without dependencies (they come with hybrid-ctr)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", TORCHREC], check=True)
        importlib.invalidate_caches()
    check_stack()
    print(f"ok: torch {_version('torch')}, fbgemm {FBGEMM_SERIES}, {TORCHREC}")
    return 0
