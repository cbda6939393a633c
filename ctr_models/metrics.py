"""Evaluation metrics: AUC, logloss, gAUC (scikit-learn semantics) and the one-epoch-drop detector.

All functions take array-likes (numpy, lists, or CPU tensors) and return Python floats; undefined values
(AUC of a single-class set, gAUC with no user having both labels) are ``nan``, never an exception, so one
odd evaluation slice does not kill a training run.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss, roc_auc_score


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x).reshape(-1)


def sigmoid(logits) -> np.ndarray:
    """Numerically stable logistic function on an array of logits."""
    z = _np(logits).astype(np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def auc(labels, scores) -> float:
    """ROC AUC (``sklearn.metrics.roc_auc_score``); ``nan`` when ``labels`` has a single class.

    Example:
        >>> auc([0, 1, 1], [0.1, 0.8, 0.4])
        1.0
    """
    y, s = _np(labels), _np(scores)
    if y.size == 0 or np.unique(y).size < 2:
        return float("nan")
    return float(roc_auc_score(y, s))


def logloss(labels, probs, eps: float = 1e-7) -> float:
    """Binary cross-entropy of probabilities (``sklearn.metrics.log_loss``), clipped to ``[eps, 1 − eps]``.

    Pass probabilities, not logits (use :func:`sigmoid`). ``nan`` on empty input.

    Example:
        >>> round(logloss([0, 1], [0.5, 0.5]), 4)
        0.6931
    """
    y, p = _np(labels).astype(np.float64), _np(probs).astype(np.float64)
    if y.size == 0:
        return float("nan")
    return float(log_loss(y, np.clip(p, eps, 1 - eps), labels=[0, 1]))


def gauc(labels, scores, groups) -> float:
    """Group AUC: per-user AUC weighted by the user's number of impressions.

    ``gAUC = Σ_u n_u · AUC_u / Σ_u n_u`` over the users ``u`` that have both a positive and a negative
    (others have no AUC and are left out of numerator and denominator). ``AUC_u`` equals scikit-learn's
    ``roc_auc_score`` on that user's rows (ties count 1/2); it is computed for all users at once with the
    rank-sum (Mann–Whitney) form ``(Σ ranks of positives − n⁺(n⁺+1)/2) / (n⁺ n⁻)`` on average ranks within
    each user (pandas groupby), instead of a Python loop over users.

    Args:
        labels: ``[N]`` 0/1.
        scores: ``[N]`` scores (logits or probabilities; only the order matters).
        groups: ``[N]`` raw-user ids (``CTRBatch.user_index``: never the encoded id, which maps every
            unknown user to the one OOV id).

    Returns:
        gAUC, or ``nan`` when no user has both labels.

    Example:
        >>> gauc([1, 0, 1, 0, 1], [0.9, 0.1, 0.2, 0.8, 0.5], [7, 7, 8, 8, 9])   # users 7 (AUC 1), 8 (AUC 0)
        0.5
    """
    y, s, g = _np(labels).astype(np.float64), _np(scores).astype(np.float64), _np(groups)
    if not (y.size == s.size == g.size):
        raise ValueError(f"gauc: labels, scores and groups must have the same length, got "
                         f"{y.size}, {s.size}, {g.size}")
    if y.size == 0:
        return float("nan")
    df = pd.DataFrame({"g": g, "y": (y > 0.5).astype(np.int64), "s": s})
    df["r"] = df.groupby("g")["s"].rank(method="average")
    df["rpos"] = df["r"] * df["y"]
    per = df.groupby("g").agg(n=("y", "size"), npos=("y", "sum"), rpos=("rpos", "sum"))
    per = per[(per["npos"] > 0) & (per["npos"] < per["n"])]
    if per.empty:
        return float("nan")
    nneg = per["n"] - per["npos"]
    user_auc = (per["rpos"] - per["npos"] * (per["npos"] + 1) / 2) / (per["npos"] * nneg)
    return float((user_auc * per["n"]).sum() / per["n"].sum())


def ctr_metrics(labels, logits, user_index, task_names: Sequence[str]) -> dict[str, float]:
    """AUC, logloss and gAUC of every task: ``{"<task>/auc": …, "<task>/logloss": …, "<task>/gauc": …}``.

    Args:
        labels: ``[N, T]`` 0/1 (rows with a NaN label for a task are left out of that task).
        logits: ``[N, T]`` model outputs (logits, as returned by the rankers).
        user_index: ``[N]`` user ids.
        task_names: the ``T`` column names.
    """
    y = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels, dtype=np.float64)
    z = np.asarray(logits.detach().cpu() if hasattr(logits, "detach") else logits, dtype=np.float64)
    u = _np(user_index)
    y, z = y.reshape(len(u), -1), z.reshape(len(u), -1)
    if y.shape[1] != len(task_names) or z.shape[1] != len(task_names):
        raise ValueError(f"ctr_metrics: expected {len(task_names)} task columns {list(task_names)}, got "
                         f"labels {y.shape[1]} and logits {z.shape[1]}")
    out: dict[str, float] = {}
    for t, name in enumerate(task_names):
        keep = ~np.isnan(y[:, t])
        yt, zt, ut = y[keep, t], z[keep, t], u[keep]
        out[f"{name}/auc"] = auc(yt, zt)
        out[f"{name}/logloss"] = logloss(yt, sigmoid(zt))
        out[f"{name}/gauc"] = gauc(yt, zt, ut)
    return out


def auc_standard_error(auc_value: float, positives: int, negatives: int) -> float:
    """Standard error of an AUC measured on ``positives`` + ``negatives`` samples (Hanley & McNeil, 1982).

    ``SE² = (A(1−A) + (n⁺−1)(Q1 − A²) + (n⁻−1)(Q2 − A²)) / (n⁺ n⁻)`` with ``Q1 = A / (2 − A)`` and
    ``Q2 = 2A² / (1 + A)``. It is how far an AUC moves from evaluation noise alone, so it sizes the
    one-epoch detector's tolerance: 0.02 on a few hundred samples, 0.002 on 10⁵. ``nan`` when undefined.

    Example:
        >>> round(auc_standard_error(0.75, 244, 244), 4), round(auc_standard_error(0.75, 50_000, 50_000), 4)
        (0.022, 0.0015)
    """
    a, n1, n2 = float(auc_value), int(positives), int(negatives)
    if math.isnan(a) or n1 < 1 or n2 < 1:
        return float("nan")
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n2 - 1) * (q2 - a * a)) / (n1 * n2)
    return math.sqrt(max(var, 0.0))


@dataclass(frozen=True)
class OneEpochDrop:
    """Result of :func:`one_epoch_drop`.

    Args:
        flagged: the run shows the one-epoch drop.
        boundary_epoch, boundary_auc: the reference evaluation (the last one at or before the boundary).
        min_auc_after: lowest AUC evaluated after the boundary (``nan`` if none).
        drop: ``boundary_auc − min_auc_after`` (``nan`` if undefined).
        tolerance: the dip that had to be exceeded to flag (fixed, or from the evaluation set's noise).
    """

    flagged: bool
    boundary_epoch: float
    boundary_auc: float
    min_auc_after: float
    drop: float
    tolerance: float = 1e-3


def one_epoch_drop(curve: Sequence[tuple[float, float]], tolerance: float = 1e-3,
                   boundary: float = 1.0) -> OneEpochDrop:
    """Detect the one-epoch phenomenon in an eval curve (details in :func:`detect_one_epoch_drop`)."""
    points = sorted((float(e), float(a)) for e, a in curve if not math.isnan(float(a)))
    before = [(e, a) for e, a in points if e <= boundary + 1e-9]
    after = [a for e, a in points if e > boundary + 1e-9]
    if not before:
        return OneEpochDrop(False, float("nan"), float("nan"), min(after) if after else float("nan"),
                            float("nan"), tolerance)
    b_epoch, b_auc = before[-1]
    if not after:
        return OneEpochDrop(False, b_epoch, b_auc, float("nan"), float("nan"), tolerance)
    lowest = min(after)
    drop = b_auc - lowest
    return OneEpochDrop(drop > tolerance, b_epoch, b_auc, lowest, drop, tolerance)


def detect_one_epoch_drop(curve: Sequence[tuple[float, float]], tolerance: float = 1e-3,
                          boundary: float = 1.0) -> bool:
    """True when eval AUC falls after the first epoch boundary (the one-epoch phenomenon).

    Exact rule: sort the ``(fractional_epoch, auc)`` points by epoch (NaN AUCs are ignored). The reference
    is the **last point with epoch ≤ boundary** (``boundary = 1.0``: the evaluation at, or closest before,
    the end of the first epoch). The run is flagged iff some point with epoch **> boundary** has
    ``auc < reference − tolerance`` (strictly more than ``tolerance`` below). Without a point on each side of
    the boundary nothing is flagged. ``tolerance`` absorbs evaluation noise: the trainer sets it to the
    AUC's standard error on the evaluation set (:func:`auc_standard_error`) unless a fixed one is configured.

    Args:
        curve: ``[(fractional_epoch, auc), ...]`` in any order, e.g. ``[(0.5, 0.71), (1.0, 0.74), (1.5, 0.72)]``.
        tolerance: allowed dip below the reference, in AUC units.
        boundary: the epoch boundary to test (1.0 = end of the first epoch).

    Example:
        >>> detect_one_epoch_drop([(0.5, 0.70), (1.0, 0.74), (1.25, 0.72), (2.0, 0.71)])
        True
        >>> detect_one_epoch_drop([(0.5, 0.70), (1.0, 0.74), (1.5, 0.745), (2.0, 0.75)])
        False
    """
    return one_epoch_drop(curve, tolerance, boundary).flagged
