"""Directional change-detection metrics, their lesion-clustered bootstrap, and seed-sweep intervals.

Convention (stated once, used everywhere): a *changing* pair is the positive class (label 1) and a higher
score means "more likely changing". AUROC is ``P(score_changing > score_stable) + P(tie) / 2`` and is never
sign-flipped: a value below 0.5 means the score is *inverted* (stable pairs look more changed than
changing ones) and is reported as such, because no oracle exists to flip it in deployment.

Every metric is computed on weighted samples: a bootstrap resample that draws lesion cluster ``k``
``c_k`` times is the same as giving each pair of that cluster weight ``c_k``, so whole batches of resamples
are evaluated from one sort (``weights`` is (B, n)).

* AUPRC: average precision ``sum_k (R_k - R_{k-1}) P_k`` over the distinct score thresholds (as
  ``sklearn.metrics.average_precision_score``).
* EER: the point where the piecewise-linear ROC curve crosses FPR = FNR; always a finite number in [0, 1]
  (it is 1.0 for a perfectly inverted score). Its threshold is an observed score, never +/-inf.
* FPR at TPR = t: the smallest FPR among thresholds reaching TPR >= t (no interpolation).
* :func:`t_interval`: mean, sd and the t-based CI of a mean over a few seeds,
  ``mean +/- t_{1-a/2, n-1} * sd / sqrt(n)`` (with 5 seeds t = 2.776, not 1.96).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import stats

from .bootstrap import draw_cluster_counts, encode_clusters
from .rank import as_binary_labels

__all__ = ["auroc_w", "auprc_w", "eer_w", "fpr_at_tpr_w", "eer_threshold", "METRICS", "metric_names",
           "lesion_bootstrap", "TInterval", "t_interval", "bootstrap_counts"]


def _curve(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative weighted TP and FP at each distinct threshold (descending), with the (0, 0) start.

    Args:
        y: (n,) bool, True = changing.
        s: (n,) finite scores.
        w: (B, n) non-negative weights.

    Returns:
        ``tp, fp`` (B, m + 1) and the (m,) thresholds (distinct scores, descending).
    """
    order = np.argsort(-s, kind="mergesort")
    ss, ys, ws = s[order], y[order], w[:, order]
    last = np.r_[np.flatnonzero(np.diff(ss) != 0), ss.size - 1]   # end of each tie group
    tp = np.cumsum(ws * ys, axis=1)[:, last]
    fp = np.cumsum(ws * ~ys, axis=1)[:, last]
    zero = np.zeros((w.shape[0], 1))
    return np.hstack([zero, tp]), np.hstack([zero, fp]), ss[last]


