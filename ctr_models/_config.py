"""Config helpers shared by the ranker configs: validation that names the field, and ``from_dict``.

Every ranker config is a plain (frozen) dataclass, so YAML/JSON configs map onto it field by field.
:func:`config_from_dict` turns a nested mapping into the dataclass, converting lists to tuples and nested
mappings to nested config dataclasses, and rejects unknown keys with a message naming the key — a typo in a
config file must fail loudly, not silently fall back to a default.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def freeze_lists(config: Any) -> None:
    """Turn list-valued fields of a frozen config dataclass into tuples (YAML and JSON give lists).

    Call first in ``__post_init__``; configs stay hashable and comparable whatever the caller passed.
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, list):
            object.__setattr__(config, f.name, tuple(value))


def require(condition: bool, config: str, field: str, message: str) -> None:
    """Raise ``ValueError("<config>.<field>: <message>")`` unless ``condition`` holds.

    Example:
        >>> require(2 > 1, "DCNv2Config", "num_cross_layers", "must be >= 1")
    """
    if not condition:
        raise ValueError(f"{config}.{field}: {message}")


def require_choice(value: Any, choices: tuple, config: str, field: str) -> None:
    """Raise a ``ValueError`` naming the field and the accepted values when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"{config}.{field}: unknown value {value!r}; expected one of {list(choices)}")


def require_positive_ints(values: tuple, config: str, field: str, allow_empty: bool = True) -> None:
    """Check a tuple of layer sizes: every entry a positive int (and non-empty unless ``allow_empty``)."""
    require(isinstance(values, tuple), config, field, f"must be a tuple of ints, got {type(values).__name__}")
    require(allow_empty or len(values) > 0, config, field, "must not be empty")
    for v in values:
        require(isinstance(v, int) and not isinstance(v, bool) and v > 0, config, field,
                f"every entry must be a positive int, got {values!r}")


def config_from_dict(cls: type[T], data: Mapping[str, Any] | T) -> T:
    """Build config dataclass ``cls`` from a (nested) mapping; a ``cls`` instance is returned unchanged.

    Lists become tuples (configs are hashable and immutable); a mapping given for a field whose type is a
    dataclass is converted recursively. Unknown keys raise ``ValueError`` naming them.

    Example:
        >>> from ctr_models.dcn_v2 import DCNv2Config
        >>> config_from_dict(DCNv2Config, {"cross_type": "low_rank", "features": {"embedding_dim": 8}})
        DCNv2Config(...)
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__}: expected a mapping or {cls.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints.get(name), value, f"{cls.__name__}.{name}")
    return cls(**kwargs)  # type: ignore[call-arg]


def _convert(hint: Any, value: Any, where: str) -> Any:
    if isinstance(value, Mapping):
        target = _dataclass_in(hint)
        if target is not None:
            return config_from_dict(target, value)
        return value
    if isinstance(value, list):
        return tuple(_convert(None, v, where) for v in value)
    return value


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass type named by a hint such as ``FeatureConfig`` or ``Optional[BackboneConfig]``."""
    if hint is None:
        return None
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg) and isinstance(arg, type):
            return arg
    return None
