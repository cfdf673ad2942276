"""Fast DeLong (covtoken.eval.delong) against pROC's published aSAH values and a brute-force O(mn) DeLong."""
from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest
from scipy.stats import norm, rankdata
from sklearn.metrics import roc_auc_score

from covtoken.eval.delong import delong_auroc, delong_paired
from covtoken.eval.rank import class_midranks

TOL = 1e-10

# pROC's own test suite (DeLong), as listed in shared/reference/aSAH.md.
PROC_AUC = {"wfns": 0.8236788617886179, "s100b": 0.7313685636856369, "ndka": 0.6119579945799458}
PROC_VAR = {"wfns": 0.0014699147088236264, "s100b": 0.0026686824571724383, "ndka": 0.0031908105493913021}
PROC_PAIRED = [("wfns", "s100b", 2.20898359144091, 0.0271757822291882),
               ("wfns", "ndka", 2.79777591868904, 0.00514557970691102),
               ("ndka", "s100b", -1.39077002573558, 0.164295175223055)]
PROC_CI_WFNS_S100B = (0.0104061769564844, 0.174214419249477)


@pytest.fixture(scope="module")
def asah(reference) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    with open(reference / "aSAH.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    y = np.array([r["outcome"] == "Poor" for r in rows], dtype=np.int64)
    markers = {k: np.array([float(r[k]) for r in rows]) for k in ("wfns", "s100b", "ndka")}
    assert y.size == 113 and y.sum() == 41
    return y, markers


def brute_delong(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) with explicit pairwise kernels psi(x, y) = 1, 1/2, 0: O(m n) reference."""
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    psi = (pos[:, :, None] > neg[:, None, :]) + 0.5 * (pos[:, :, None] == neg[:, None, :])  # (k, m, n)
    v10, v01 = psi.mean(axis=2), psi.mean(axis=1)
    s = np.atleast_2d(np.cov(v10)) / pos.shape[1] + np.atleast_2d(np.cov(v01)) / neg.shape[1]
    return psi.mean(axis=(1, 2)), s


@pytest.mark.parametrize("marker", ["wfns", "s100b", "ndka"])
def test_single_auc_and_variance_match_proc(asah, marker: str) -> None:
    y, markers = asah
    res = delong_auroc(y, markers[marker])
    assert res.auroc == pytest.approx(PROC_AUC[marker], abs=TOL)
    assert res.variance == pytest.approx(PROC_VAR[marker], abs=TOL, rel=1e-10)
    assert res.auroc == pytest.approx(roc_auc_score(y, markers[marker]), abs=1e-14)
    half = norm.ppf(0.975) * np.sqrt(PROC_VAR[marker])
    assert res.ci == pytest.approx((PROC_AUC[marker] - half, PROC_AUC[marker] + half), abs=TOL)
    assert (res.n_pos, res.n_neg) == (41, 72)


@pytest.mark.parametrize("a,b,z,p", PROC_PAIRED)
def test_paired_matches_proc_and_swap_flips_z(asah, a: str, b: str, z: float, p: float) -> None:
    y, markers = asah
    res = delong_paired(y, markers[a], markers[b])
    assert res.z == pytest.approx(z, abs=TOL)
    assert res.p == pytest.approx(p, abs=TOL)
    assert (res.auroc_a, res.auroc_b) == pytest.approx((PROC_AUC[a], PROC_AUC[b]), abs=TOL)
    assert (res.var_a, res.var_b) == pytest.approx((PROC_VAR[a], PROC_VAR[b]), abs=TOL)
    assert res.diff == pytest.approx(PROC_AUC[a] - PROC_AUC[b], abs=TOL)
    swapped = delong_paired(y, markers[b], markers[a])
    assert swapped.z == pytest.approx(-res.z, abs=1e-13)
    assert swapped.p == pytest.approx(res.p, abs=1e-15)
    assert swapped.cov == pytest.approx(res.cov, abs=1e-16)
    assert swapped.diff_ci == pytest.approx((-res.diff_ci[1], -res.diff_ci[0]), abs=1e-15)


def test_paired_ci_of_difference_matches_proc(asah) -> None:
    y, markers = asah
    res = delong_paired(y, markers["wfns"], markers["s100b"])
    assert res.diff_ci == pytest.approx(PROC_CI_WFNS_S100B, abs=TOL)
    assert res.ci_level == 0.95
    narrow = delong_paired(y, markers["wfns"], markers["s100b"], ci_level=0.5)
    assert narrow.diff_ci[1] - narrow.diff_ci[0] < res.diff_ci[1] - res.diff_ci[0]


def test_ties_on_wfns_count_half(asah) -> None:
    y, markers = asah
    w = markers["wfns"]
    pos, neg = w[y == 1], w[y == 0]
    strict = (pos[:, None] > neg[None, :]).mean()
    with_half = strict + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert strict == pytest.approx(0.747, abs=5e-4)  # what a tie-blind count gives (aSAH.md)
    assert delong_auroc(y, w).auroc == pytest.approx(with_half, abs=1e-15)
    assert delong_auroc(y, w).auroc == pytest.approx(0.8236788617886179, abs=TOL)


def test_identical_and_rank_equivalent_predictors_give_z0_p1(asah) -> None:
    y, markers = asah
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 0/0 RuntimeWarning
        for other in (markers["s100b"], np.exp(3 * markers["s100b"]) + 7):
            res = delong_paired(y, markers["s100b"], other)
            assert (res.z, res.p, res.diff) == (0.0, 1.0, 0.0)
            assert res.diff_ci[0] == pytest.approx(0.0, abs=1e-12)
            assert res.diff_ci[1] == pytest.approx(0.0, abs=1e-12)


def test_class_midranks_equal_scipy_rankdata() -> None:
    rng = np.random.default_rng(0)
    for score in (rng.normal(size=500), rng.integers(0, 7, size=500).astype(float), np.round(rng.normal(size=500), 1)):
        is_pos = rng.random(500) < 0.35
        t_z, t_x, t_y = class_midranks(score, is_pos)
        np.testing.assert_array_equal(t_z, rankdata(score, method="average"))
        np.testing.assert_array_equal(t_x, rankdata(score[is_pos], method="average"))
        np.testing.assert_array_equal(t_y, rankdata(score[~is_pos], method="average"))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fast_delong_matches_bruteforce_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 300
    y = (rng.random(n) < 0.4).astype(int)
    a = np.round(rng.normal(size=n) + y, 1)  # ties within and across classes
    b = rng.integers(0, 5, size=n) + 0.7 * y
    auc, s = brute_delong(y, np.stack([a, b]))
    res = delong_paired(y, a, b)
    assert (res.auroc_a, res.auroc_b) == pytest.approx(tuple(auc), abs=1e-14)
    assert (res.var_a, res.var_b, res.cov) == pytest.approx((s[0, 0], s[1, 1], s[0, 1]), abs=1e-15)
    assert res.auroc_a == pytest.approx(roc_auc_score(y, a), abs=1e-14)
    z = (auc[0] - auc[1]) / np.sqrt(s[0, 0] + s[1, 1] - 2 * s[0, 1])
    assert res.z == pytest.approx(z, abs=1e-12)
    assert res.p == pytest.approx(2 * norm.sf(abs(z)), abs=1e-14)


def test_single_auc_ci_is_clipped_to_unit_interval() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    s = np.array([0.1, 0.2, 0.3, 0.8, 0.9, 0.7, 0.25, 0.95])  # perfect separation
    res = delong_auroc(y, s)
    assert res.auroc == 1.0
    assert res.ci[1] == 1.0 and 0.0 <= res.ci[0] <= 1.0


@pytest.mark.parametrize("y,score,match", [
    ([0, 1, 0, 1], [0.1, np.nan, 0.3, 0.4], "non-finite"),
    ([0, 1, 0, 1], [0.1, np.inf, 0.3, 0.4], "non-finite"),
    ([0, 1, 0, 1], [0.1, 0.2, 0.3], "length mismatch"),
    ([0, 2, 0, 1], [0.1, 0.2, 0.3, 0.4], r"binary.*\[2\]"),
    ([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4], "no positives"),
    ([1, 1, 1, 1], [0.1, 0.2, 0.3, 0.4], "no negatives"),
    ([0, 1, 0, 0], [0.1, 0.2, 0.3, 0.4], "2 positives"),
])
def test_invalid_inputs_raise(y, score, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        delong_auroc(np.array(y), np.array(score))
    with pytest.raises(ValueError, match=match):
        delong_paired(np.array(y), np.array(score), np.array(score))


def test_invalid_ci_level_raises() -> None:
    y, s = np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="1.5"):
        delong_auroc(y, s, ci_level=1.5)
    with pytest.raises(ValueError, match="0"):
        delong_paired(y, s, s, ci_level=0.0)
