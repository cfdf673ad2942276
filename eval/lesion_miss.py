"""Lesion retention under token pruning: which lesions a keep set misses, and patient-clustered CIs of miss rates.

A lesion (a connected mask component, from :func:`covtoken.eval.labels.lesion_components`) *touches* every
token holding any of its pixels. It is **missed** by a keep set when none of the tokens it touches is kept,
and **retained** otherwise. With per-image token ranks (0 = kept first), a lesion is missed at keep count
``k`` exactly when the best rank among its tokens is ``>= k``, so one pass gives the outcome at every keep rate.

The miss rate of an arm is the pooled ratio ``missed lesions / lesions``. Its interval comes from a
patient-clustered percentile bootstrap: patients holding at least one lesion of the set are resampled with
replacement (patients without one contribute to neither sum), and every arm is evaluated on the same
resamples, so differences between arms are paired. Resamples are count vectors
(:func:`covtoken.eval.bootstrap.draw_cluster_counts`), so a resample of every arm is two matrix products.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy.special import gammaln

from .bootstrap import draw_cluster_counts, encode_clusters
from .bootstrap import percentile_ci

__all__ = ["LesionSet", "best_rank", "retained_by", "random_miss_probability", "RateBootstrap",
           "clustered_rate_bootstrap", "rate_metric", "diff_metric", "select_lowest_miss",
           "clustered_median_bootstrap"]


@dataclass(frozen=True)
class LesionSet:
    """Lesions of a set of images, one entry per lesion.

    Attributes:
        image: ``(G,)`` row of each lesion's image in the score arrays.
        patient: ``(G,)`` patient id of each lesion.
        area: ``(G,)`` lesion area in tokens.
        tokens: ``G`` int arrays of the flat token indices each lesion touches.
    """

    image: np.ndarray
    patient: np.ndarray
    area: np.ndarray
    tokens: tuple[np.ndarray, ...]

    @classmethod
    def from_components(cls, components: Sequence[Sequence[dict]], patients: Sequence[str]) -> "LesionSet":
        """Flatten :func:`~covtoken.eval.labels.lesion_components` output (per image) with each image's patient."""
        if len(components) != len(patients):
            raise ValueError(f"{len(components)} images of components but {len(patients)} patient ids")
        image, patient, area, tokens = [], [], [], []
        for row, (comps, pid) in enumerate(zip(components, patients)):
            for c in comps:
                if len(c["tokens"]) == 0:
                    raise ValueError(f"image row {row}: a lesion touches no token")
                image.append(row)
                patient.append(pid)
                area.append(float(c["area_tokens"]))
                tokens.append(np.asarray(c["tokens"], dtype=np.int64))
        return cls(np.asarray(image, dtype=np.int64), np.asarray(patient, dtype=object),
                   np.asarray(area, dtype=np.float64), tuple(tokens))

    def __len__(self) -> int:
        return int(self.image.size)

    def select(self, which: np.ndarray) -> "LesionSet":
        """The lesions where the boolean ``which`` (``(G,)``) is True."""
        which = np.asarray(which, dtype=bool)
        if which.shape != self.image.shape:
            raise ValueError(f"selection has shape {which.shape}, expected {self.image.shape}")
        return LesionSet(self.image[which], self.patient[which], self.area[which],
                         tuple(t for t, w in zip(self.tokens, which) if w))

    @property
    def n_touched(self) -> np.ndarray:
        """``(G,)`` number of tokens each lesion touches."""
        return np.array([t.size for t in self.tokens], dtype=np.int64)


