"""Conformal retention certificates: a score threshold that provably keeps the lesion tokens (science notes §6).

Units are exchangeable patients. Unit ``i`` has lesion tokens ``L_i`` with membership scores ``s_j`` (higher =
more lesion-like) and the keep set ``T_t = {j : s_j >= t}``, nested in the threshold ``t`` (the notes write
``lambda = -t``: a larger lambda keeps more, so ``inf`` over lambda is ``sup`` over ``t``).

* **Conformal risk control** (Angelopoulos et al., ICLR 2024) on the loss ``l_i(t) = |L_i \\ T_t| / |L_i|``
  (fraction of the unit's lesion tokens dropped; bounded by ``B = 1``, non-decreasing in ``t``):
  ``t_hat = sup{t : n/(n+1) R_n(t) + B/(n+1) <= alpha}``. ``R_n`` is a step function that changes only at the
  calibration lesion-token scores, so the supremum is one of those scores and is computed exactly (the
  calibration scores are the grid). Then ``alpha - 2B/(n+1) <= E[l_test(t_hat)] <= alpha``: the upper bound
  always, the lower one for tie-free scores (a jump of the empirical risk is then at most ``B/(n+1)``). Both
  hold conditionally on the pooled bag of calibration and test units, so they hold on average over random
  calibration/test splits of one pool, which :func:`split_study` checks.
* **Split conformal, "all lesion tokens kept"**: ``c_i = max_{j in L_i} (-s_j)``; ``q_hat`` is the
  ``ceil((n+1)(1-alpha))``-th smallest ``c_i``; keep ``s_j >= -q_hat``. ``P(L_test in T)`` lies in
  ``[1-alpha, 1-alpha+1/(n+1))`` (upper bound for tie-free scores); given the calibration set it is
  ``Beta(n+1-l, l)`` with ``l = floor((n+1) alpha)``.

Coverage far above its band is a *loose certificate* (e.g. the "all kept" threshold reported as token coverage,
heavy score ties, a coarse grid); below it a *violation* (e.g. slices calibrated, patients tested). Labels enter
only as the arrays the caller passes in; this module never imports the mask loader.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

from .summaries import CLUSTER_METHOD, clustered_ratio, mc_mean_ci, metric

__all__ = ["RetentionData", "crc_threshold", "allkept_threshold", "unit_losses", "unit_minima", "crc_band",
           "allkept_band", "beta_coverage_law", "classify", "SplitStudy", "split_study", "CoverageCheck",
           "check_coverage", "evaluate_certificate", "CertificateResult"]

CalibrateOn = Literal["unit", "group"]
_EPS = 1e-12


@dataclass(frozen=True)
class RetentionData:
    """Token scores of the units that hold lesion tokens.

    Attributes:
        lesion_scores: ``(T,)`` scores of lesion tokens.
        lesion_unit: ``(T,)`` unit (patient) index in ``[0, n_units)`` of each lesion token.
        lesion_group: ``(T,)`` sub-unit (image) index of each lesion token, distinct across units.
        token_scores: ``(M,)`` scores of every token of these units (the price: how many are kept).
        token_unit: ``(M,)`` unit index of each token.
        unit_ids: ``(n_units,)`` external unit ids (patient ids).
    """

    lesion_scores: np.ndarray
    lesion_unit: np.ndarray
    lesion_group: np.ndarray
    token_scores: np.ndarray
    token_unit: np.ndarray
    unit_ids: np.ndarray

    @property
    def n_units(self) -> int:
        return int(self.unit_ids.size)

    @classmethod
    def from_tokens(cls, scores: np.ndarray, is_lesion: np.ndarray, unit_of_image: np.ndarray) -> "RetentionData":
        """Group per-image token scores into units; units without a lesion token are left out.

        Args:
            scores: ``(n_images, N)`` token scores.
            is_lesion: ``(n_images, N)`` bool, the token is a lesion token.
            unit_of_image: ``(n_images,)`` unit (patient) id of each image.
        """
        s, lab = np.asarray(scores, dtype=np.float64), np.asarray(is_lesion, dtype=bool)
        units = np.asarray(unit_of_image)
        if s.shape != lab.shape or s.ndim != 2 or units.shape != (s.shape[0],):
            raise ValueError(f"scores {s.shape}, is_lesion {lab.shape} and unit_of_image {units.shape} disagree")
        if not np.isfinite(s).all():
            raise ValueError(f"scores contain {int((~np.isfinite(s)).sum())} non-finite value(s)")
        keep_units = np.unique(units[lab.any(axis=1)])
        if keep_units.size == 0:
            raise ValueError("no unit holds a lesion token; a retention certificate needs lesions")
        img = np.flatnonzero(np.isin(units, keep_units))
        uidx = np.searchsorted(keep_units, units[img])
        n_tok = s.shape[1]
        tok_img = np.repeat(np.arange(img.size), n_tok)
        flat_s, flat_l = s[img].reshape(-1), lab[img].reshape(-1)
        return cls(lesion_scores=flat_s[flat_l], lesion_unit=uidx[tok_img[flat_l]], lesion_group=img[tok_img[flat_l]],
                   token_scores=flat_s, token_unit=uidx[tok_img], unit_ids=keep_units)


def _sizes(unit: np.ndarray, n_units: int) -> np.ndarray:
    sizes = np.bincount(unit, minlength=n_units)
    if sizes.size != n_units or (sizes == 0).any():
        raise ValueError(f"every one of the {n_units} units needs a lesion token; "
                         f"{int((sizes[:n_units] == 0).sum())} have none")
    return sizes


def crc_threshold(scores: np.ndarray, unit: np.ndarray, n_units: int, *, alpha: float, bound: float = 1.0) -> float:
    """Exact conformal-risk-control threshold for the fraction of lesion tokens dropped.

    Args:
        scores: ``(T,)`` calibration lesion-token scores.
        unit: ``(T,)`` unit index in ``[0, n_units)``; every unit has at least one token.
        n_units: n, the number of calibration units.
        alpha: risk level in (0, 1).
        bound: B, the loss bound (1 for a fraction).

    Returns:
        ``t_hat``; keep tokens with ``score >= t_hat``. ``-inf`` (keep everything) when even the empty drop set
        violates the bound, i.e. ``alpha (n+1) < B``.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    s = np.asarray(scores, dtype=np.float64)
    sizes = _sizes(np.asarray(unit), n_units)
    level = (alpha * (n_units + 1) - bound) / n_units  # the bound <=> R_n(t) <= level
    if level < 0:
        return float("-inf")
    if level >= 1.0:
        return float("inf")
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    w = 1.0 / (n_units * sizes[np.asarray(unit)[order]])
    cum = np.concatenate([[0.0], np.cumsum(w)])
    risk_at = cum[np.searchsorted(s_sorted, s_sorted, side="left")]  # R_n(s_k): weight of scores < s_k
    last = int(np.searchsorted(risk_at, level + _EPS, side="right")) - 1  # risk_at is non-decreasing
    return float(s_sorted[last])


