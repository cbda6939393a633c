from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from hybrid.config import flatten, load_config, to_yaml
from hybrid.errors import HybridInputError
from hybrid.prepare import PrepareConfig


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Job:
    name: str = "x"
    epochs: int = 3
    kind: Literal["llama", "hstu"] = "llama"
    optim: Optim = field(default_factory=Optim)
    tags: list[str] = field(default_factory=list)
    seed: int | None = None


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("epochs: 5\noptim:\n  lr: 0.01\n")
    cfg = load_config(Job, path, ["optim.betas=[0.8, 0.9]", "kind=hstu", "seed=7", "tags=[a, b]"])
    assert cfg == Job(epochs=5, kind="hstu", optim=Optim(lr=0.01, betas=(0.8, 0.9)), tags=["a", "b"], seed=7)
    assert load_config(Job, path, ["optim.lr=1"]).optim.lr == 1.0     # an int is a valid float


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(Job, overrides=["epochs=9"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(Job, path) == cfg
    assert flatten(yaml.safe_load(to_yaml(cfg)))["optim.lr"] == 1e-3


@pytest.mark.parametrize("override, message", [
    ("epoch=5", "unknown key 'epoch' (did you mean 'epochs'?)"),
    ("optim.learning_rate=1", "unknown key 'optim.learning_rate'"),
    ("epochs=five", "key 'epochs' expects an integer, got 'five'"),
    ("epochs=1.5", "key 'epochs' expects an integer, got 1.5"),
    ("kind=gpt", "key 'kind' expects one of 'llama', 'hstu', got 'gpt'"),
    ("optim=3", "key 'optim' must be a mapping, got 3"),
    ("optim.betas=[1]", "key 'optim.betas' expects a list of 2 values"),
    ("epochs", "expected key.path=value"),
])
def test_bad_keys_and_types_are_named(override, message):
    with pytest.raises(HybridInputError) as err:
        load_config(Job, overrides=[override])
    assert message in str(err.value)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(HybridInputError, match="missing.yaml: config file not found"):
        load_config(Job, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1\n")
    with pytest.raises(HybridInputError, match="bad.yaml: not valid YAML"):
        load_config(Job, bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  lr: 0.1\n  bettas: [0.9, 0.9]\n")
    with pytest.raises(HybridInputError, match="typo.yaml: unknown key 'optim.bettas' \\(did you mean 'optim.betas'\\?\\)"):
        load_config(Job, typo)


def test_prepare_config_and_example_configs():
    cfg = load_config(PrepareConfig, overrides=["protocol.protocol=ratings", "data.path=/x"])
    assert cfg.protocol.protocol == "ratings" and cfg.data.path == "/x"
    with pytest.raises(HybridInputError, match="key 'protocol.protocol' expects one of 'last-item', 'ratings'"):
        load_config(PrepareConfig, overrides=["protocol.protocol=rating"])


def test_example_configs_load():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("prepare_*.yaml")):
        cfg = load_config(PrepareConfig, path)
        assert cfg.data.dataset == "movielens-1m", path