def _flat(lesions: LesionSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(lesions) == 0:
        raise ValueError("no lesions in the set")
    sizes = lesions.n_touched
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return np.repeat(lesions.image, sizes), np.concatenate(lesions.tokens), starts


def best_rank(ranks: np.ndarray, lesions: LesionSet) -> np.ndarray:
    """Best (lowest) rank among the tokens each lesion touches.

    Args:
        ranks: ``(B, N)`` per-image token ranks (:func:`covtoken.gate.keep.token_ranks`).
        lesions: lesions whose ``image`` rows index ``ranks``.

    Returns:
        ``(G,)`` int64; the lesion is missed at keep count ``k`` iff this is ``>= k``.
    """
    rows, toks, starts = _flat(lesions)
    return np.minimum.reduceat(np.asarray(ranks)[rows, toks], starts)


def retained_by(keep: np.ndarray, lesions: LesionSet) -> np.ndarray:
    """``(G,)`` bool: at least one token the lesion touches is in the ``(B, N)`` boolean keep set."""
    rows, toks, starts = _flat(lesions)
    return np.maximum.reduceat(np.asarray(keep, dtype=bool)[rows, toks].astype(np.int8), starts).astype(bool)


def random_miss_probability(n_tokens: int, touched: np.ndarray, k: np.ndarray | int) -> np.ndarray:
    """Probability that ``k`` tokens kept uniformly at random miss all ``t`` touched tokens: ``C(N-t, k) / C(N, k)``.

    Args:
        n_tokens: ``N`` tokens per image.
        touched: ``(G,)`` tokens touched by each lesion (``1 <= t <= N``).
        k: keep count, scalar or ``(G,)``.

    Returns:
        ``(G,)`` probabilities (exactly 0 when ``k > N - t``).
    """
    t = np.asarray(touched, dtype=np.float64)
    kk = np.broadcast_to(np.asarray(k, dtype=np.float64), t.shape)
    if (t < 1).any() or (t > n_tokens).any() or (kk < 0).any() or (kk > n_tokens).any():
        raise ValueError(f"need 1 <= touched <= N and 0 <= k <= N (N = {n_tokens})")
    free = n_tokens - t
    ok = kk <= free
    logp = np.where(ok, gammaln(free + 1) - gammaln(np.where(ok, free - kk, 0) + 1)
                    - gammaln(n_tokens + 1) + gammaln(n_tokens - kk + 1), -np.inf)
    return np.exp(logp)


@dataclass(frozen=True)
class RateBootstrap:
    """Pooled lesion rates of several arms with paired patient-clustered bootstrap samples.

    Attributes:
        value: ``(A,)`` pooled rates ``sum(events) / lesions`` on the full sample.
        samples: ``(n_boot, A)`` resampled rates (same resamples for every arm).
        ci_level: nominal coverage.
        n: sample sizes for the record (patients, images, lesions, resamples).
        method: how the intervals were made.
    """

    value: np.ndarray
    samples: np.ndarray
    ci_level: float
    n: dict
    method: str

    def ci(self, arm: int) -> tuple[float, float]:
        return percentile_ci(self.samples[:, arm], self.ci_level)

    def diff(self, i: int, j: int) -> tuple[float, tuple[float, float]]:
        """Point estimate and percentile CI of ``rate_i - rate_j`` (paired)."""
        return float(self.value[i] - self.value[j]), percentile_ci(self.samples[:, i] - self.samples[:, j],
                                                                   self.ci_level)


def clustered_rate_bootstrap(events: np.ndarray, lesions: LesionSet, *, n_boot: int, ci_level: float,
                             seed: int) -> RateBootstrap:
    """Pooled per-lesion rates of ``A`` arms with a paired, patient-clustered percentile bootstrap.

    Args:
        events: ``(A, G)`` per-lesion outcomes in [0, 1] (1 = missed, or a miss probability; or 1 = retained).
        lesions: the ``G`` lesions (their patients are the clusters).
        n_boot: resamples.
        ci_level: nominal coverage of the percentile intervals.
        seed: resampling seed.

    Returns:
        :class:`RateBootstrap`.

    Raises:
        ValueError: shape mismatch, values outside [0, 1], or fewer than two patients with lesions.
    """
    ev = np.atleast_2d(np.asarray(events, dtype=np.float64))
    g = len(lesions)
    if ev.shape[1] != g:
        raise ValueError(f"events has {ev.shape[1]} lesions per arm, the lesion set has {g}")
    if not ((ev >= 0) & (ev <= 1)).all():
        raise ValueError("events must lie in [0, 1]")
    ids, idx = encode_clusters(lesions.patient, g)
    k = ids.size
    per_cluster = np.stack([np.bincount(idx, weights=e, minlength=k) for e in ev])  # (A, K)
    sizes = np.bincount(idx, minlength=k).astype(np.float64)  # (K,)
    counts = draw_cluster_counts([np.arange(k)], k, int(n_boot), int(seed)).astype(np.float64)  # (B, K)
    samples = (counts @ per_cluster.T) / (counts @ sizes)[:, None]
    n = {"patients": int(k), "images": int(np.unique(lesions.image).size), "lesions": int(g),
         "resamples": int(n_boot)}
    method = ("patient-clustered percentile bootstrap of the pooled per-lesion rate (ratio estimator; patients "
              "with >= 1 lesion of the set resampled; paired: the same resamples for every arm)")
    return RateBootstrap(ev.sum(1) / g, samples, float(ci_level), n, method)


def rate_metric(rb: RateBootstrap, arm: int, *, unit: str, description: str) -> dict:
    """The record metric of arm ``arm`` of ``rb`` (value, percentile CI, method, sample sizes)."""
    return {"value": float(rb.value[arm]), "ci": list(rb.ci(arm)), "ci_level": rb.ci_level, "ci_method": rb.method,
            "n": dict(rb.n), "unit": unit, "description": description}


def diff_metric(rb: RateBootstrap, i: int, j: int, *, unit: str, description: str) -> dict:
    """The record metric of the paired difference ``arm i - arm j`` of ``rb``."""
    value, ci = rb.diff(i, j)
    return {"value": value, "ci": list(ci), "ci_level": rb.ci_level, "ci_method": rb.method + " (paired difference)",
            "n": dict(rb.n), "unit": unit, "description": description}


def select_lowest_miss(best_ranks: Mapping[str, np.ndarray], k: int) -> tuple[str, dict[str, float]]:
    """Arm whose lesions are missed least often at keep count ``k`` (ties -> lower block, then name).

    Args:
        best_ranks: arm ``"<name>@<block>"`` -> ``(G,)`` best ranks of the same lesions (validation).
        k: keep count.

    Returns:
        ``(arm, {arm: miss rate})``.
    """
    miss = {a: float(np.mean(np.asarray(r) >= k)) for a, r in best_ranks.items()}
    if not miss:
        raise ValueError("no arms to select from")
    return min(miss, key=lambda a: (miss[a], int(a.rpartition("@")[2]), a)), miss


def clustered_median_bootstrap(values: np.ndarray, clusters: np.ndarray, *, n_boot: int, ci_level: float,
                               seed: int) -> tuple[float, tuple[float, float], dict]:
    """Median of per-image values with a patient-clustered percentile bootstrap.

    Each resample draws patients with replacement; an image counts as often as its patient was drawn, and the
    resample's median is the lower weighted median of the image values.

    Args:
        values: ``(n,)`` finite per-image values.
        clusters: ``(n,)`` patient id of each image.
        n_boot: resamples.
        ci_level: nominal coverage.
        seed: resampling seed.

    Returns:
        ``(median, (low, high), n)`` with ``n`` = {patients, images, resamples}.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0 or not np.isfinite(v).all():
        raise ValueError(f"values must be a non-empty finite 1-D array, got shape {v.shape}")
    ids, idx = encode_clusters(clusters, v.size)
    order = np.argsort(v, kind="stable")
    counts = draw_cluster_counts([np.arange(ids.size)], ids.size, int(n_boot), int(seed)).astype(np.float64)
    cum = np.cumsum(counts[:, idx[order]], axis=1)  # (B, n) weights in value order
    pos = (cum >= cum[:, -1:] / 2.0).argmax(axis=1)
    samples = v[order][pos]
    n = {"patients": int(ids.size), "images": int(v.size), "resamples": int(n_boot)}
    return float(np.median(v)), percentile_ci(samples, float(ci_level)), n
