"""Conformal retention certificates against their definitions, the notes' reference formulas and simulation.

The simulations are seeded: iid units with 1-5 lesion tokens and continuous scores, where theory fixes the
answer (CRC: mean token coverage in [1 - alpha, 1 - alpha + 2/(n+1)]; all kept: exactly
ceil((n+1)(1-alpha))/(n+1), and Beta(n+1-l, l) given the calibration set). Mis-specified certificates (the
"all kept" threshold reported as token coverage, heavy score ties, slices calibrated and patients tested)
must be flagged.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from covtoken.arch.conformal import (RetentionData, allkept_band, allkept_threshold, beta_coverage_law,
                                     check_coverage, classify, crc_band, crc_threshold, evaluate_certificate,
                                     split_study, unit_losses, unit_minima)

ALPHA = 0.1


def simulate(rng: np.random.Generator, n_units: int, *, images_per_unit: int = 1, decimals: int | None = None,
             background: int = 20) -> RetentionData:
    """iid units: 1-5 lesion tokens each, scores N(1, 1) + a unit effect; ``background`` other tokens per unit."""
    sizes = rng.integers(1, 6, size=n_units)
    unit = np.repeat(np.arange(n_units), sizes)
    s = rng.normal(1.0, 1.0, unit.size) + rng.normal(0.0, 0.5, n_units)[unit]
    if decimals is not None:
        s = np.round(s, decimals)
    group = unit * images_per_unit + rng.integers(0, images_per_unit, unit.size)
    bg_unit = np.repeat(np.arange(n_units), background)
    bg = rng.normal(0.0, 1.0, bg_unit.size)
    return RetentionData(s, unit, group, np.concatenate([s, bg]), np.concatenate([unit, bg_unit]), np.arange(n_units))


def brute_force_crc(scores: np.ndarray, unit: np.ndarray, n: int, alpha: float) -> float:
    """The definition, over every candidate threshold: the largest t with n/(n+1) R(t) + 1/(n+1) <= alpha."""
    best = -np.inf
    for t in np.unique(scores):
        risk = np.mean([np.mean(scores[unit == i] < t) for i in range(n)])
        if n / (n + 1) * risk + 1 / (n + 1) <= alpha + 1e-12:
            best = max(best, t)
    return best


@pytest.mark.parametrize("decimals", [None, 1])
def test_crc_threshold_is_the_exact_supremum(decimals):
    rng = np.random.default_rng(3)
    for n in (12, 40):
        d = simulate(rng, n, decimals=decimals)
        t = crc_threshold(d.lesion_scores, d.lesion_unit, n, alpha=ALPHA)
        assert t == brute_force_crc(d.lesion_scores, d.lesion_unit, n, ALPHA)
        # between calibration scores a dense grid can only do worse (a lower threshold keeps more)
        grid = np.linspace(d.lesion_scores.min(), d.lesion_scores.max(), 2000)
        ok = [g for g in grid if n / (n + 1) * unit_losses(g, d.lesion_scores, d.lesion_unit, n).mean()
              + 1 / (n + 1) <= ALPHA]
        assert max(ok) <= t


def test_crc_keeps_everything_when_n_is_too_small():
    d = simulate(np.random.default_rng(0), 8)  # alpha (n + 1) = 0.9 < B
    assert crc_threshold(d.lesion_scores, d.lesion_unit, 8, alpha=ALPHA) == -np.inf
    assert allkept_threshold(unit_minima(d.lesion_scores, d.lesion_unit, 8), alpha=ALPHA) == -np.inf
    with pytest.raises(ValueError, match="too few"):
        beta_coverage_law(8, ALPHA)
    with pytest.raises(ValueError, match="alpha"):
        crc_threshold(d.lesion_scores, d.lesion_unit, 8, alpha=1.5)


def test_allkept_threshold_is_the_rank_of_the_definition():
    """q_hat is the ceil((n+1)(1-alpha))-th smallest c_i: numpy's inverted_cdf quantile at r/n.

    The notes' shortcut ``np.quantile(c, r/n, method="higher")`` picks the (r+1)-th smallest (virtual index
    (n-1) r/n rounded up), one rank too conservative: its exact coverage (r+1)/(n+1) leaves the band.
    """
    rng = np.random.default_rng(1)
    for n in (19, 50, 100, 203):
        m = rng.normal(size=n)
        c = -m
        r = int(np.ceil((n + 1) * (1 - ALPHA)))
        assert allkept_threshold(m, alpha=ALPHA) == -np.sort(c)[r - 1]
        assert allkept_threshold(m, alpha=ALPHA) == -np.quantile(c, r / n, method="inverted_cdf")
        assert np.quantile(c, r / n, method="higher") == np.sort(c)[r]
        lo, hi = allkept_band(n, ALPHA)
        assert lo - 1e-12 <= r / (n + 1) < hi and (r + 1) / (n + 1) >= hi - 1e-12


def test_retention_data_groups_like_a_loop():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(6, 5))
    lesion = rng.random((6, 5)) < 0.3
    lesion[2] = False
    lesion[3] = False  # patient "b" (images 2, 3) has no lesion token
    pats = np.array(["a", "a", "b", "b", "c", "c"])
    d = RetentionData.from_tokens(scores, lesion, pats)
    assert d.unit_ids.tolist() == ["a", "c"]
    for u, p in enumerate(d.unit_ids):
        rows = np.flatnonzero(pats == p)
        np.testing.assert_array_equal(np.sort(d.lesion_scores[d.lesion_unit == u]),
                                      np.sort(scores[rows][lesion[rows]]))
        assert (d.token_unit == u).sum() == rows.size * 5
    with pytest.raises(ValueError, match="no unit"):
        RetentionData.from_tokens(scores, np.zeros_like(lesion), pats)


def test_crc_simulation_is_valid_and_tight():
    """Fresh iid data each repetition (n = 200): mean token coverage inside [0.9, 0.91] up to MC error."""
    rng = np.random.default_rng(10)
    n, m, reps = 200, 200, 300
    crc, allk = [], []
    for _ in range(reps):
        d = simulate(rng, n + m)
        res = evaluate_certificate(d, cal_units=np.arange(n), test_units=np.arange(n, n + m),
                                   counts=np.ones((2, m), int), alpha=ALPHA, n_splits=2, seed=0, ci_level=0.95)
        crc.append(res.metrics["crc_test_token_coverage"]["value"])
        allk.append(res.metrics["allkept_test_coverage"]["value"])
    crc, allk = np.array(crc), np.array(allk)
    se = crc.std(ddof=1) / np.sqrt(reps)
    lo, hi = crc_band(n, ALPHA)
    assert lo - 3 * se <= crc.mean() <= hi + 3 * se, (crc.mean(), se)
    assert 0.005 < crc.std() < 0.03  # the notes: about +- 0.014 at n = 200 (spread over fresh data)
    exact = np.ceil((n + 1) * (1 - ALPHA)) / (n + 1)
    assert abs(allk.mean() - exact) <= 3 * allk.std(ddof=1) / np.sqrt(reps)


def test_allkept_conditional_coverage_follows_the_beta_law():
    """Unit minima ~ U(0, 1): coverage given the calibration set is 1 - t_hat, Beta(n + 1 - l, l)."""
    rng = np.random.default_rng(4)
    n = 60
    cov = np.array([1.0 - allkept_threshold(rng.random(n), alpha=ALPHA) for _ in range(2000)])
    a, b = beta_coverage_law(n, ALPHA)
    assert (a, b) == (n + 1 - 6, 6)
    assert stats.kstest(cov, stats.beta(a, b).cdf).pvalue > 0.01
    assert stats.kstest(cov, stats.beta(a + 1, b - 1).cdf).pvalue < 0.01  # the test can tell a neighbour apart


def test_split_study_on_one_pool_is_within_band():
    d = simulate(np.random.default_rng(5), 300)
    st = split_study(d, n_cal=150, n_splits=400, alpha=ALPHA, seed=0)
    crc = check_coverage(st.crc_coverage, certificate="crc", n_cal=150, alpha=ALPHA, ci_level=0.95)
    allk = check_coverage(st.allkept_coverage, certificate="all-kept", n_cal=150, alpha=ALPHA, ci_level=0.95)
    assert crc.flag == "within band" and allk.flag == "within band", (crc, allk)
    assert abs(allk.mean - np.ceil(151 * 0.9) / 151) < 0.01
    assert st.crc_kept.mean() < st.allkept_kept.mean()  # a token fraction is cheaper to certify than whole units


def test_allkept_threshold_reported_as_token_coverage_is_loose():
    """The notes' 0.978-at-0.90 pattern: calibrate "all kept", report token coverage."""
    d = simulate(np.random.default_rng(6), 300)
    rng = np.random.default_rng(0)
    token_cov = []
    for _ in range(300):
        perm = rng.permutation(300)
        cal, test = perm[:150], perm[150:]
        sel = np.isin(d.lesion_unit, cal)
        _, idx = np.unique(d.lesion_unit[sel], return_inverse=True)
        t = allkept_threshold(unit_minima(d.lesion_scores[sel], idx, 150), alpha=ALPHA)
        token_cov.append(1 - unit_losses(t, d.lesion_scores, d.lesion_unit, 300)[test].mean())
    chk = check_coverage(np.array(token_cov), certificate="crc", n_cal=150, alpha=ALPHA, ci_level=0.95)
    assert chk.flag == "loose certificate" and chk.mean > 0.95, chk


