"""The one exception type for bad input. The ``hybrid`` CLI prints its message on one line and exits with code 2.

It lives here, below every other package, so the config loader (:mod:`hybrid_base.config`) and the model
configs can raise it; ``hybrid.errors`` re-exports the same class.
"""


class HybridInputError(ValueError):
    """Bad user input: a missing file, column or key, a wrong type, a NaN label, a mismatched checkpoint.

    The message names the file / row / column / key and what was expected. A ``ValueError``, so code that
    catches ``ValueError`` from a config's ``from_dict`` also catches it.
    """
