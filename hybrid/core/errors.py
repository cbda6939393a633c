"""The one error hierarchy for bad input. The ``hybrid`` CLI maps every one of them, in one place, to one
line on stderr and exit code 2 (``--debug`` shows the traceback).

::

    ValueError
    └── HybridInputError          a missing file / column / key, a wrong type, a NaN label, unknown ids
        ├── ConfigError           a config key or value refused (names the key, with a suggestion)
        ├── CheckpointError       a checkpoint missing, incomplete, or not matching the model / data
        ├── TransferError         a transfer that cannot be done as asked (names tables and shapes)
        ├── DependencyError       torch / fbgemm-gpu / torchrec missing or mismatched (says what to install)
        ├── TrackingError         the MLflow tracking store unreachable or not writable (names the URI)
        └── CollectiveTimeout     a distributed collective failed or timed out (a rank died or hangs)

    KeyboardInterrupt
    └── TrainingInterrupted       SIGTERM / SIGINT stopped a training run at a step boundary (exit 128 + signal)

They live here, below every other package, so the config loader, the checkpoint I/O, the model configs and
the adapters raise them without importing the jobs. All are ``ValueError``s, so code that catches
``ValueError`` (e.g. around a config's ``from_dict``) also catches them.

Example:
    >>> issubclass(TransferError, HybridInputError), issubclass(CheckpointError, ValueError)
    (True, True)
"""


class HybridInputError(ValueError):
    """Bad user input: a missing file, column or key, a wrong type, a NaN label, a mismatched checkpoint.

    The message names the file / row / column / key and what was expected.
    """


class ConfigError(HybridInputError):
    """A config key or value refused: the message names the key (full dotted path) and what was expected."""


class CheckpointError(HybridInputError):
    """A checkpoint that is missing, incomplete, or does not match the model or data it is loaded into."""


class TransferError(HybridInputError):
    """A transfer that cannot be done as asked: the message names the table/module and both shapes."""


class DependencyError(HybridInputError):
    """A required package (torch, fbgemm-gpu, torchrec) is missing or mismatched; the message says what to
    install."""


class TrackingError(HybridInputError):
    """The MLflow tracking store cannot be used: a server that does not answer, a SQLite file (or its
    directory) that is not writable. Checked before a stage does any work; the message names the URI."""


class CollectiveTimeout(HybridInputError):
    """A collective of a distributed run failed or waited past ``train.collective_timeout_s``: another rank died
    or hangs. The message names this rank and the timeout."""


class TrainingInterrupted(KeyboardInterrupt):
    """A training run stopped by SIGTERM / SIGINT at a step boundary, after writing a complete checkpoint.

    Args:
        signum: the signal received.
        step: the step the run stopped at.
        checkpoint: the checkpoint written there (``None`` when the run writes none).
        advice: how to go on from it (said after the checkpoint).

    The CLI prints ``str(err)`` as one line and exits with :attr:`exit_code` (``128 + signum``: 130 for
    SIGINT, 143 for SIGTERM); the MLflow run is marked ``KILLED``.
    """

    def __init__(self, signum: int, step: int, checkpoint: object | None = None,
                 advice: str = "continue with --resume") -> None:
        import signal

        self.signum, self.step, self.checkpoint = int(signum), int(step), checkpoint
        name = signal.Signals(self.signum).name
        where = f"; checkpoint {checkpoint} written" + (f" ({advice})" if advice else "") if checkpoint else ""
        super().__init__(f"interrupted by {name} at step {self.step}{where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


__all__ = ["HybridInputError", "ConfigError", "CheckpointError", "TransferError", "DependencyError",
           "TrackingError", "CollectiveTimeout", "TrainingInterrupted"]