def _rates(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """TPR, FPR (B, m + 1), precision (B, m + 1) and thresholds (m,); NaN rates when a class has no weight."""
    tp, fp, thr = _curve(y, s, w)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr, fpr = tp / tp[:, -1:], fp / fp[:, -1:]
        precision = np.where(tp + fp > 0, tp / np.where(tp + fp > 0, tp + fp, 1.0), 1.0)
    return tpr, fpr, precision, thr


def _undefined(tpr: np.ndarray, fpr: np.ndarray) -> np.ndarray:
    return np.isnan(tpr[:, -1]) | np.isnan(fpr[:, -1])


def auroc_w(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC (trapezoid on the ROC = Mann-Whitney with ties 1/2). Returns (B,); NaN without both classes."""
    tpr, fpr, _, _ = _rates(y, s, w)
    return np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2.0, axis=1)


def auprc_w(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average precision (step-wise, sklearn's definition). Returns (B,); NaN without both classes."""
    tpr, fpr, precision, _ = _rates(y, s, w)
    ap = np.sum(np.diff(tpr, axis=1) * precision[:, 1:], axis=1)
    return np.where(_undefined(tpr, fpr), np.nan, ap)


def _eer_index(tpr: np.ndarray, fpr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gap = fpr - (1.0 - tpr)                    # -1 at (0, 0), +1 at (1, 1), non-decreasing along the curve
    k = np.maximum(np.argmax(gap >= 0, axis=1), 1)   # first vertex at or past the crossing
    rows = np.arange(gap.shape[0])
    g0, g1 = gap[rows, k - 1], gap[rows, k]
    t = np.clip(-g0 / np.where(g1 > g0, g1 - g0, 1.0), 0.0, 1.0)   # g0 < 0 <= g1 on defined rows
    eer = fpr[rows, k - 1] + t * (fpr[rows, k] - fpr[rows, k - 1])
    return np.where(_undefined(tpr, fpr), np.nan, eer), k


def eer_w(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Equal error rate, interpolated on the ROC polyline; finite in [0, 1]. Returns (B,)."""
    tpr, fpr, _, _ = _rates(y, s, w)
    return _eer_index(tpr, fpr)[0]


def eer_threshold(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """``(eer, threshold)`` on the full sample; pairs with score >= threshold are called changing.

    The threshold is the observed score at the ROC vertex that ends the crossing segment: always finite.
    """
    lab = as_binary_labels(y)
    sc = np.asarray(s, dtype=np.float64)
    tpr, fpr, _, thr = _rates(lab, sc, np.ones((1, sc.size)))
    eer, k = _eer_index(tpr, fpr)
    return float(eer[0]), float(thr[int(k[0]) - 1])


def fpr_at_tpr_w(y: np.ndarray, s: np.ndarray, w: np.ndarray, target: float = 0.8) -> np.ndarray:
    """Smallest FPR over thresholds with TPR >= ``target``. Returns (B,); NaN without both classes."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target TPR must lie in (0, 1], got {target!r}")
    tpr, fpr, _, _ = _rates(y, s, w)
    best = np.min(np.where(tpr >= target - 1e-12, fpr, np.inf), axis=1)
    return np.where(_undefined(tpr, fpr), np.nan, best)


#: Metric name -> batched function ``f(y bool (n,), s (n,), w (B, n)) -> (B,)``.
METRICS: Mapping[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    "auroc": auroc_w,
    "auprc": auprc_w,
    "eer": eer_w,
    "fpr_at_tpr80": lambda y, s, w: fpr_at_tpr_w(y, s, w, 0.8),
}


def metric_names() -> list[str]:
    return list(METRICS)


def bootstrap_counts(y: np.ndarray, clusters: np.ndarray, *, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Cluster-bootstrap draws, stratified by whether a cluster holds a changing pair.

    The same strata, order and RNG as :func:`covtoken.eval.bootstrap.clustered_bootstrap_auroc`, so the same
    seed gives the same resamples there and here.

    Returns:
        ``(counts (B, K) int32, idx (n,) cluster index per pair)``.
    """
    is_pos = as_binary_labels(y)
    _, idx = encode_clusters(clusters, is_pos.size)
    k = int(idx.max()) + 1
    has_pos = np.bincount(idx[is_pos], minlength=k) > 0
    strata = [s for s in (np.flatnonzero(has_pos), np.flatnonzero(~has_pos)) if s.size]
    return draw_cluster_counts(strata, k, int(n_boot), int(seed)), idx


def lesion_bootstrap(y: np.ndarray, arms: Mapping[str, np.ndarray], clusters: np.ndarray, *,
                     metrics: Sequence[str], n_boot: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Point values and bootstrap samples of several metrics for several score arms, one set of draws.

    Args:
        y: (n,) 0/1 pair labels (1 = changing).
        arms: arm name -> (n,) scores.
        clusters: (n,) lesion-cluster id per pair (the resampling unit).
        metrics: names from :data:`METRICS`.
        n_boot: resamples B.
        seed: RNG seed.

    Returns:
        ``{arm: {metric: array}}`` where ``array[0]`` is the full-sample value and ``array[1:]`` the (B,)
        resampled values (paired across arms and metrics).
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {metric_names()}")
    lab = as_binary_labels(y)
    counts, idx = bootstrap_counts(lab, clusters, n_boot=n_boot, seed=seed)
    w = np.vstack([np.ones((1, lab.size)), counts[:, idx].astype(np.float64)])
    out: dict[str, dict[str, np.ndarray]] = {}
    for arm, s in arms.items():
        sc = np.asarray(s, dtype=np.float64)
        if sc.shape != lab.shape or not np.isfinite(sc).all():
            raise ValueError(f"arm {arm!r}: scores must be finite with shape {lab.shape}, got {sc.shape}")
        out[arm] = {m: METRICS[m](lab, sc, w) for m in metrics}
    bad = max((int(np.isnan(v).sum()) for per in out.values() for v in per.values()), default=0)
    if bad:
        raise ValueError(f"{bad} resamples lack a changing or a stable pair; need more lesion clusters")
    return out


@dataclass(frozen=True)
class TInterval:
    """Mean of a few repeated values (e.g. seeds) with a t-based CI of the mean.

    Attributes:
        mean, sd: sample mean and standard deviation (ddof = 1).
        n: number of values.
        level: nominal coverage.
        t_crit: ``t_{(1+level)/2, n-1}``.
        ci: ``mean -/+ t_crit * sd / sqrt(n)``.
    """

    mean: float
    sd: float
    n: int
    level: float
    t_crit: float
    ci: tuple[float, float]


def t_interval(values: Sequence[float] | None = None, *, level: float = 0.95, mean: float | None = None,
               sd: float | None = None, n: int | None = None) -> TInterval:
    """t-based CI of a mean, from the values or from a reported ``mean``, ``sd`` (ddof = 1) and ``n``.

    Raises:
        ValueError: fewer than 2 values, non-finite values, or a level outside (0, 1).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level!r}")
    if values is not None:
        v = np.asarray(values, dtype=np.float64)
        if v.ndim != 1 or v.size < 2 or not np.isfinite(v).all():
            raise ValueError(f"need at least 2 finite values for a t interval, got {v.tolist()}")
        mean, sd, n = float(v.mean()), float(v.std(ddof=1)), int(v.size)
    elif mean is None or sd is None or n is None or n < 2 or sd < 0:
        raise ValueError(f"give values, or mean, sd >= 0 and n >= 2 (got mean={mean}, sd={sd}, n={n})")
    t_crit = float(stats.t.ppf(0.5 + level / 2.0, int(n) - 1))
    half = t_crit * float(sd) / np.sqrt(int(n))
    return TInterval(float(mean), float(sd), int(n), float(level), t_crit, (float(mean - half), float(mean + half)))
