"""Patient-clustered bootstrap confidence intervals for token-level AUROC (and Spearman rho).

Tokens of one scan or patient are strongly correlated, so resampling tokens (or running DeLong on tokens)
gives intervals that are far too narrow. Here the unit of resampling is the cluster (patient): each
resample draws clusters with replacement and keeps *all* tokens of every drawn cluster, as many times as
it was drawn. With ``stratify=True`` clusters holding at least one positive token and clusters holding none
are resampled separately, each stratum keeping its size, so every resample has positives. For several
score arms the same draw is used for every arm (paired), so differences between arms get their own,
correctly correlated, interval.

Each resample's AUROC is computed exactly (ties count ½, identical to ``sklearn.metrics.roc_auc_score`` on
the materialised resample) without materialising it: a resample is a vector of cluster counts, and the
AUROC of count-weighted tokens is evaluated for a whole chunk of resamples at once by
:class:`covtoken.eval.rank.WeightedAUROC`. Chunks use about ``rank.DEFAULT_MAX_BYTES`` (128 MiB) of work
space (about 200 MB in all for 1e6 tokens), plus the (n_boot, n_clusters) int32 count matrix.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr

from .rank import WeightedAUROC, WeightedSpearman, as_binary_labels, as_finite_scores

_RNG_BLOCK = 64  # resamples drawn per RNG call; fixed so that results never depend on memory chunking


@dataclass(frozen=True)
class BootstrapAUROC:
    """Result of :func:`clustered_bootstrap_auroc`.

    Attributes:
        auroc: point estimate per arm on the full sample (equals ``roc_auc_score``).
        ci: percentile interval per arm, ``(low, high)``.
        diff: ``auroc[0] - auroc[1]`` when there are exactly two arms, else None.
        diff_ci: percentile interval of the paired difference, or None.
        n_boot: number of resamples.
        ci_level: nominal coverage of the intervals.
        method: description of the resampling scheme.
        n_clusters: number of clusters (patients).
        n_pos: number of positive tokens.
        n_neg: number of negative tokens.
        samples: (n_boot, n_arms) resampled AUROCs.
    """

    auroc: tuple[float, ...]
    ci: tuple[tuple[float, float], ...]
    diff: float | None
    diff_ci: tuple[float, float] | None
    n_boot: int
    ci_level: float
    method: str
    n_clusters: int
    n_pos: int
    n_neg: int
    samples: np.ndarray


@dataclass(frozen=True)
class SpearmanCI:
    """Result of :func:`spearman_with_ci`.

    Attributes:
        rho: ``scipy.stats.spearmanr`` on the full sample.
        p: its two-sided p-value (t approximation; assumes independent observations, ignores clusters).
        ci: percentile bootstrap interval ``(low, high)``, clusters resampled when given.
        n_boot: number of resamples.
        ci_level: nominal coverage.
        method: description of the resampling scheme.
        n_clusters: number of resampling units.
        n_undefined: resamples in which x or y is constant (rho undefined, NaN in ``samples``); they are
            left out of the interval. More than a few percent means too few clusters for this interval.
        samples: (n_boot,) resampled rho values.
    """

    rho: float
    p: float
    ci: tuple[float, float]
    n_boot: int
    ci_level: float
    method: str
    n_clusters: int
    n_undefined: int
    samples: np.ndarray


def _check_options(n_boot: int, ci_level: float, seed: int) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not isinstance(ci_level, (float, int, np.floating)) or not 0.0 < float(ci_level) < 1.0:
        raise ValueError(f"ci_level must lie strictly between 0 and 1, got {ci_level!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def encode_clusters(clusters: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Map arbitrary hashable cluster ids to 0..K-1.

    Args:
        clusters: (n,) cluster (patient) ids of any hashable dtype.
        n: expected length.

    Returns:
        ids: (K,) distinct ids (sorted when sortable, else in order of first appearance);
        idx: (n,) int64 index of each token's cluster in ``ids``.

    Raises:
        ValueError: wrong shape or length, NaN ids, fewer than 2 distinct ids.
    """
    arr = np.asarray(clusters)
    if arr.ndim != 1:
        raise ValueError(f"clusters must be 1-D, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"length mismatch: clusters has {arr.shape[0]} entries, expected {n}")
    if arr.dtype.kind in "fc" and np.isnan(arr).any():
        raise ValueError(f"clusters has {int(np.isnan(arr).sum())} NaN id(s)")
    if n == 0:
        raise ValueError("clusters is empty")
    try:
        ids, idx = np.unique(arr, return_inverse=True)
    except TypeError:  # mixed, unorderable objects: keep order of first appearance
        lookup: dict = {}
        idx = np.fromiter((lookup.setdefault(c, len(lookup)) for c in arr.tolist()), dtype=np.int64, count=n)
        ids = np.empty(len(lookup), dtype=object)
        ids[:] = list(lookup)
    if ids.size < 2:
        raise ValueError(f"a cluster bootstrap needs at least 2 clusters, got {ids.size} ({ids[0]!r})")
    return ids, np.asarray(idx, dtype=np.int64).ravel()


def draw_cluster_counts(strata: Sequence[np.ndarray], n_clusters: int, n_boot: int, seed: int) -> np.ndarray:
    """Draw cluster bootstrap resamples as count vectors.

    Every stratum (an array of cluster indices) is resampled with replacement to its own size. Draws are
    made in fixed blocks of resamples, so the first ``b`` rows do not depend on ``n_boot``.

    Args:
        strata: disjoint (m_s,) int arrays of cluster indices covering the clusters to resample.
        n_clusters: K, total number of clusters.
        n_boot: number of resamples B.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        (B, K) int32 counts; ``counts[b, k]`` = times cluster k was drawn in resample b.
    """
    from ..progress import progress

    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, n_clusters), dtype=np.int32)
    with progress("bootstrap resamples", n_boot) as step:
        for start in range(0, n_boot, _RNG_BLOCK):
            rows = min(_RNG_BLOCK, n_boot - start)
            offset = (np.arange(rows, dtype=np.int64) * n_clusters)[:, None]
            for members in strata:
                draws = rng.integers(0, members.size, size=(_RNG_BLOCK, members.size))[:rows]
                flat = (np.asarray(members, dtype=np.int64)[draws] + offset).ravel()
                counts[start:start + rows] += np.bincount(flat, minlength=rows * n_clusters).reshape(rows, n_clusters)
            step(rows)
    return counts


