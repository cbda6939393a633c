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


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_share_each_one_process_batch_with_the_same_mix_of_lengths(world):
    """Step k on W ranks is step k of a 1-process run of ``W x`` the batch, dealt round-robin over its sorted
    samples: no rank gets the short sequences while another gets the long ones (the step waits for the slowest)."""
    lengths = np.random.default_rng(7).integers(1, 200, 3000)
    one = list(BucketBatchSampler(lengths, 64 * world, seed=5))
    ranks = [list(BucketBatchSampler(lengths, 64, seed=5, num_replicas=world, rank=r)) for r in range(world)]
    for step, batch in enumerate(one):
        parts = [r[step] for r in ranks]
        assert sorted(np.concatenate(parts).tolist()) == sorted(batch)
        longest = [int(lengths[p].max()) for p in parts]
        tokens = [int(lengths[p].sum()) for p in parts]
        assert max(longest) - min(longest) <= 0.05 * max(longest) + 1
        assert max(tokens) <= 1.05 * min(tokens)
    # the old split (whole per-rank batches, every W-th to a rank) was far from this
    old = [BucketBatchSampler(lengths, 64, seed=5).global_batches()[r::world] for r in range(world)]
    gap = max(abs(int(lengths[a].sum()) - int(lengths[b].sum())) / int(lengths[a].sum())
              for a, b in zip(old[0], old[1]))
    assert gap > 0.2


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank must be in"):
        BucketBatchSampler(np.ones(10), 2, num_replicas=2, rank=2)


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
