from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from hybrid.config import flatten, load_config, to_yaml
from hybrid.core.errors import HybridInputError
from hybrid.jobs.prepare import PrepareConfig


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
    ("optim.betas=[0.9", "--set 'optim.betas=[0.9': the value is not valid YAML"),
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


# ----------------------------------------------------------------- one loader for jobs and model configs

def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-3` as the string '1e-3'; a float field takes it as the number
    path = tmp_path / "job.yaml"
    path.write_text("optim:\n  lr: 1e-3\n")
    lr = load_config(Job, path).optim.lr
    assert lr == 1e-3 and isinstance(lr, float)
    assert load_config(Job, overrides=["optim.lr=5e-3"]).optim.lr == 5e-3
    with pytest.raises(HybridInputError, match="key 'optim.lr' expects a number, got 'fast'"):
        load_config(Job, overrides=["optim.lr=fast"])
    with pytest.raises(HybridInputError, match="key 'epochs' expects an integer, got '1e3'"):
        load_config(Job, overrides=["epochs=1e3"])          # only float fields take a float literal


def test_exponent_float_override_of_a_job_config():
    from hybrid.jobs.finetune import FinetuneConfig

    lr = load_config(FinetuneConfig, overrides=["train.optim.lr=1e-05"]).train.optim.lr
    assert lr == 1e-05 and isinstance(lr, float)


def test_one_error_class_and_one_loader_on_both_import_paths():
    import hybrid.config
    import hybrid.core.config
    import hybrid.core.errors

    assert HybridInputError is hybrid.core.errors.HybridInputError and issubclass(HybridInputError, ValueError)
    for name in ("load_config", "from_mapping", "to_dict", "to_yaml", "flatten"):
        assert getattr(hybrid.config, name) is getattr(hybrid.core.config, name)


def _ranker_and_model_configs():
    from hybrid.core.backbones import BackboneConfig
    from hybrid.ctr_models import (
        DCNv2Config,
        FeatureConfig,
        GPSDRankerConfig,
        HistoryConfig,
        MMoEConfig,
        MultiEmbeddingMoEConfig,
        MultimodalConfig,
        TINConfig,
    )
    from hybrid.pretrain.model import GenerativeModelConfig
    from hybrid.pretrain.objectives import ObjectiveConfig

    return [DCNv2Config, MMoEConfig, MultiEmbeddingMoEConfig, TINConfig, GPSDRankerConfig, FeatureConfig,
            HistoryConfig, MultimodalConfig, BackboneConfig, ObjectiveConfig, GenerativeModelConfig]


@pytest.mark.parametrize("cls", _ranker_and_model_configs(), ids=lambda c: c.__name__)
def test_model_configs_round_trip_through_the_loader(cls):
    import dataclasses
    import json

    from hybrid.config import from_mapping, to_dict

    configs = [cls()] + ([cls.tiny()] if hasattr(cls, "tiny") else [])
    if cls.__name__ == "HistoryConfig":
        from hybrid.core.backbones import BackboneConfig

        configs.append(cls(encoder="transformer", backbone=BackboneConfig.tiny("hstu")))
    for cfg in configs:
        assert from_mapping(cls, dataclasses.asdict(cfg)) == cfg
        # what a checkpoint manifest holds (JSON: tuples become lists) and what to_yaml writes
        assert from_mapping(cls, json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
        assert from_mapping(cls, yaml.safe_load(to_yaml(cfg))) == cfg
        assert from_mapping(cls, to_dict(cfg)) == cfg
        if hasattr(cls, "from_dict"):
            assert cls.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_ranker_configs_are_rebuilt_from_manifest_json():
    import dataclasses
    import json

    from hybrid.ctr_models import RANKER_NAMES, FeatureConfig, ranker_classes
    from hybrid.ctr_models._config import config_from_dict

    for name in RANKER_NAMES:
        config_cls, _ = ranker_classes(name)
        cfg = config_cls.tiny()
        assert config_from_dict(config_cls, json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
        assert config_from_dict(config_cls, cfg) is cfg
    dcn = ranker_classes("dcn_v2")[0]
    assert config_from_dict(dcn, {"features": FeatureConfig.tiny()}).features == FeatureConfig.tiny()


def test_model_config_types_are_checked_and_the_key_named():
    from hybrid.core.backbones import BackboneConfig
    from hybrid.ctr_models import DCNv2Config, GPSDRankerConfig
    from hybrid.ctr_models._config import config_from_dict
    from hybrid.pretrain.model import GenerativeModelConfig
    from hybrid.pretrain.objectives import ObjectiveConfig

    with pytest.raises(HybridInputError, match="key 'backbone.norm_eps' expects a number, got 'abc'"):
        config_from_dict(GPSDRankerConfig, {"backbone": {"norm_eps": "abc"}})
    with pytest.raises(HybridInputError, match="key 'backbone.norm_eps' expects a number, got 'abc'"):
        config_from_dict(DCNv2Config, {"history": {"encoder": "transformer", "backbone": {"norm_eps": "abc"}}})
    with pytest.raises(HybridInputError, match="key 'backbone.norm_eps' expects a number, got 'abc'"):
        GenerativeModelConfig.from_dict({"backbone": {"norm_eps": "abc"}})
    with pytest.raises(ValueError, match="key 'norm_eps' expects a number, got 'abc'"):
        BackboneConfig.from_dict({"norm_eps": "abc"})
    with pytest.raises(ValueError, match="key 'temperature' expects a number, got 'hot'"):
        ObjectiveConfig.from_dict({"temperature": "hot"})
    with pytest.raises(ValueError, match="key 'features.embedding_dim' expects an integer, got '8'"):
        config_from_dict(DCNv2Config, {"features": {"embedding_dim": "8"}})
    with pytest.raises(ValueError, match="DCNv2Config: unknown key 'cross_typ' \\(did you mean 'cross_type'\\?\\)"):
        config_from_dict(DCNv2Config, {"cross_typ": "full"})
    assert BackboneConfig.from_dict({"norm_eps": "1e-6"}).norm_eps == 1e-6
