"""Pieces both trainers share: the train-loss / throughput window, dense-gradient averaging across ranks,
unwrapping DMP, the evaluation rounds of each rank."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from hybrid.core.progress import ThroughputWindow, rank0_callback
from hybrid.core.training import (
    DistributedContext,
    average_dense_gradients,
    eval_rounds,
    unwrap_dmp,
)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_means_and_rate_exclude_paused_time_and_reset():
    clock = FakeClock()
    window = ThroughputWindow(unit="samples", clock=clock)
    window.add({"loss": torch.tensor(1.0), "bce/click": 0.5}, 100)
    clock.now = 1.0
    with window.paused():          # evaluation: 10 s that are not training time
        clock.now = 11.0
    window.add({"loss": torch.tensor(3.0), "bce/click": 1.5}, 300)
    clock.now = 12.0
    out = window.flush()
    assert out == {"train/loss": 2.0, "train/bce/click": 1.0, "perf/samples_per_s": pytest.approx(400 / 2.0)}
    window.add({"loss": 4.0}, 10)
    clock.now = 13.0
    assert window.flush() == {"train/loss": 4.0, "perf/samples_per_s": 10.0}


def test_seconds_per_step_counts_unpaused_time_of_the_open_window():
    clock = FakeClock()
    window = ThroughputWindow(unit="events", clock=clock)
    window.add({"loss": 1.0}, 10)
    window.add({"loss": 1.0}, 10)
    clock.now = 2.0
    with window.paused():
        clock.now = 50.0
    clock.now = 51.0
    assert window.seconds_per_step() == pytest.approx(3.0 / 2)
    window.flush()
    assert window.seconds_per_step() == 0.0  # a fresh window: no steps, no time


def test_unit_names_the_rate_metric():
    window = ThroughputWindow(unit="events")
    window.add({}, 5)
    assert set(window.flush()) == {"perf/events_per_s"}


def test_average_dense_gradients_divides_the_rank_sum_and_fills_missing_grads(tmp_path):
    """One real gloo rank: the all-reduce sums this rank's gradients only, so world_size=2 halves them; a
    parameter without a gradient sends (and gets) zeros, so every rank sends the same buffer."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2, 2))
        a.grad = torch.tensor([2.0, 4.0])
        average_dense_gradients([a, b], world_size=2)
        assert torch.equal(a.grad, torch.tensor([1.0, 2.0])) and torch.equal(b.grad, torch.zeros(2, 2))
    finally:
        dist.destroy_process_group()
    module = nn.Linear(2, 2)
    assert unwrap_dmp(module) is module


def test_unwrap_dmp_checks_the_expected_type():
    module = nn.Linear(2, 2)
    assert unwrap_dmp(module, nn.Linear) is module
    with pytest.raises(TypeError, match="expected a Conv1d .or DMP wrapping one., got Linear"):
        unwrap_dmp(module, nn.Conv1d)


@pytest.mark.parametrize("n,world_size", [(0, 2), (1, 2), (3, 2), (4, 2), (5, 3), (2, 4)])
def test_eval_rounds_stride_over_ranks_and_fill_to_the_same_count(n, world_size):
    batches = [f"b{i}" for i in range(n)]
    rounds = [list(eval_rounds(iter(batches), DistributedContext(rank=r, world_size=world_size)))
              for r in range(world_size)]
    assert len({len(r) for r in rounds}) == 1  # every rank makes the same number of (collective) calls
    kept = sorted((i, b) for r in rounds for i, b, keep in r if keep)
    assert kept == list(enumerate(batches))    # each batch scored once, by rank index % W
    for rank, r in enumerate(rounds):
        assert all(i % world_size == rank for i, _, keep in r if keep)
        assert all((i, b) == (0, "b0") for i, b, keep in r if not keep)  # fillers repeat the first batch


def test_rank0_callback_logs_on_rank_zero_only():
    seen = []
    rank0_callback(lambda m, step, epoch: seen.append((m, step, epoch)), 0)({"a": 1.0}, 3, 0.5)
    rank0_callback(lambda m, step, epoch: seen.append((m, step, epoch)), 1)({"a": 2.0}, 3, 0.5)
    rank0_callback(None, 0)({"a": 3.0}, 3, 0.5)
    assert seen == [({"a": 1.0}, 3, 0.5)]
