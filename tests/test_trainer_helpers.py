"""Pieces both trainers share: the train-loss / throughput window, dense-gradient averaging across ranks."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from hybrid_base.progress import ThroughputWindow
from hybrid_base.training import average_dense_gradients, unwrap_dmp


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
