"""Configs: dataclasses loaded from YAML, with ``--set a.b=value`` overrides and strict keys.

The one config loader of the project. Every job's config is a tree of dataclasses (the models' own config
dataclasses included), and the models' configs are rebuilt from mappings with it too
(``BackboneConfig.from_dict``, ``ObjectiveConfig.from_dict``, ``GenerativeModelConfig.from_dict``, the
rankers' configs through ``hybrid.ctr_models.build_ranker``). Loading checks every key and type against the
dataclass fields, so a typo is an error that names the key — it never silently falls back to a default.
Lists are accepted for tuple fields (YAML and JSON have no tuples), nested mappings become the nested config
dataclasses, and a string that is a float literal is accepted for a ``float`` field (PyYAML reads ``1e-3``,
an exponent without a dot, as a string). The resolved config (file + overrides + defaults) is written beside
every output with :func:`to_yaml`. ``hybrid.config`` re-exports this module's public functions.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Train:
    ...     lr: float = 1e-3
    ...     epochs: int = 3
    >>> load_config(Train, overrides=["epochs=5", "lr=5e-3"])
    Train(lr=0.005, epochs=5)
    >>> load_config(Train, overrides=["epoch=5"])
    Traceback (most recent call last):
    hybrid.core.errors.ConfigError: --set: unknown key 'epoch' (did you mean 'epochs'?)
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from hybrid.core.errors import ConfigError

T = TypeVar("T")

# a decimal float literal (``1e-05``, ``5e-3``, ``.5``, ``-2.``): accepted as a string for a ``float`` field
_FLOAT_LITERAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from a YAML file (optional) and ``key.path=value`` overrides (YAML-typed values)."""
    raw = read_config_mapping(path, overrides)
    source = str(path) if path is not None else "--set"
    if path is not None and overrides:
        source = f"{path} (with --set overrides)"
    return _build(cls, raw, prefix="", source=source)


def read_config_mapping(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> dict:
    """The YAML file (optional) with ``key.path=value`` overrides applied, as a plain mapping, before any key is
    checked against a config class (what the CLI reads before it imports the heavy stack)."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({str(err).splitlines()[0]}); quote a "
                              "string that starts with [ { or :") from None
        _set_path(raw, key.strip().split("."), parsed)
    return raw


def from_mapping(cls: type[T], raw: Mapping[str, Any] | None, prefix: str = "", source: str = "<config>") -> T:
    """Build ``cls`` from an in-memory mapping with the checks of :func:`load_config` (strict keys, types).

    For a config section whose dataclass is chosen at run time (e.g. a ranker's own config under
    ``ranker.config``) and for the models' ``from_dict``. ``prefix`` is prepended to key names in messages,
    ``source`` starts them. An instance of ``cls`` (for ``raw`` or for any nested config field) is taken as
    it is.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Train:
        ...     epochs: int = 3
        >>> from_mapping(Train, {"epoch": 5}, prefix="train.", source="cfg.yaml")
        Traceback (most recent call last):
        hybrid.core.errors.ConfigError: cfg.yaml: unknown key 'train.epoch' (did you mean 'train.epochs'?)
    """
    return _build(cls, raw, prefix=prefix, source=source)


def to_dict(cfg: Any) -> Any:
    """A plain dict/list tree of a config (what :func:`to_yaml` writes and MLflow logs as params)."""
    if dataclasses.is_dataclass(cfg) and callable(getattr(cfg, "to_dict", None)):
        return cfg.to_dict()  # a config with its own JSON form (e.g. TransferConfig)
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (for MLflow params)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


# -- internals ------------------------------------------------------------------------------------------------

def _set_path(tree: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        node = tree.get(key)
        if not isinstance(node, dict):
            node = tree[key] = {}
        tree = node
    tree[keys[-1]] = value


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if isinstance(raw, cls):
        return raw
    where = prefix.rstrip(".") or "<top>"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: key '{where}' must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{hint}")
    hints = get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], f"{prefix}{name}", source)
        elif dataclasses.is_dataclass(hints[name]) and field.default is dataclasses.MISSING \
                and field.default_factory is dataclasses.MISSING:
            kwargs[name] = _build(hints[name], {}, f"{prefix}{name}.", source)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{prefix}{name}'")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{source}: {where}: {err}" if prefix else f"{source}: {err}") from None


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: key '{key}' expects {expected}, got {value!r}")

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, source)
            except ConfigError:
                continue
        raise bad(" or ".join(_type_name(a) for a in args))
    if origin is Literal:
        if value in args:
            return value
        raise bad("one of " + ", ".join(repr(a) for a in args))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            return float(value)
        raise bad("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    if origin in (list, tuple, Sequence, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise bad(f"a list of {len(args)} values")
            return tuple(_coerce(a, v, f"{key}[{i}]", source) for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin in (dict, Mapping, typing.Mapping):
        if not isinstance(value, Mapping):
            raise bad("a mapping")
        key_tp, val_tp = args if args else (Any, Any)
        return {_coerce(key_tp, k, key, source): _coerce(val_tp, v, f"{key}.{k}", source) for k, v in value.items()}
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise bad(_type_name(tp))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))
