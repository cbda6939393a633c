"""One import namespace: everything installs under ``hybrid``, imports flow one way, nothing is shadowed.

Layers (a module may import its own layer and the ones below it):

    hybrid (cli, jobs, tracking, review, config, bootstrap)
      → hybrid.adapters → hybrid.pretrain / hybrid.ctr_models → hybrid.core
      → hybrid.data → hybrid.core
"""
from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import hybrid

REPO = Path(__file__).resolve().parents[1]
OLD_TOP_LEVEL = {"adapters", "pretrain", "ctr_models", "hybrid_base"}
#: package → the packages it may import (besides itself and the standard / third-party libraries)
ALLOWED = {
    "hybrid.core": set(),
    "hybrid.data": {"hybrid.core"},
    "hybrid.pretrain": {"hybrid.core"},
    "hybrid.ctr_models": {"hybrid.core"},
    "hybrid.adapters": {"hybrid.core", "hybrid.pretrain", "hybrid.ctr_models"},
}


def _modules() -> list[str]:
    names = ["hybrid"]
    for info in pkgutil.walk_packages(hybrid.__path__, prefix="hybrid."):
        names.append(info.name)
    for sub in ("adapters", "pretrain", "ctr_models", "configs"):
        package = importlib.import_module(f"hybrid.{sub}")
        names.append(package.__name__)
        names += [info.name for info in pkgutil.walk_packages(package.__path__, prefix=f"hybrid.{sub}.")]
    return sorted(set(names))


def _layer(module: str) -> str:
    for package in ALLOWED:
        if module == package or module.startswith(package + "."):
            return package
    return "hybrid"   # the top: CLI, jobs, tracking, review


def _imported(module: str) -> set[str]:
    """Every module name ``module`` imports anywhere (top level or inside functions)."""
    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_every_module_imports_and_imports_flow_one_way():
    modules = _modules()
    assert {"hybrid.core.feature_map", "hybrid.adapters.transfer", "hybrid.pretrain.layout",
            "hybrid.ctr_models.dcn_v2", "hybrid.jobs.finetune", "hybrid.configs"} <= set(modules)
    wrong = []
    for module in modules:
        importlib.import_module(module)
        layer = _layer(module)
        for target in _imported(module):
            top = target.split(".")[0]
            if top in OLD_TOP_LEVEL:
                wrong.append(f"{module} imports the old top-level name {target}")
            elif top == "hybrid" and layer != "hybrid":
                target_layer = _layer(target) if target != "hybrid" else "hybrid"
                if target_layer != layer and target_layer not in ALLOWED[layer]:
                    wrong.append(f"{module} ({layer}) imports {target} ({target_layer})")
    assert not wrong, "\n".join(wrong)
    assert not OLD_TOP_LEVEL & {m.split(".")[0] for m in sys.modules}


def test_importing_hybrid_and_its_cli_loads_no_torch():
    """``hybrid --version``, ``hybrid bootstrap`` and the one-line dependency errors work before torchrec
    (or torch) is installed: the CLI module imports neither."""
    code = ("import sys, hybrid, hybrid.cli; "
            "print(any(m.split('.')[0] in ('torch', 'torchrec', 'fbgemm_gpu') for m in sys.modules), hybrid.__version__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", hybrid.__version__]


def test_declared_packages_cover_every_folder():
    """Every folder with an ``__init__.py`` under the mapped roots is listed in pyproject's packages."""
    import tomllib

    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping, declared = tool["package-dir"], set(tool["packages"])
    found = set()
    for package, folder in mapping.items():
        for init in (REPO / folder).rglob("__init__.py"):
            found.add(".".join([package, *init.parent.relative_to(REPO / folder).parts]))
    assert found == declared


def _user_shadow_dir(tmp_path: Path) -> Path:
    work = tmp_path / "user_project"
    work.mkdir()
    for name in OLD_TOP_LEVEL:   # what users' own repos commonly hold next to their scripts
        (work / f"{name}.py").write_text("raise ImportError('the user script was imported instead of hybrid')\n")
    return work


