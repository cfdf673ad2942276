"""Small numeric summaries shared by the arch/ gates: cluster-resampled ratios, Monte Carlo means, record metrics.

Nothing here draws resamples or opens labels: the caller passes a ``(B, K)`` matrix of cluster counts (one row
per bootstrap resample, one column per patient; ``covtoken.eval.bootstrap.draw_cluster_counts`` makes one), so
every interval computed from the same matrix is paired over the same resamples.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from scipy.stats import norm

__all__ = ["clustered_ratio", "mc_mean_ci", "metric", "CLUSTER_METHOD"]

CLUSTER_METHOD = "patient-clustered percentile bootstrap (ratio of sums over resampled patients)"


def _check_counts(counts: np.ndarray, k: int) -> np.ndarray:
    c = np.asarray(counts)
    if c.ndim != 2 or c.shape[1] != k or c.shape[0] < 1:
        raise ValueError(f"counts must be (B, {k}) cluster counts, got shape {c.shape}")
    return c.astype(np.float64, copy=False)


def clustered_ratio(num: np.ndarray, den: np.ndarray, counts: np.ndarray, *,
                    ci_level: float) -> tuple[float, tuple[float, float], np.ndarray]:
    """Ratio of sums ``sum_k num_k / sum_k den_k`` with a cluster-bootstrap percentile interval.

    Args:
        num: ``(K,)`` per-cluster numerators (e.g. small lesions routed in patient k).
        den: ``(K,)`` per-cluster denominators (e.g. small lesions of patient k), non-negative, positive sum.
        counts: ``(B, K)`` times each cluster is drawn in each resample.
        ci_level: nominal coverage of the percentile interval.

    Returns:
        ``(point, (low, high), samples)`` with ``samples`` of shape ``(B',)``: the resampled ratios, leaving out
        resamples whose denominator is zero (B' <= B).

    Raises:
        ValueError: mismatched shapes, a zero total denominator, or every resample with a zero denominator.
    """
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1:
        raise ValueError(f"num and den must be equal-length 1-D arrays, got {num.shape} and {den.shape}")
    if not 0.0 < ci_level < 1.0:
        raise ValueError(f"ci_level must lie in (0, 1), got {ci_level}")
    if (den < 0).any() or den.sum() <= 0:
        raise ValueError(f"denominators must be non-negative with a positive sum, got sum {den.sum()}")
    c = _check_counts(counts, num.size)
    top, bottom = c @ num, c @ den
    ok = bottom > 0
    if not ok.any():
        raise ValueError("every resample has a zero denominator; too few clusters hold the event")
    samples = top[ok] / bottom[ok]
    a = (1.0 - ci_level) / 2.0
    lo, hi = np.quantile(samples, [a, 1.0 - a])
    return float(num.sum() / den.sum()), (float(lo), float(hi)), samples


def mc_mean_ci(values: np.ndarray, *, ci_level: float) -> tuple[float, tuple[float, float]]:
    """Mean of iid Monte Carlo replicates with a normal interval ``mean +- z * sd / sqrt(R)``.

    Args:
        values: ``(R,)`` replicate values (R >= 2), e.g. test coverage of R random calibration/test splits.
        ci_level: nominal coverage.

    Returns:
        ``(mean, (low, high))``.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size < 2 or not np.isfinite(v).all():
        raise ValueError(f"values must be a finite 1-D array with at least 2 entries, got shape {v.shape}")
    z = float(norm.ppf(0.5 + ci_level / 2.0))
    half = z * v.std(ddof=1) / np.sqrt(v.size)
    m = float(v.mean())
    return m, (m - half, m + half)


def metric(value: float | None, *, ci: tuple[float, float] | None = None, ci_level: float | None = None,
           ci_method: str | None = None, n: Mapping[str, int], unit: str, description: str) -> dict[str, Any]:
    """One record metric (``{value, ci, ci_level, ci_method, n, unit, description}``), plain Python floats."""
    if (ci is None) != (ci_method is None):
        raise ValueError(f"metric {description!r}: a CI needs its method and a method needs a CI")
    out: dict[str, Any] = {"value": None if value is None else float(value),
                           "ci": None if ci is None else [float(ci[0]), float(ci[1])],
                           "ci_method": ci_method, "n": {k: int(v) for k, v in n.items()}, "unit": unit,
                           "description": description}
    if ci is not None:
        out["ci_level"] = float(ci_level if ci_level is not None else 0.95)
    return out