def _as_arms(scores: np.ndarray | Sequence[np.ndarray], n: int) -> list[np.ndarray]:
    if isinstance(scores, np.ndarray):
        arr = scores
    else:
        items = list(scores)
        if not items:
            raise ValueError("scores is empty: need at least one arm")
        if not all(np.ndim(s) == 0 for s in items):
            return [as_finite_scores(s, n, f"scores[{i}]") for i, s in enumerate(items)]
        arr = np.asarray(items)  # a plain list of numbers is one arm
    if arr.ndim == 1:
        return [as_finite_scores(arr, n, "scores")]
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"scores must be (n,), (n_arms, n) or a sequence of (n,) arrays, got shape {arr.shape}")
    return [as_finite_scores(s, n, f"scores[{i}]") for i, s in enumerate(arr)]


def percentile_ci(samples: np.ndarray, ci_level: float) -> tuple[float, float] | np.ndarray:
    """Percentile interval of bootstrap samples at ``ci_level`` (the one percentile-CI helper of the kit).

    Args:
        samples: ``(B,)`` samples, or ``(B, k)`` for ``k`` statistics at once.
        ci_level: nominal coverage in (0, 1).

    Returns:
        ``(low, high)`` floats for 1-D samples; a ``(2, k)`` array of lower and upper bounds for 2-D samples.
    """
    alpha = 1.0 - ci_level
    bounds = np.quantile(np.asarray(samples), [alpha / 2.0, 1.0 - alpha / 2.0], axis=0)
    return (float(bounds[0]), float(bounds[1])) if bounds.ndim == 1 else bounds


