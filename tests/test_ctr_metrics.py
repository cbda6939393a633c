"""Metrics: AUC / logloss / gAUC against scikit-learn, and the one-epoch-drop detector."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from hybrid.ctr_models.metrics import (
    auc,
    ctr_metrics,
    detect_one_epoch_drop,
    gauc,
    logloss,
    one_epoch_drop,
    sigmoid,
)


def _gauc_loop(labels, scores, users):
    """Direct definition: per-user sklearn AUC weighted by impressions, users with both labels only."""
    num = den = 0.0
    for u in np.unique(users):
        sel = users == u
        y = labels[sel]
        if y.min() == y.max():
            continue
        num += sel.sum() * roc_auc_score(y, scores[sel])
        den += sel.sum()
    return num / den


def test_auc_and_logloss_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = rng.normal(size=500) + y
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s))
    p = sigmoid(s)
    assert logloss(y, p) == pytest.approx(log_loss(y, p))
    assert auc(torch.tensor(y), torch.tensor(s)) == pytest.approx(roc_auc_score(y, s))
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert sigmoid(np.array([-1000.0, 0.0, 1000.0])).tolist() == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gauc_matches_per_user_loop(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    users = rng.integers(0, 150, n)
    labels = (rng.random(n) < rng.random(150)[users]).astype(int)   # some users all-0 / all-1
    scores = np.round(rng.normal(size=n) + 0.7 * labels, 1)           # rounding makes ties
    assert gauc(labels, scores, users) == pytest.approx(_gauc_loop(labels, scores, users), abs=1e-12)


def test_gauc_hand_case_and_edge_cases():
    # user 7: AUC 1 (2 impressions), user 8: AUC 0 (2), user 9: single label (left out)
    assert gauc([1, 0, 1, 0, 1], [0.9, 0.1, 0.2, 0.8, 0.5], [7, 7, 8, 8, 9]) == pytest.approx(0.5)
    # weighting by impressions: user 1 has AUC 1 on 3 rows, user 2 AUC 0 on 2 rows -> 3/5
    assert gauc([1, 0, 0, 1, 0], [0.9, 0.1, 0.2, 0.1, 0.5], [1, 1, 1, 2, 2]) == pytest.approx(0.6)
    # ties inside a user count one half
    assert gauc([1, 0], [0.5, 0.5], [3, 3]) == pytest.approx(0.5)
    assert math.isnan(gauc([1, 1, 0], [0.1, 0.2, 0.3], [1, 1, 2]))
    with pytest.raises(ValueError, match="same length"):
        gauc([1, 0], [0.1], [1, 1])


def test_ctr_metrics_per_task():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (400, 2)).astype(float)
    z = rng.normal(size=(400, 2)) + y
    u = rng.integers(0, 20, 400)
    out = ctr_metrics(torch.tensor(y), torch.tensor(z), torch.tensor(u), ("click", "rating5"))
    assert set(out) == {f"{t}/{m}" for t in ("click", "rating5") for m in ("auc", "logloss", "gauc")}
    assert out["rating5/auc"] == pytest.approx(roc_auc_score(y[:, 1], z[:, 1]))
    assert out["click/logloss"] == pytest.approx(log_loss(y[:, 0], sigmoid(z[:, 0])))
    assert out["click/gauc"] == pytest.approx(_gauc_loop(y[:, 0], z[:, 0], u))
    with pytest.raises(ValueError, match="task columns"):
        ctr_metrics(y, z, u, ("click",))


# --------------------------------------------------------------------------- one-epoch detector


def test_one_epoch_drop_flags_a_drop_after_the_boundary():
    curve = [(0.25, 0.70), (0.5, 0.72), (0.75, 0.735), (1.0, 0.74), (1.25, 0.725), (1.5, 0.72), (2.0, 0.715)]
    assert detect_one_epoch_drop(curve) is True
    info = one_epoch_drop(curve)
    assert info.boundary_epoch == 1.0 and info.boundary_auc == 0.74
    assert info.min_auc_after == 0.715 and info.drop == pytest.approx(0.025)
    # order of the points does not matter
    assert detect_one_epoch_drop(list(reversed(curve))) is True


def test_one_epoch_drop_steady_rise_and_noise_within_tolerance_are_not_flagged():
    rise = [(e / 4, 0.70 + 0.01 * e) for e in range(1, 13)]
    assert detect_one_epoch_drop(rise) is False
    rng = np.random.default_rng(0)
    plateau = [(e / 4, 0.74 + float(rng.uniform(-0.0009, 0.0009))) for e in range(4, 13)]
    curve = [(0.25, 0.70), (0.5, 0.72), (0.75, 0.73)] + plateau
    ref = dict(curve)[1.0]
    assert min(a for e, a in curve if e > 1.0) < ref                     # it does dip, but within 1e-3
    assert detect_one_epoch_drop(curve, tolerance=2e-3) is False
    assert detect_one_epoch_drop(curve, tolerance=0.0) is True            # same curve, zero tolerance


def test_one_epoch_drop_reference_and_missing_sides():
    # no point exactly at 1.0: the reference is the last evaluation before the boundary (0.9)
    curve = [(0.3, 0.70), (0.9, 0.75), (1.2, 0.74)]
    info = one_epoch_drop(curve, tolerance=0.005)
    assert info.boundary_epoch == 0.9 and info.flagged is True
    assert detect_one_epoch_drop([(0.5, 0.7), (1.0, 0.74)]) is False      # nothing after the boundary
    assert detect_one_epoch_drop([(1.5, 0.7), (2.0, 0.6)]) is False       # nothing before it
    assert detect_one_epoch_drop([]) is False
    assert detect_one_epoch_drop([(1.0, 0.74), (1.5, float("nan")), (2.0, 0.745)]) is False
    assert detect_one_epoch_drop([(1.0, 0.74), (2.0, 0.75), (2.5, 0.70)], boundary=2.0) is True


def test_auc_standard_error_matches_the_spread_of_repeated_evaluations():
    """Hanley & McNeil's SE against the observed std of the AUC over 300 independent evaluation sets of the
    same size drawn from one score distribution (binormal, true AUC ≈ 0.76)."""
    from hybrid.ctr_models.metrics import auc_standard_error

    rng = np.random.default_rng(0)
    n_pos = n_neg = 250
    aucs = []
    for _ in range(300):
        pos, neg = rng.normal(1.0, 1.0, n_pos), rng.normal(0.0, 1.0, n_neg)
        aucs.append(auc(np.r_[np.ones(n_pos), np.zeros(n_neg)], np.r_[pos, neg]))
    observed = float(np.std(aucs, ddof=1))
    assert auc_standard_error(float(np.mean(aucs)), n_pos, n_neg) == pytest.approx(observed, rel=0.15)
    # it shrinks as 1/sqrt(n), and is undefined without both classes
    assert auc_standard_error(0.76, 25_000, 25_000) == pytest.approx(
        auc_standard_error(0.76, 250, 250) / 10, rel=0.02)
    assert math.isnan(auc_standard_error(0.76, 0, 100)) and math.isnan(auc_standard_error(float("nan"), 5, 5))