def test_heavy_ties_make_a_loose_certificate():
    d = simulate(np.random.default_rng(7), 300, decimals=0)  # scores on a handful of levels
    st = split_study(d, n_cal=150, n_splits=300, alpha=ALPHA, seed=0)
    allk = check_coverage(st.allkept_coverage, certificate="all-kept", n_cal=150, alpha=ALPHA, ci_level=0.95)
    assert allk.flag == "loose certificate", allk


def test_slice_calibration_with_patient_testing_is_a_violation():
    d = simulate(np.random.default_rng(8), 300, images_per_unit=4)
    ok = split_study(d, n_cal=150, n_splits=300, alpha=ALPHA, seed=0)
    bad = split_study(d, n_cal=150, n_splits=300, alpha=ALPHA, seed=0, calibrate_on="group")
    assert bad.n_cal.min() > 150  # images of the calibration patients taken as units
    n_bad = int(np.median(bad.n_cal))
    assert check_coverage(ok.allkept_coverage, certificate="all-kept", n_cal=150, alpha=ALPHA,
                          ci_level=0.95).flag == "within band"
    assert check_coverage(bad.allkept_coverage, certificate="all-kept", n_cal=n_bad, alpha=ALPHA,
                          ci_level=0.95).flag == "violation"


def test_bands_and_flags():
    assert crc_band(199, 0.1) == pytest.approx((0.9, 0.91))
    assert allkept_band(99, 0.1) == pytest.approx((0.9, 0.91))
    assert classify((0.95, 0.97), (0.9, 0.91)) == "loose certificate"
    assert classify((0.85, 0.89), (0.9, 0.91)) == "violation"
    assert classify((0.89, 0.95), (0.9, 0.91)) == "within band"
    with pytest.raises(ValueError, match="certificate"):
        check_coverage(np.ones(3), certificate="cp", n_cal=10, alpha=0.1, ci_level=0.95)
