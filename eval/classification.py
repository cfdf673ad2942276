"""Classification metrics with patients as clusters (G9): pure functions, no I/O.

Every interval is a patient-clustered percentile bootstrap: patients are resampled with replacement
(:func:`covtoken.eval.bootstrap.draw_cluster_counts`) and each image is weighted by how often its patient was drawn,
so images of one patient never count as independent evidence. Paired comparisons (configured model vs baseline,
reduced vs full questionnaire, TTA vs single view) use the same resamples for both arms.

Diagnoses are opened here only (:func:`open_class_labels`), per role: a job asks for the labels of one split at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..data.layout import EvalMasks, unseal_labels
from .bootstrap import _check_options, draw_cluster_counts, encode_clusters

__all__ = ["open_class_labels", "topk_hits", "ClusteredCI", "clustered_mean", "clustered_paired_difference",
           "per_class_recall", "confusion", "expected_calibration_error", "ece_with_ci", "risk_coverage", "aurc",
           "aurc_with_ci", "conformal_coverage_band", "softmax"]


def open_class_labels(masks: EvalMasks, image_ids: Sequence[str], *, key: str, classes: Sequence[str],
                      other: str) -> np.ndarray:
    """Class indices of ``image_ids``: the label ``key`` sealed with each mask, mapped onto ``classes``; any label
    not listed becomes ``other`` (the last class). Returns ``(n,)`` int64."""
    names = list(classes)
    if other not in names:
        raise ValueError(f"the 'other' class {other!r} must be among the classes {names}")
    out = np.empty(len(image_ids), dtype=np.int64)
    for i, iid in enumerate(image_ids):
        labels = unseal_labels(masks[iid])
        if key not in labels:
            raise ValueError(f"image {iid!r}: no label {key!r} (has {sorted(labels)})")
        v = str(labels[key])
        out[i] = names.index(v) if v in names else names.index(other)
    return out


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def topk_hits(probs: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """``(n,)`` float 0/1: the true class is among the ``k`` highest scores (ties broken by class index)."""
    p = np.asarray(probs)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"probs must be (n, C) with n = len(y) = {len(y)}, got {p.shape}")
    if not 1 <= k <= p.shape[1]:
        raise ValueError(f"k must lie in [1, {p.shape[1]}], got {k}")
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return (order == np.asarray(y)[:, None]).any(axis=1).astype(np.float64)


@dataclass(frozen=True)
class ClusteredCI:
    value: float
    ci: tuple[float, float]
    samples: np.ndarray           # (B,)
    n_images: int
    n_patients: int
    n_boot: int
    ci_level: float

    def metric(self, *, unit: str, description: str) -> dict:
        """The record's metric entry."""
        return {"value": float(self.value), "ci": [float(self.ci[0]), float(self.ci[1])], "ci_level": self.ci_level,
                "ci_method": "patient-clustered percentile bootstrap",
                "n": {"images": self.n_images, "patients": self.n_patients, "resamples": self.n_boot},
                "unit": unit, "description": description}


def _weights(clusters: np.ndarray, n: int, n_boot: int, seed: int) -> tuple[np.ndarray, int]:
    """(B, n) image weights (times the image's patient was drawn) and the number of patients."""
    ids, idx = encode_clusters(clusters, n)
    counts = draw_cluster_counts([np.arange(ids.size)], ids.size, n_boot, seed)
    return counts[:, idx].astype(np.float64), int(ids.size)


def _ci(samples: np.ndarray, ci_level: float) -> tuple[float, float]:
    a = 1.0 - ci_level
    lo, hi = np.quantile(samples, [a / 2, 1 - a / 2])
    return float(lo), float(hi)


def clustered_mean(values: np.ndarray, clusters: np.ndarray, *, n_boot: int = 1000, ci_level: float = 0.95,
                   seed: int = 0) -> ClusteredCI:
    """Mean of per-image values (e.g. top-1 hits) with a patient-clustered bootstrap CI."""
    _check_options(n_boot, ci_level, seed)
    v = np.asarray(values, dtype=np.float64)
    w, k = _weights(clusters, len(v), n_boot, seed)
    samples = (w @ v) / w.sum(axis=1)
    return ClusteredCI(float(v.mean()), _ci(samples, ci_level), samples, len(v), k, n_boot, ci_level)


