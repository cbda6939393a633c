"""Config helpers shared by the ranker configs: validation that names the field, and ``from_dict``.

Every ranker config is a plain (frozen) dataclass, so YAML/JSON configs map onto it field by field.
:func:`config_from_dict` builds it with the project's one config loader (:func:`hybrid.core.config.from_mapping`):
lists become tuples, nested mappings become nested config dataclasses, and an unknown key or a value of the
wrong type is refused with a message naming the key — a typo in a config file must fail loudly, not silently
fall back to a default.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from hybrid.core.config import from_mapping

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
    dataclass is converted recursively. Unknown keys and wrong types raise
    :class:`~hybrid.core.errors.HybridInputError` (a ``ValueError``) naming the key.

    Example:
        >>> from hybrid.ctr_models.dcn_v2 import DCNv2Config
        >>> config_from_dict(DCNv2Config, {"cross_type": "low_rank", "features": {"embedding_dim": 8}})
        DCNv2Config(...)
    """
    return from_mapping(cls, data, source=cls.__name__)
