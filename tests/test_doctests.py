"""Every docstring ``Example:`` block of the package runs, so none can drift from the code.

Examples see a small shared namespace (below): ``vocab_sizes`` and a CTR ``batch`` over them (synthetic,
two tasks), ``spec`` (their feature layout), ``bce``, ``root`` / ``out_dir`` (empty temporary directories),
and for the data and job modules real ML-100K: ``ml100k_dir`` (raw) and ``prepared_dir`` (``ratings``).
An example that needs what a test cannot afford here (a prepared dataset, a trained checkpoint, a
multi-process job) says so with ``# doctest: +SKIP`` on its lines; the CLI and job tests run those paths.
"""
from __future__ import annotations

import doctest
import importlib
import pkgutil
import sys
from pathlib import Path

import pytest
import torch
from ctr_synthetic import SYNTHETIC_VOCAB_SIZES, make_synthetic_batch

import hybrid
import hybrid.adapters
import hybrid.ctr_models
import hybrid.pretrain


def _modules() -> list[str]:
    names = []
    for package in (hybrid, hybrid.adapters, hybrid.pretrain, hybrid.ctr_models):
        names.append(package.__name__)
        names += [m.name for m in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")]
    # hybrid.adapters & co. are folders beside hybrid/ (package-dir), not inside it: listed once each
    return sorted(set(names) - {"hybrid.__main__"})


MODULES = _modules()
REPO = Path(__file__).resolve().parents[1]


#: modules whose examples read real ML-100K (the session fixtures fetch and prepare it once)
NEEDS_DATA = {"hybrid.data.batching", "hybrid.data.duckdb_engine", "hybrid.data.protocols", "hybrid.jobs.finetune"}


def _namespace(tmp_path) -> dict:
    from hybrid.ctr_models.features import FeatureConfig, FeatureSpec

    batch = make_synthetic_batch(16, torch.Generator().manual_seed(0), tasks=("in_history", "parity"))
    return {
        "torch": torch,
        "vocab_sizes": dict(SYNTHETIC_VOCAB_SIZES),
        "batch": batch,
        "spec": FeatureSpec.from_vocab_sizes(SYNTHETIC_VOCAB_SIZES, FeatureConfig.tiny()),
        "bce": torch.nn.functional.binary_cross_entropy_with_logits,
        "root": tmp_path / "checkpoints",
        "out_dir": tmp_path / "out",
    }


def test_every_module_is_covered():
    assert {"hybrid.core.jagged", "hybrid.adapters.config", "hybrid.pretrain.model", "hybrid.ctr_models.tin",
            "hybrid.jobs.stage"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name, tmp_path, monkeypatch, request):
    # Examples import as a user would: the repository root (where the folders `pretrain/`, `adapters/` sit)
    # is not on sys.path, so a stale `from pretrain import ...` fails here instead of working by accident.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != REPO])
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    module = importlib.import_module(name)
    namespace = _namespace(tmp_path)
    if name in NEEDS_DATA:
        namespace.update(ml100k_dir=request.getfixturevalue("ml100k_dir"),
                         prepared_dir=request.getfixturevalue("prepared_ratings_dir"))
    torch.manual_seed(0)
    result = doctest.testmod(module, extraglobs=namespace, optionflags=doctest.ELLIPSIS,
                             report=True, verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (see stdout)"
