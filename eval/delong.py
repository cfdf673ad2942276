"""Fast DeLong variance and paired test for AUROC (DeLong et al. 1988; Sun & Xu, IEEE SPL 21(11), 2014).

With m positives and n negatives, per classifier: T_z mid-ranks over all samples, T_x within positives,
T_y within negatives (mid-ranks identical to ``scipy.stats.rankdata(method="average")``, so ties count ½;
computed by :func:`covtoken.eval.rank.class_midranks` from one sort per classifier):

    AUC = sum_pos T_z / (m n) - (m + 1) / (2 n)
    V10_i = (T_z,i - T_x,i) / n        (positives)
    V01_j = 1 - (T_z,j - T_y,j) / m    (negatives)
    S = Cov(V10) / m + Cov(V01) / n    (k x k over classifiers, ddof = 1)

and the paired test is z = (A_1 - A_2) / sqrt(S_11 + S_22 - 2 S_12) with a two-sided normal p-value.
Cost O(N log N) for N = m + n (one sort per classifier). Matches pROC's DeLong values on its aSAH data.

**DeLong assumes independent observations.** Use it at the unit level only (one score per image or
patient). Tokens from one scan or patient are strongly correlated, and token-level DeLong on 1e5-1e6
tokens returns absurdly small variances and p-values; for token-level AUROC use
:func:`covtoken.eval.bootstrap.clustered_bootstrap_auroc` (patient-clustered paired bootstrap).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from .rank import as_binary_labels, as_finite_scores, class_midranks


@dataclass(frozen=True)
class DeLongResult:
    """DeLong estimate for one AUROC.

    Attributes:
        auroc: empirical AUROC (ties ½).
        variance: DeLong variance of the AUROC.
        ci: normal interval ``auroc -/+ z * sqrt(variance)``, clipped to [0, 1] (as pROC does).
        ci_level: nominal coverage of ``ci``.
        n_pos: number of positives m.
        n_neg: number of negatives n.
    """

    auroc: float
    variance: float
    ci: tuple[float, float]
    ci_level: float
    n_pos: int
    n_neg: int


@dataclass(frozen=True)
class DeLongPaired:
    """DeLong test for two correlated AUROCs measured on the same samples.

    Attributes:
        auroc_a: AUROC of ``score_a``.
        auroc_b: AUROC of ``score_b``.
        var_a: DeLong variance of ``auroc_a``.
        var_b: DeLong variance of ``auroc_b``.
        cov: DeLong covariance of the two AUROCs.
        z: ``diff / sqrt(var_a + var_b - 2 cov)``; 0 when the difference and its variance are both 0.
        p: two-sided normal p-value of ``z``.
        diff: ``auroc_a - auroc_b``.
        diff_ci: normal interval of ``diff`` at ``ci_level``.
        ci_level: nominal coverage of ``diff_ci``.
        n_pos: number of positives m.
        n_neg: number of negatives n.
    """

    auroc_a: float
    auroc_b: float
    var_a: float
    var_b: float
    cov: float
    z: float
    p: float
    diff: float
    diff_ci: tuple[float, float]
    ci_level: float
    n_pos: int
    n_neg: int


def _check_ci_level(ci_level: float) -> float:
    if not isinstance(ci_level, (float, int, np.floating)) or not 0.0 < float(ci_level) < 1.0:
        raise ValueError(f"ci_level must lie strictly between 0 and 1, got {ci_level!r}")
    return float(ci_level)


def delong_components(is_pos: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs and their DeLong covariance matrix for k classifiers on the same samples.

    Args:
        is_pos: (N,) bool labels with at least 2 positives and 2 negatives.
        scores: (k, N) finite float scores, higher = more positive.

    Returns:
        auc: (k,) AUROCs;
        cov: (k, k) DeLong covariance matrix S.
    """
    m = int(is_pos.sum())
    n = is_pos.size - m
    v10 = np.empty((scores.shape[0], m))
    v01 = np.empty((scores.shape[0], n))
    auc = np.empty(scores.shape[0])
    pos, neg = np.flatnonzero(is_pos), np.flatnonzero(~is_pos)
    for r, score in enumerate(scores):
        t_z, t_x, t_y = class_midranks(score, is_pos)
        tz_pos = t_z.take(pos)
        auc[r] = tz_pos.sum() / (m * n) - (m + 1) / (2.0 * n)
        v10[r] = (tz_pos - t_x) / n
        v01[r] = 1.0 - (t_z.take(neg) - t_y) / m
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return auc, cov


