"""Configs: dataclasses loaded from YAML, with ``--set a.b=value`` overrides and strict keys.

The loader lives in :mod:`hybrid_base.config` (the model configs of ``pretrain`` and ``ctr_models`` use it
too); the jobs import it from here. Errors are :class:`hybrid.errors.HybridInputError` (the same class as
``hybrid_base.errors.HybridInputError``) naming the key.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Train:
    ...     lr: float = 1e-3
    ...     epochs: int = 3
    >>> load_config(Train, overrides=["epochs=5"])
    Train(lr=0.001, epochs=5)
    >>> load_config(Train, overrides=["epoch=5"])
    Traceback (most recent call last):
    hybrid_base.errors.HybridInputError: --set: unknown key 'epoch' (did you mean 'epochs'?)
"""
from hybrid_base.config import flatten, from_mapping, load_config, to_dict, to_yaml

__all__ = ["load_config", "from_mapping", "to_dict", "to_yaml", "flatten"]