def clustered_bootstrap_auroc(y: np.ndarray, scores: np.ndarray | Sequence[np.ndarray], clusters: np.ndarray, *,
                              n_boot: int = 1000, ci_level: float = 0.95, seed: int = 0,
                              stratify: bool = True) -> BootstrapAUROC:
    """Patient-clustered, class-stratified, paired percentile bootstrap of token-level AUROC.

    Args:
        y: (n,) token labels, 0/1 (positive = 1, higher score = more positive).
        scores: one (n,) score array, an (n_arms, n) array, or a sequence of (n,) arrays (arms).
        clusters: (n,) patient id of each token, any hashable dtype.
        n_boot: number of resamples B.
        ci_level: nominal coverage of the percentile intervals.
        seed: seed of the resampling RNG; the same seed gives the same resamples for every arm.
        stratify: resample clusters with >= 1 positive token separately from the others.

    Returns:
        :class:`BootstrapAUROC`; ``samples`` is (B, n_arms).

    Raises:
        ValueError: invalid labels/scores/clusters/options, or resamples without a positive or a negative
            token (possible with ``stratify=False``, or when no cluster is purely negative).
    """
    _check_options(n_boot, ci_level, seed)
    is_pos = as_binary_labels(y)
    n = is_pos.size
    arms = _as_arms(scores, n)
    ids, idx = encode_clusters(clusters, n)
    k = ids.size
    has_pos = np.bincount(idx[is_pos], minlength=k) > 0
    strata = [np.flatnonzero(has_pos), np.flatnonzero(~has_pos)] if stratify else [np.arange(k)]
    counts = draw_cluster_counts([s for s in strata if s.size], k, int(n_boot), int(seed))

    kernels = [WeightedAUROC(is_pos, s, idx, k) for s in arms]
    full = np.ones((1, k), dtype=np.int32)
    point = tuple(float(kern.auroc(full)[0]) for kern in kernels)
    samples = np.column_stack([kern.auroc(counts) for kern in kernels])
    bad = int(np.isnan(samples[:, 0]).sum())
    if bad:
        raise ValueError(f"{bad} of {n_boot} resamples have no positive or no negative token "
                         f"(stratify={stratify}, {int(has_pos.sum())} of {k} clusters hold positives); "
                         "use stratify=True or more clusters")
    bounds = percentile_ci(samples, float(ci_level))
    ci = tuple((float(bounds[0, a]), float(bounds[1, a])) for a in range(len(arms)))
    diff = diff_ci = None
    if len(arms) == 2:
        diff = point[0] - point[1]
        lo, hi = percentile_ci(samples[:, 0] - samples[:, 1], float(ci_level))
        diff_ci = (float(lo), float(hi))
    method = "patient-clustered " + ("class-stratified " if stratify else "")
    method += ("paired " if len(arms) > 1 else "") + "percentile bootstrap"
    return BootstrapAUROC(auroc=point, ci=ci, diff=diff, diff_ci=diff_ci, n_boot=int(n_boot),
                          ci_level=float(ci_level), method=method, n_clusters=int(k),
                          n_pos=int(is_pos.sum()), n_neg=int(n - is_pos.sum()), samples=samples)


def spearman_with_ci(x: np.ndarray, y: np.ndarray, clusters: np.ndarray | None = None, *, n_boot: int = 2000,
                     ci_level: float = 0.95, seed: int = 0) -> SpearmanCI:
    """Spearman rho with a (cluster) bootstrap percentile interval.

    The point estimate and p-value are ``scipy.stats.spearmanr(x, y)`` (average ranks, t approximation;
    the p-value assumes independent observations). The interval resamples clusters with replacement (or
    single observations when ``clusters`` is None) and recomputes rho exactly on each resample.

    Args:
        x: (n,) finite values.
        y: (n,) finite values.
        clusters: (n,) cluster ids, or None for independent observations.
        n_boot: number of resamples B.
        ci_level: nominal coverage.
        seed: seed of the resampling RNG.

    Returns:
        :class:`SpearmanCI`; ``samples`` is (B,).

    Raises:
        ValueError: invalid inputs, fewer than 3 observations, constant x or y, or x or y constant in every
            resample (a single cluster).
    """
    _check_options(n_boot, ci_level, seed)
    xa = np.asarray(x)
    n = xa.shape[0] if xa.ndim == 1 else -1
    xa, ya = as_finite_scores(xa, n, "x"), as_finite_scores(y, n, "y")
    if n < 3:
        raise ValueError(f"spearman_with_ci needs at least 3 observations, got {n}")
    for name, v in (("x", xa), ("y", ya)):
        if np.all(v == v[0]):
            raise ValueError(f"{name} is constant (all {v[0]!r}); Spearman rho is undefined")
    if clusters is None:
        idx, k = np.arange(n), n
    else:
        ids, idx = encode_clusters(clusters, n)
        k = ids.size
    res = spearmanr(xa, ya)
    counts = draw_cluster_counts([np.arange(k)], k, int(n_boot), int(seed))
    samples = WeightedSpearman(xa, ya, idx, k).rho(counts)
    defined = ~np.isnan(samples)
    if not defined.any():
        raise ValueError(f"x or y is constant in every resample ({k} cluster(s)); need more clusters")
    lo, hi = percentile_ci(samples[defined], float(ci_level))
    method = ("cluster" if clusters is not None else "iid") + " percentile bootstrap"
    return SpearmanCI(rho=float(res.statistic), p=float(res.pvalue), ci=(float(lo), float(hi)),
                      n_boot=int(n_boot), ci_level=float(ci_level), method=method, n_clusters=int(k),
                      n_undefined=int((~defined).sum()), samples=samples)