def unit_losses(threshold: float, scores: np.ndarray, unit: np.ndarray, n_units: int) -> np.ndarray:
    """``(n_units,)`` fraction of each unit's lesion tokens dropped (``score < threshold``)."""
    sizes = _sizes(np.asarray(unit), n_units)
    return np.bincount(unit, weights=(np.asarray(scores) < threshold).astype(np.float64), minlength=n_units) / sizes


def unit_minima(scores: np.ndarray, unit: np.ndarray, n_units: int) -> np.ndarray:
    """``(n_units,)`` lowest lesion-token score of each unit (the unit is fully kept iff it is >= t)."""
    _sizes(np.asarray(unit), n_units)
    out = np.full(n_units, np.inf)
    np.minimum.at(out, unit, np.asarray(scores, dtype=np.float64))
    return out


def allkept_threshold(unit_min: np.ndarray, *, alpha: float) -> float:
    """Split-conformal threshold under which all lesion tokens of a new unit are kept with prob. >= 1 - alpha.

    Args:
        unit_min: ``(n,)`` lowest lesion-token score of each calibration unit.
        alpha: miscoverage level in (0, 1).

    Returns:
        ``-q_hat`` with ``q_hat`` the ``ceil((n+1)(1-alpha))``-th smallest of ``-unit_min``; ``-inf`` when that
        rank exceeds n (too few units: keep everything).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    m = np.asarray(unit_min, dtype=np.float64)
    n = m.size
    rank = int(np.ceil((n + 1) * (1.0 - alpha) - _EPS))
    if n == 0 or rank > n:
        return float("-inf")
    return float(-np.sort(-m)[rank - 1])


def crc_band(n: int, alpha: float, bound: float = 1.0) -> tuple[float, float]:
    """Token-coverage band ``[1 - alpha, 1 - alpha + 2B/(n+1)]`` of the CRC certificate with n units."""
    return 1.0 - alpha, 1.0 - alpha + 2.0 * bound / (n + 1)


def allkept_band(n: int, alpha: float) -> tuple[float, float]:
    """Coverage band ``[1 - alpha, 1 - alpha + 1/(n+1))`` of the split-conformal "all kept" certificate."""
    return 1.0 - alpha, 1.0 - alpha + 1.0 / (n + 1)


def beta_coverage_law(n: int, alpha: float) -> tuple[int, int]:
    """Parameters ``(n + 1 - l, l)``, ``l = floor((n+1) alpha)``, of the coverage law given the calibration set."""
    lo = int(np.floor((n + 1) * alpha + _EPS))
    if lo < 1:
        raise ValueError(f"n={n} units are too few for alpha={alpha}: the certificate keeps every token")
    return n + 1 - lo, lo


def classify(ci: tuple[float, float], band: tuple[float, float]) -> str:
    """``"violation"`` when the interval lies below the band, ``"loose certificate"`` above it, else in band."""
    if ci[1] < band[0]:
        return "violation"
    if ci[0] > band[1]:
        return "loose certificate"
    return "within band"


@dataclass(frozen=True)
class SplitStudy:
    """Test results of R random calibration/test splits of one pool of units (all arrays ``(R,)``)."""

    crc_coverage: np.ndarray
    allkept_coverage: np.ndarray
    crc_kept: np.ndarray
    allkept_kept: np.ndarray
    n_cal: np.ndarray
    n_test: int


def _calibrate(data: RetentionData, cal: np.ndarray, *, alpha: float, bound: float,
               calibrate_on: CalibrateOn) -> tuple[float, float, int]:
    """Thresholds from the calibration units (``calibrate_on="group"``: images as units, a mis-specification)."""
    sel = np.isin(data.lesion_unit, cal)
    key = data.lesion_unit[sel] if calibrate_on == "unit" else data.lesion_group[sel]
    ids, idx = np.unique(key, return_inverse=True)
    s = data.lesion_scores[sel]
    t_crc = crc_threshold(s, idx, ids.size, alpha=alpha, bound=bound)
    t_all = allkept_threshold(unit_minima(s, idx, ids.size), alpha=alpha)
    return t_crc, t_all, int(ids.size)


def _test(data: RetentionData, test: np.ndarray, t_crc: float, t_all: float) -> dict[str, np.ndarray]:
    """Per test unit: token coverage at ``t_crc``, fully kept at ``t_all``, kept and total tokens."""
    n = data.n_units
    cov = 1.0 - unit_losses(t_crc, data.lesion_scores, data.lesion_unit, n)
    full = unit_minima(data.lesion_scores, data.lesion_unit, n) >= t_all
    tokens = np.bincount(data.token_unit, minlength=n).astype(np.float64)
    kept_crc = np.bincount(data.token_unit, weights=(data.token_scores >= t_crc).astype(float), minlength=n)
    kept_all = np.bincount(data.token_unit, weights=(data.token_scores >= t_all).astype(float), minlength=n)
    return {"crc_cov": cov[test], "allkept_cov": full[test].astype(np.float64), "crc_kept": kept_crc[test],
            "allkept_kept": kept_all[test], "tokens": tokens[test]}


def split_study(data: RetentionData, *, n_cal: int, n_splits: int, alpha: float, seed: int, bound: float = 1.0,
                calibrate_on: CalibrateOn = "unit", pool: np.ndarray | None = None) -> SplitStudy:
    """Calibrate on ``n_cal`` random units of the pool and test on the rest, ``n_splits`` times.

    Args:
        data: the units.
        n_cal: calibration units per split.
        n_splits: R, the number of random splits.
        alpha: level of both certificates.
        seed: seed of the split permutations.
        bound: B of the CRC loss.
        calibrate_on: ``"unit"`` (patients, the exchangeable unit) or ``"group"`` (images of the calibration
            patients taken as units: the slice-calibrated, patient-tested mis-specification).
        pool: unit indices to split (default every unit).

    Returns:
        :class:`SplitStudy` with the test-set mean of each statistic per split.
    """
    pool = np.arange(data.n_units) if pool is None else np.asarray(pool)
    if not 1 <= n_cal < pool.size:
        raise ValueError(f"n_cal={n_cal} must leave test units in a pool of {pool.size}")
    if calibrate_on not in ("unit", "group"):
        raise ValueError(f"calibrate_on must be 'unit' or 'group', got {calibrate_on!r}")
    rng = np.random.default_rng(seed)
    out = {k: np.empty(n_splits) for k in ("crc", "all", "kc", "ka", "n")}
    for r in range(n_splits):
        perm = rng.permutation(pool)
        t_crc, t_all, n_eff = _calibrate(data, perm[:n_cal], alpha=alpha, bound=bound, calibrate_on=calibrate_on)
        res = _test(data, perm[n_cal:], t_crc, t_all)
        out["crc"][r], out["all"][r] = res["crc_cov"].mean(), res["allkept_cov"].mean()
        out["kc"][r] = res["crc_kept"].sum() / res["tokens"].sum()
        out["ka"][r] = res["allkept_kept"].sum() / res["tokens"].sum()
        out["n"][r] = n_eff
    return SplitStudy(out["crc"], out["all"], out["kc"], out["ka"], out["n"].astype(int), int(pool.size - n_cal))


@dataclass(frozen=True)
class CoverageCheck:
    """Mean test coverage over random splits against the certificate's exact band."""

    certificate: str
    mean: float
    ci: tuple[float, float]
    band: tuple[float, float]
    frac_in_band: float
    flag: str
    n_splits: int
    n_cal: int


