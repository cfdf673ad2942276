"""Calibrated abstain, fitted on calibration patients only: temperature, conformal sets, abstain threshold.

* Temperature scaling (Guo et al. 2017): one scalar ``T`` minimising the negative log-likelihood of
  ``softmax(logits / T)`` on calibration images (bounded 1-D search over ``log T``).
* Conformal prediction sets with crepes (``ConformalClassifier``, non-conformity ``1 - p(class)`` of the
  temperature-scaled probabilities; no smoothing): a class is in the set when its p-value exceeds ``alpha``.
  The equivalent score quantile ``qhat`` is stored for serving: a class is in the set iff ``1 - p <= qhat``.
* Abstain threshold: the smallest confidence ``t`` such that, on calibration images, answering only those with
  ``max p >= t`` has selective error at most ``target_risk`` (largest coverage meeting the target).

The functions receive calibration arrays only; a job passes nothing else (the leak test permutes and zeroes test
labels and requires all three values bit-identical).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Calibration", "fit_temperature", "fit_calibration", "conformal_sets", "conformal_qhat", "nll"]


def _softmax(logits: np.ndarray, t: float) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / t
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    """Mean negative log-likelihood of ``softmax(logits / t)``."""
    z = np.asarray(logits, dtype=np.float64) / t
    m = z.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))
    return float((lse - z[np.arange(len(y)), y]).mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray, *, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The NLL-minimising temperature on ``(logits, y)``, searched over ``log T`` in ``log(bounds)``."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y, dtype=np.int64)
    if len(y) < 2:
        raise ValueError(f"temperature scaling needs calibration images, got {len(y)}")
    res = minimize_scalar(lambda s: nll(logits, y, float(np.exp(s))), bounds=tuple(np.log(bounds)), method="bounded",
                          options={"xatol": 1e-6})
    return float(np.exp(res.x))


def conformal_qhat(cal_scores_true: np.ndarray, alpha: float) -> float:
    """The ``ceil((n + 1)(1 - alpha))``-th smallest calibration score (``inf`` when that exceeds ``n``)."""
    s = np.sort(np.asarray(cal_scores_true, dtype=np.float64))
    k = int(np.ceil((len(s) + 1) * (1 - alpha)))
    return float("inf") if k > len(s) else float(s[k - 1])


def conformal_sets(probs_cal: np.ndarray, y_cal: np.ndarray, probs: np.ndarray, alpha: float) -> np.ndarray:
    """``(n, C)`` 0/1 prediction sets from crepes' ``ConformalClassifier`` at confidence ``1 - alpha``."""
    from crepes import ConformalClassifier

    cc = ConformalClassifier()
    cc.fit(1.0 - np.asarray(probs_cal)[np.arange(len(y_cal)), y_cal])
    return np.asarray(cc.predict_set(1.0 - np.asarray(probs), confidence=1.0 - alpha, smoothing=False), dtype=np.int64)


def abstain_threshold(conf: np.ndarray, correct: np.ndarray, target_risk: float) -> float:
    """Smallest confidence threshold whose selective error on these images is ``<= target_risk`` (``inf``, i.e.
    always abstain, when no coverage reaches it)."""
    c = np.asarray(conf, dtype=np.float64)
    err = 1.0 - np.asarray(correct, dtype=np.float64)
    order = np.argsort(-c, kind="stable")
    cs, es = c[order], np.cumsum(err[order])
    m = np.arange(1, len(c) + 1)
    ok = (es / m <= target_risk) & np.r_[cs[1:] != cs[:-1], True]  # only thresholds that do not split ties
    return float(cs[np.nonzero(ok)[0].max()]) if ok.any() else float("inf")


@dataclass(frozen=True)
class Calibration:
    temperature: float
    conformal_alpha: float
    conformal_qhat: float
    abstain_threshold: float
    target_risk: float
    n_images: int

    def as_dict(self) -> dict:
        return {"temperature": self.temperature, "conformal_alpha": self.conformal_alpha,
                "conformal_qhat": self.conformal_qhat if np.isfinite(self.conformal_qhat) else None,
                "abstain_threshold": self.abstain_threshold if np.isfinite(self.abstain_threshold) else None,
                "target_risk": self.target_risk, "n_calibration_images": self.n_images}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(float(d["temperature"]), float(d["conformal_alpha"]),
                   float("inf") if d["conformal_qhat"] is None else float(d["conformal_qhat"]),
                   float("inf") if d["abstain_threshold"] is None else float(d["abstain_threshold"]),
                   float(d["target_risk"]), int(d["n_calibration_images"]))


def fit_calibration(logits_cal: np.ndarray, y_cal: np.ndarray, *, alpha: float, target_risk: float) -> Calibration:
    """Temperature, conformal quantile and abstain threshold from calibration logits and labels only."""
    y_cal = np.asarray(y_cal, dtype=np.int64)
    t = fit_temperature(logits_cal, y_cal)
    p = _softmax(logits_cal, t)
    q = conformal_qhat(1.0 - p[np.arange(len(y_cal)), y_cal], alpha)
    thr = abstain_threshold(p.max(axis=1), (p.argmax(axis=1) == y_cal).astype(float), target_risk)
    return Calibration(t, float(alpha), q, thr, float(target_risk), len(y_cal))