def clustered_paired_difference(a: np.ndarray, b: np.ndarray, clusters: np.ndarray, *, n_boot: int = 1000,
                                ci_level: float = 0.95, seed: int = 0) -> ClusteredCI:
    """``mean(a) - mean(b)`` over the same images, with the same patient resamples for both arms."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired arms differ in shape: {a.shape} vs {b.shape}")
    return clustered_mean(a - b, clusters, n_boot=n_boot, ci_level=ci_level, seed=seed)


def per_class_recall(y: np.ndarray, pred: np.ndarray, n_classes: int) -> list[float | None]:
    """Recall of each class (None for a class absent from ``y``)."""
    y, pred = np.asarray(y), np.asarray(pred)
    return [float((pred[y == c] == c).mean()) if (y == c).any() else None for c in range(n_classes)]


def confusion(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``(C, C)`` counts, rows = true class, columns = predicted (sklearn's convention)."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y, pred, labels=list(range(n_classes)))


def _ece_weighted(conf: np.ndarray, correct: np.ndarray, w: np.ndarray, n_bins: int) -> np.ndarray:
    """Top-label ECE with equal-width confidence bins, for each row of weights ``w`` (B, n) -> (B,)."""
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)  # (0, 1/M], (1/M, 2/M], ...
    onehot = np.zeros((len(conf), n_bins))
    onehot[np.arange(len(conf)), bins] = 1.0
    gap = w @ (onehot * (correct - conf)[:, None])
    return np.abs(gap).sum(axis=1) / w.sum(axis=1)


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, *, n_bins: int = 15) -> float:
    """Top-label expected calibration error (Guo et al. 2017): sum over equal-width confidence bins of
    ``|bin| / n * |accuracy(bin) - mean confidence(bin)|``."""
    p = np.asarray(probs, dtype=np.float64)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == np.asarray(y)).astype(np.float64)
    return float(_ece_weighted(conf, correct, np.ones((1, len(conf))), n_bins)[0])


def ece_with_ci(probs: np.ndarray, y: np.ndarray, clusters: np.ndarray, *, n_bins: int = 15, n_boot: int = 1000,
                ci_level: float = 0.95, seed: int = 0) -> ClusteredCI:
    _check_options(n_boot, ci_level, seed)
    p = np.asarray(probs, dtype=np.float64)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == np.asarray(y)).astype(np.float64)
    w, k = _weights(clusters, len(conf), n_boot, seed)
    samples = _ece_weighted(conf, correct, w, n_bins)
    return ClusteredCI(expected_calibration_error(p, y, n_bins=n_bins), _ci(samples, ci_level), samples, len(conf),
                       k, n_boot, ci_level)


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """Selective risk at every coverage: answer the ``m`` most confident images, abstain on the rest.

    Returns ``coverage`` (m / n, m = 1..n), ``risk`` (error rate among the answered), ``threshold`` (the confidence
    of the m-th answered image). Ties in confidence are kept together (a threshold cannot split them): the curve is
    evaluated at the last index of each tie group.
    """
    c = np.asarray(confidence, dtype=np.float64)
    err = 1.0 - np.asarray(correct, dtype=np.float64)
    order = np.argsort(-c, kind="stable")
    cs, es = c[order], np.cumsum(err[order])
    m = np.arange(1, len(c) + 1)
    last = np.r_[cs[1:] != cs[:-1], True]
    return {"coverage": (m / len(c))[last], "risk": (es / m)[last], "threshold": cs[last]}


def aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk-coverage curve (Geifman et al. 2019): the mean selective risk over coverages 1/n..1
    (ties in confidence share the risk of their group)."""
    rc = risk_coverage(confidence, correct)
    n = len(confidence)
    sizes = np.diff(np.r_[0, np.round(rc["coverage"] * n).astype(int)])
    return float((rc["risk"] * sizes).sum() / n)


def aurc_with_ci(confidence: np.ndarray, correct: np.ndarray, clusters: np.ndarray, *, n_boot: int = 1000,
                 ci_level: float = 0.95, seed: int = 0) -> ClusteredCI:
    """AURC with a patient-clustered CI (each resample weights images by their patient's draw count)."""
    _check_options(n_boot, ci_level, seed)
    c = np.asarray(confidence, dtype=np.float64)
    err = 1.0 - np.asarray(correct, dtype=np.float64)
    order = np.argsort(-c, kind="stable")
    w, k = _weights(np.asarray(clusters)[order], len(c), n_boot, seed)
    e = err[order]
    cw, ce = np.cumsum(w, axis=1), np.cumsum(w * e, axis=1)
    risk = np.divide(ce, cw, out=np.zeros_like(ce), where=cw > 0)
    samples = (risk * w).sum(axis=1) / w.sum(axis=1)  # weighted mean of the selective risk over answered images
    return ClusteredCI(aurc(c, 1.0 - err), _ci(samples, ci_level), samples, len(c), k, n_boot, ci_level)


def conformal_coverage_band(n_calibration: int, n_test: int, alpha: float, *, level: float = 0.99) -> tuple[float, float]:
    """Where split-conformal coverage on ``n_test`` exchangeable test points falls with probability ``level``.

    With ``n`` calibration scores, the coverage conditional on them is ``Beta(n + 1 - l, l)``, ``l = floor((n + 1)
    alpha)`` (Vovk 2012; Angelopoulos & Bates 2021, sec. 3); the number of covered test points is then
    beta-binomial. Returns the central ``level`` interval of the empirical coverage.
    """
    from scipy.stats import betabinom

    n = int(n_calibration)
    l_ = int(np.floor((n + 1) * alpha))
    if l_ < 1:
        return 0.0, 1.0  # too few calibration points: every set is the full class list
    dist = betabinom(int(n_test), n + 1 - l_, l_)
    lo, hi = dist.ppf([(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo) / n_test, float(hi) / n_test


def class_counts(y: np.ndarray, labels: Sequence[str]) -> Mapping[str, int]:
    return {name: int((np.asarray(y) == i).sum()) for i, name in enumerate(labels)}
