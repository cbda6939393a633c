"""Configs: dataclasses loaded from YAML, with ``--set a.b=value`` overrides and strict keys.

The loader lives in :mod:`hybrid.core.config` (the model configs of ``pretrain`` and ``ctr_models`` use it
too); the jobs import it from here. Errors are :class:`hybrid.core.errors.HybridInputError` (the same class as
``hybrid.core.errors.HybridInputError``) naming the key.

See :mod:`hybrid.core.config` for the rules and an example.
"""
from hybrid.core.config import flatten, from_mapping, load_config, to_dict, to_yaml

__all__ = ["load_config", "from_mapping", "to_dict", "to_yaml", "flatten"]
