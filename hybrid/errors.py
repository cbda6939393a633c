"""The one exception type for bad input (defined in :mod:`hybrid_base.errors`; this is the same class).

The CLI prints its message on one line and exits with code 2.
"""
from hybrid_base.errors import HybridInputError

__all__ = ["HybridInputError"]
