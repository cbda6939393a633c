"""The same config runs the same number of optimizer steps on 1 and on N ranks (issue 17.7: 174 against 180).

A global step is one per-rank batch (``train.batch_size // N``) on each rank. The rank split used to drop
the last ``count % N`` batches of an epoch; :class:`~hybrid.data.batching.BucketBatchSampler` now re-splits
their samples into N batches, so an epoch is ``ceil(samples / train.batch_size)`` steps whatever N, and
every sample is still seen once.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hybrid.data.batching import BucketBatchSampler

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("samples", [1, 3, 999, 1000, 1001, 15_104])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_rank_runs_the_one_process_step_count_and_each_sample_is_seen_once(samples, world):
    lengths = np.random.default_rng(samples).integers(1, 50, samples)
    batch = 64 * world   # train.batch_size, divisible by the world size
    for drop_last, expected in ((False, math.ceil(samples / batch)), (True, samples // batch)):
        one = list(BucketBatchSampler(lengths, batch, seed=3, drop_last=drop_last))
        ranks = [list(BucketBatchSampler(lengths, batch // world, seed=3, drop_last=drop_last, num_replicas=world,
                                         rank=r)) for r in range(world)]
        assert len(one) == expected and [len(r) for r in ranks] == [expected] * world
        if not drop_last:
            seen = np.concatenate([b for r in ranks for b in r])
            assert set(seen) == set(range(samples))
            if samples >= world * batch:   # no tail smaller than the world: nothing is repeated
                assert len(seen) == samples


def _events(path: Path) -> Path:
    rng = np.random.default_rng(1)
    rows = [(f"u{u}", str(item), int(rng.integers(1, 6)), 880_000_000 + u * 1000 + k * 3600)
            for u in range(1, 81) for k, item in enumerate(rng.choice(200, size=16, replace=False))]
    pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"]).to_csv(path, index=False)
    return path


@pytest.mark.slow
@pytest.mark.distributed
def test_finetune_runs_the_same_steps_on_one_and_two_processes(tmp_path):
    from torchrun_support import run_torchrun

    from hybrid.cli import main
    from hybrid.data.store import open_prepared

    prepared = tmp_path / "prepared"
    off = ["--set", "tracking.enabled=false"]
    assert main(["data", "prepare", "--dataset", "events", "--path", str(_events(tmp_path / "events.csv")),
                 "--protocol", "ratings", "--out", str(prepared), *off]) == 0
    n = len(open_prepared(prepared).ctr_train)
    # a batch size whose per-rank batch count is odd: the old rank split dropped one batch per epoch
    batch = next(b for b in range(32, 4096, 2) if math.ceil(n / (b // 2)) % 2 == 1 and math.ceil(n / b) >= 3)
    epochs = 2
    args = ["finetune", "--config", str(REPO / "configs/finetune_tiny.yaml"), "--set", f"data={prepared}",
            "--set", f"train.batch_size={batch}", "--set", f"train.epochs={epochs}", "--set", "train.eval_every=0",
            "--set", "train.log_every=1", *off]

    one = tmp_path / "one"
    assert main([*args, "--set", f"out={one}"]) == 0
    two = tmp_path / "two"
    done = run_torchrun(["-m", "hybrid", *args, "--set", f"out={two}"], timeout=600, cwd=REPO,
                        reset=lambda: shutil.rmtree(two, ignore_errors=True))
    assert done.returncode == 0, done.stderr[-6000:]
    steps = [json.loads((out / "result.json").read_text())["steps"] for out in (one, two)]
    assert steps == [epochs * math.ceil(n / batch)] * 2, (n, batch, steps)
