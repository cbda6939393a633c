"""Throughput and running train losses between two log points, and the metrics callback: trainer pieces.

A trainer adds every step's losses and how much real work the step did (samples for a CTR ranker, non-padding
events for the generative model); at a log step :meth:`ThroughputWindow.flush` returns the mean losses
(``train/<name>``) and the work per second of all ranks together (``perf/<unit>_per_s``). Time spent in
evaluation or checkpointing is excluded with :meth:`ThroughputWindow.paused`. Metrics leave a trainer
through a plain :data:`MetricsCallback` ``log_metrics(metrics, step, epoch)``, called on rank 0 only.

Example:
    >>> window = ThroughputWindow(unit="samples")
    >>> for step in range(1, 5):
    ...     window.add({"loss": torch.tensor(0.5 * step)}, count=256)   # one train step's losses, batch size
    ...     with window.paused():
    ...         pass                                                    # evaluation: not training time
    >>> metrics = window.flush()
    >>> metrics["train/loss"], sorted(metrics)
    (1.25, ['perf/samples_per_s', 'train/loss'])
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping

import torch

#: ``log_metrics(metrics, step, fractional epoch)``: how the trainers hand their metrics out (rank 0 only).
MetricsCallback = Callable[[dict[str, float], int, float], None]


def rank0_callback(log_metrics: MetricsCallback | None, rank: int) -> MetricsCallback:
    """``log_metrics`` on rank 0; on other ranks (or without a callback), one that does nothing."""
    if log_metrics is not None and rank == 0:
        return log_metrics
    return lambda metrics, step, epoch: None


class ThroughputWindow:
    """Running sums of train losses and work done since the last :meth:`flush`.

    Args:
        unit: what ``count`` in :meth:`add` counts; names the metric ``perf/<unit>_per_s``.
        clock: seconds source (``time.perf_counter``; replaceable in tests).
    """

    def __init__(self, unit: str = "samples", clock=time.perf_counter) -> None:
        self.unit = unit
        self._clock = clock
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.count = 0
        self.seconds = 0.0
        self.started = clock()

    def add(self, losses: Mapping[str, torch.Tensor | float], count: int) -> None:
        """Record one step: its losses (scalars; tensors are detached) and its amount of work."""
        for name, value in losses.items():
            v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
            self.sums[name] = self.sums.get(name, 0.0) + v
        self.steps += 1
        self.count += int(count)

    def seconds_per_step(self) -> float:
        """Mean training time of the window's steps so far (paused time excluded; call before :meth:`flush`)."""
        return (self.seconds + self._clock() - self.started) / max(1, self.steps)

    def restart_clock(self) -> None:
        self.started = self._clock()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation, checkpoints) is not training time."""
        self.seconds += self._clock() - self.started
        try:
            yield
        finally:
            self.restart_clock()

    def flush(self, world_size: int = 1) -> dict[str, float]:
        """Mean losses over the window's steps (averaged over ranks) and the work/s of all ranks together.

        Args:
            world_size: ranks to all-reduce over (every rank must call ``flush`` at the same step when > 1).

        Returns:
            ``{"train/<name>": mean, ..., "perf/<unit>_per_s": rate}``; the window is then reset.
        """
        self.seconds += self._clock() - self.started
        names = sorted(self.sums)
        totals = torch.tensor([self.sums[n] for n in names] + [float(self.count)], dtype=torch.float64)
        if world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(totals)  # losses summed over ranks, work of all ranks
            totals[:-1] /= world_size
        out = {f"train/{n}": float(totals[i]) / max(1, self.steps) for i, n in enumerate(names)}
        out[f"perf/{self.unit}_per_s"] = float(totals[-1]) / max(self.seconds, 1e-9)
        self.sums, self.steps, self.count, self.seconds = {}, 0, 0, 0.0
        self.restart_clock()
        return out


#: ``hybrid --quiet``: no progress from any training loop (bars or per-log-step lines); results still print
_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Switch every :class:`Progress` made from now on off (``True``) or back to its own setting."""
    global _QUIET
    _QUIET = bool(quiet)


class Progress:
    """A training loop's progress: a tqdm bar on a terminal, one plain line per log step otherwise.

    A redirected log (CI, ``nohup``, a file) gets no carriage-return frames: tqdm is off when stderr is not
    a TTY (its ``disable=None``), and :meth:`log` prints ``<desc> step 52/465 (epoch 0.22): loss 0.6214 ...``.

    Args:
        desc: ``"pretrain"`` / ``"finetune"``.
        total: steps of the run; ``initial``: steps already done (a resumed run).
        enabled: show progress at all (rank 0 and ``train.progress``; off under :func:`set_quiet`).

    Example:
        >>> progress = Progress("demo", total=10, enabled=False)
        >>> progress.update(); progress.log(1, 0.1, {"loss": "0.69"}); progress.close()
    """

    def __init__(self, desc: str, total: int, enabled: bool, initial: int = 0) -> None:
        from tqdm.auto import tqdm

        enabled = enabled and not _QUIET
        self.desc, self.total, self.enabled = desc, total, enabled
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                        disable=None if enabled else True)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def log(self, step: int, epoch: float, values: Mapping[str, str]) -> None:
        """The figures of a log step: the bar's postfix on a terminal, else one line on stdout."""
        if not self.enabled:
            return
        if self.bar.disable:
            text = ", ".join(f"{k} {v}" for k, v in values.items())
            print(f"{self.desc} step {step}/{self.total} (epoch {epoch:.2f}): {text}", flush=True)
        else:
            self.bar.set_postfix(values)

    def close(self) -> None:
        self.bar.close()