def check_coverage(values: np.ndarray, *, certificate: str, n_cal: int, alpha: float, ci_level: float,
                   bound: float = 1.0) -> CoverageCheck:
    """Summarise ``(R,)`` per-split test coverages of certificate ``"crc"`` or ``"all-kept"`` calibrated on n_cal."""
    if certificate == "crc":
        band = crc_band(n_cal, alpha, bound)
        inside = (values >= band[0] - _EPS) & (values <= band[1] + _EPS)
    elif certificate == "all-kept":
        band = allkept_band(n_cal, alpha)
        inside = (values >= band[0] - _EPS) & (values < band[1])
    else:
        raise ValueError(f"certificate must be 'crc' or 'all-kept', got {certificate!r}")
    mean, ci = mc_mean_ci(values, ci_level=ci_level)
    return CoverageCheck(certificate, mean, ci, band, float(inside.mean()), classify(ci, band), int(values.size),
                         int(n_cal))


@dataclass(frozen=True)
class CertificateResult:
    metrics: dict
    details: dict
    study: SplitStudy


def evaluate_certificate(data: RetentionData, *, cal_units: np.ndarray, test_units: np.ndarray, counts: np.ndarray,
                         alpha: float, n_splits: int, seed: int, ci_level: float, bound: float = 1.0,
                         calibrate_on: CalibrateOn = "unit") -> CertificateResult:
    """G4 evaluation: certificates calibrated on ``cal_units``, reported on ``test_units``, validity over splits.

    Args:
        data: units with lesion tokens.
        cal_units, test_units: disjoint unit indices of the primary split.
        counts: ``(B, len(test_units))`` cluster-bootstrap counts over the test units (paired for every metric).
        alpha, bound: certificate level and loss bound.
        n_splits: R random splits of ``cal_units + test_units`` with ``len(cal_units)`` calibration units.
        seed: seed of the random splits.
        ci_level: nominal coverage of every interval.
        calibrate_on: see :func:`split_study` (``"unit"`` is the valid protocol).

    Returns:
        record metrics, details (thresholds, bands, Beta law, per-split arrays), and the split study.
    """
    cal, test = np.asarray(cal_units), np.asarray(test_units)
    if np.intersect1d(cal, test).size:
        raise ValueError("calibration and test units overlap; the certificate would certify itself")
    t_crc, t_all, n_eff = _calibrate(data, cal, alpha=alpha, bound=bound, calibrate_on=calibrate_on)
    res = _test(data, test, t_crc, t_all)
    ones = np.ones(test.size)
    n_primary = {"patients": int(test.size), "tokens": int(res["tokens"].sum()),
                 "positive_tokens": int(np.isin(data.lesion_unit, test).sum()), "resamples": int(counts.shape[0])}
    boot = {name: clustered_ratio(num, den, counts, ci_level=ci_level) for name, (num, den) in {
        "crc_cov": (res["crc_cov"], ones), "allkept_cov": (res["allkept_cov"], ones),
        "crc_kept": (res["crc_kept"], res["tokens"]), "allkept_kept": (res["allkept_kept"], res["tokens"])}.items()}
    study = split_study(data, n_cal=cal.size, n_splits=n_splits, alpha=alpha, seed=seed, bound=bound,
                        calibrate_on=calibrate_on, pool=np.concatenate([cal, test]))
    n_band = int(np.median(study.n_cal))
    checks = {"crc": check_coverage(study.crc_coverage, certificate="crc", n_cal=n_band, alpha=alpha,
                                    ci_level=ci_level, bound=bound),
              "allkept": check_coverage(study.allkept_coverage, certificate="all-kept", n_cal=n_band, alpha=alpha,
                                        ci_level=ci_level)}
    n_study = {"patients": int(cal.size + test.size), "resamples": int(n_splits)}
    mc = (f"Monte Carlo normal interval over {n_splits} random calibration/test splits of the {cal.size + test.size} "
          "pooled patients (conditional on the pool)")
    m: dict[str, dict] = {}
    for key, label in (("crc", "CRC token coverage"), ("allkept", "all-kept coverage")):
        c = checks[key]
        m[f"{key}_split_mean_coverage"] = metric(c.mean, ci=c.ci, ci_level=ci_level, ci_method=mc, n=n_study,
                                                 unit="coverage", description=f"mean test {label} over random splits; "
                                                 f"exact band [{c.band[0]:.4f}, {c.band[1]:.4f}] for n = {c.n_cal}")
        m[f"{key}_coverage_shortfall"] = metric(c.band[0] - c.mean, ci=(c.band[0] - c.ci[1], c.band[0] - c.ci[0]),
                                                ci_level=ci_level, ci_method=mc, n=n_study, unit="coverage",
                                                description=f"1 - alpha minus the mean {label}; > 0 established = violation")
        m[f"{key}_coverage_excess"] = metric(c.mean - c.band[1], ci=(c.ci[0] - c.band[1], c.ci[1] - c.band[1]),
                                             ci_level=ci_level, ci_method=mc, n=n_study, unit="coverage",
                                             description=f"mean {label} minus the band top; > 0 established = loose certificate")
        m[f"{key}_frac_splits_in_band"] = metric(c.frac_in_band, n=n_study, unit="fraction of splits",
                                                 description=f"splits whose test {label} lies inside the band")
    for key, label, unit in (("crc_cov", "crc_test_token_coverage", "coverage"),
                             ("allkept_cov", "allkept_test_coverage", "coverage"),
                             ("crc_kept", "crc_kept_fraction", "fraction of tokens"),
                             ("allkept_kept", "allkept_kept_fraction", "fraction of tokens")):
        point, ci, _ = boot[key]
        m[label] = metric(point, ci=ci, ci_level=ci_level, ci_method=CLUSTER_METHOD, n=n_primary, unit=unit,
                          description=f"primary split: {label.replace('_', ' ')} on test patients")
    a, b = beta_coverage_law(n_eff, alpha)
    bb = stats.betabinom(test.size, a, b)
    lo_k, hi_k = np.ceil(test.size * checks["allkept"].band[0] - _EPS), test.size * checks["allkept"].band[1]
    hi_k = np.ceil(hi_k) - 1
    m["allkept_expected_frac_in_band"] = metric(float(bb.cdf(hi_k) - bb.cdf(lo_k - 1)), n=n_study, unit="probability",
                                                description=f"Beta-binomial({test.size}, {a}, {b}) chance that one "
                                                "split's all-kept test coverage falls inside the band")
    details = {"alpha": alpha, "bound": bound, "calibrate_on": calibrate_on, "n_cal": int(cal.size),
               "n_cal_effective": n_eff, "n_test": int(test.size), "crc_threshold": t_crc, "allkept_threshold": t_all,
               "flags": {k: c.flag for k, c in checks.items()},
               "bands": {k: list(c.band) for k, c in checks.items()},
               "beta_law": {"a": a, "b": b, "quantiles_5_50_95": [float(x) for x in stats.beta(a, b).ppf([.05, .5, .95])]},
               "splits": {"crc_coverage": study.crc_coverage.tolist(), "allkept_coverage": study.allkept_coverage.tolist(),
                          "crc_kept": study.crc_kept.tolist(), "allkept_kept": study.allkept_kept.tolist()}}
    return CertificateResult(metrics=m, details=details, study=study)
