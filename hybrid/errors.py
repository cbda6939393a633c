"""The one exception type for bad input. The CLI prints its message on one line and exits with code 2."""


class HybridInputError(ValueError):
    """Bad user input: a missing file, column or key, a wrong type, a NaN label, a mismatched checkpoint.

    The message names the file / row / column / key and what was expected.
    """