def _validate(y: np.ndarray, scores: list[tuple[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    is_pos = as_binary_labels(y)
    m = int(is_pos.sum())
    if m < 2 or is_pos.size - m < 2:
        raise ValueError(f"DeLong needs >= 2 positives and >= 2 negatives, got {m} and {is_pos.size - m}")
    return is_pos, np.stack([as_finite_scores(s, is_pos.size, name) for name, s in scores])


def delong_auroc(y: np.ndarray, score: np.ndarray, *, ci_level: float = 0.95) -> DeLongResult:
    """AUROC with its DeLong variance and normal confidence interval.

    Assumes independent observations (unit level only; for token-level AUROC use the patient-clustered
    bootstrap in :mod:`covtoken.eval.bootstrap`).

    Args:
        y: (N,) labels, 0/1; positive = 1.
        score: (N,) finite scores, higher = more positive.
        ci_level: nominal coverage of the interval.

    Returns:
        :class:`DeLongResult`.

    Raises:
        ValueError: non-binary labels, fewer than 2 positives or negatives, length mismatch, NaN/Inf scores,
            ci_level outside (0, 1).
    """
    level = _check_ci_level(ci_level)
    is_pos, scores = _validate(y, [("score", score)])
    auc, cov = delong_components(is_pos, scores)
    var = float(cov[0, 0])
    half = float(norm.ppf(0.5 + level / 2.0) * np.sqrt(var))
    ci = (max(0.0, float(auc[0]) - half), min(1.0, float(auc[0]) + half))
    return DeLongResult(auroc=float(auc[0]), variance=var, ci=ci, ci_level=level,
                        n_pos=int(is_pos.sum()), n_neg=int((~is_pos).sum()))


def delong_paired(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray,
                  ci_level: float = 0.95) -> DeLongPaired:
    """DeLong test of AUROC(score_a) - AUROC(score_b) for two classifiers on the same samples.

    Assumes independent observations (unit level only; for token-level AUROC use the patient-clustered
    paired bootstrap in :mod:`covtoken.eval.bootstrap`). Identical predictors (or any two with the same
    placement values) give z = 0, p = 1 and a zero-width interval, without dividing by zero.

    Args:
        y: (N,) labels, 0/1; positive = 1.
        score_a: (N,) finite scores of the first classifier.
        score_b: (N,) finite scores of the second classifier.
        ci_level: nominal coverage of the interval of the difference.

    Returns:
        :class:`DeLongPaired`; ``p`` is two-sided, from the standard normal.

    Raises:
        ValueError: as :func:`delong_auroc`.
    """
    level = _check_ci_level(ci_level)
    is_pos, scores = _validate(y, [("score_a", score_a), ("score_b", score_b)])
    auc, cov = delong_components(is_pos, scores)
    diff = float(auc[0] - auc[1])
    var_diff = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    scale = float(cov[0, 0] + cov[1, 1])
    if var_diff <= 1e-14 * scale:  # the placement values coincide (up to rounding): no evidence of a difference
        var_diff = max(var_diff, 0.0)
        if abs(diff) <= 1e-12:
            z, p = 0.0, 1.0
        else:
            z, p = float(np.copysign(np.inf, diff)), 0.0
    else:
        z = diff / float(np.sqrt(var_diff))
        p = float(2.0 * norm.sf(abs(z)))
    half = float(norm.ppf(0.5 + level / 2.0) * np.sqrt(var_diff))
    return DeLongPaired(auroc_a=float(auc[0]), auroc_b=float(auc[1]), var_a=float(cov[0, 0]),
                        var_b=float(cov[1, 1]), cov=float(cov[0, 1]), z=float(z), p=p, diff=diff,
                        diff_ci=(diff - half, diff + half), ci_level=level,
                        n_pos=int(is_pos.sum()), n_neg=int((~is_pos).sum()))
