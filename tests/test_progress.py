"""hybrid_base.progress: the train-loss / throughput window both trainers log from."""
import pytest
import torch

from hybrid_base.progress import ThroughputWindow


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