def test_a_users_pretrain_py_does_not_break_hybrid_pretrain(prepared_last_item_dir, tmp_path):
    work = _user_shadow_dir(tmp_path)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "hybrid", "pretrain", "--config", str(REPO / "configs" / "pretrain_tiny.yaml"),
            "--set", f"data={prepared_last_item_dir}", "--set", f"out={out}", "--set", "train.epochs=1",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "checkpoints" / "LATEST").is_file()


def _build_wheel(dest: Path) -> Path:
    # from a copy of the tracked sources: a setuptools build/ left in the tree would leak stale files into it
    import shutil

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    src = dest / "src"
    for rel in tracked.split():
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(dest), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return next(dest.glob("hybrid_ctr-*.whl"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return _build_wheel(tmp_path_factory.mktemp("wheel"))


def test_the_wheel_installs_only_hybrid_with_configs_and_license(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"hybrid"}
    for needed in ("hybrid/configs/quickstart_pretrain.yaml", "hybrid/configs/quickstart_finetune_gpsd.yaml",
                   "hybrid/configs/quickstart_finetune_dcn_v2.yaml", "hybrid/py.typed",
                   "hybrid/adapters/transfer.py", "hybrid/core/feature_map.py", "hybrid/pretrain/layout.py"):
        assert needed in names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


@pytest.mark.slow
def test_adapterhub_adapters_and_the_wheel_live_side_by_side(wheel, tmp_path):
    """A fresh venv (this one's packages visible through a .pth) with AdapterHub's ``adapters`` and the
    project's wheel installed: both import and work, and ``hybrid`` runs from a directory of user scripts."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    Path(site, "outer_env.pth").write_text("\n".join(ours) + "\n")
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    done = subprocess.run([*pip, "--no-deps", str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # AdapterHub pins transformers 4.57; pip puts it (and what it needs) in the new venv, shadowing ours
    done = subprocess.run([*pip, "adapters==1.3.0"], capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and "No matching distribution" in done.stderr + done.stdout:
        pytest.skip("AdapterHub's adapters is not reachable from this machine's package index")
    assert done.returncode == 0, done.stderr[-3000:]
    script = """
import adapters, hybrid, hybrid.adapters, torch
from transformers import BertConfig
from adapters import AutoAdapterModel
assert 'site-packages' in hybrid.__file__ and adapters.__file__ != hybrid.adapters.__file__
model = AutoAdapterModel.from_config(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=64, vocab_size=100))
model.add_adapter("a", config="seq_bn"); model.set_active_adapters("a")
out = model(torch.randint(0, 100, (2, 5)))
cfg = hybrid.adapters.TransferConfig(strategy="st_sf", checkpoint="ckpt")
print("ok", out.last_hidden_state.shape[-1], cfg.strategy.label)
"""
    work = _user_shadow_dir(tmp_path)
    (work / "adapters.py").unlink()   # here `adapters` must be AdapterHub's
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(py), "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ok", "32", "ST&SF"]
    done = subprocess.run([str(py), "-m", "hybrid", "--version"], cwd=work, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0 and done.stdout.strip() == f"hybrid {hybrid.__version__}", done.stderr


def test_every_import_path_in_the_readme_resolves():
    """The README's ``from hybrid... import ...`` lines and dotted ``hybrid.x.y`` names all exist."""
    import re

    text = (REPO / "README.md").read_text()
    checked = 0
    for module, names in re.findall(r"^from (hybrid[\w.]*) import ([\w, ]+)$", text, re.M):
        imported = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(imported, name), f"README: {module} has no {name}"
            checked += 1
    for dotted in set(re.findall(r"`(hybrid(?:\.[a-z_]+)+)`", text)):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):   # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ModuleNotFoundError:
                continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("missing, message", [
    ("torchrec", "torchrec is not installed: run `hybrid bootstrap`"),
    ("torch", "hybrid needs torch 2.13.x (found no torch)"),
])
def test_a_missing_stack_package_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path, missing, message):
    from hybrid import bootstrap
    from hybrid.cli import EXIT_BAD_INPUT, main

    real = bootstrap._version
    monkeypatch.setattr(bootstrap, "_version", lambda dist: None if dist == missing else real(dist))
    # the config's data must exist, or the CLI's preflight answers first (a clean clone has no prepared data)
    assert main(["pretrain", "--config", str(REPO / "configs" / "pretrain_tiny.yaml"),
                 "--set", f"data={tmp_path}"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
