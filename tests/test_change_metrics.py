"""Directional change metrics, the lesion bootstrap, baselines and the seed-sweep t interval, each against a slow
or independent reference (sklearn, brute-force threshold sweeps, per-pixel SSIM loops, scipy's t interval)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score

from covtoken.eval.bootstrap import clustered_bootstrap_auroc
from covtoken.eval.change_baselines import gaussian_window, pair_pixel_scores, pixel_l2, ssim
from covtoken.eval.change_metrics import (auprc_w, auroc_w, eer_threshold, eer_w, fpr_at_tpr_w, lesion_bootstrap,
                                          t_interval)
from covtoken.record import dumps_strict


def pairs_data(seed: int, n: int = 80, ties: bool = True):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.45
    y[:2] = [True, False]
    s = rng.normal(size=n) + 0.9 * y
    if ties:
        s = np.round(s, 1)
    w = rng.integers(0, 4, size=(4, n)).astype(float)
    w[:, :2] = 1.0  # every weighted sample keeps both classes
    return y, s, w


def brute_roc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC vertices by the definition: for every threshold t, call 'changing' when score >= t."""
    thresholds = [math.inf] + sorted(set(s.tolist()), reverse=True)
    p, n = w[y].sum(), w[~y].sum()
    tpr = np.array([w[y & (s >= t)].sum() / p for t in thresholds])
    fpr = np.array([w[~y & (s >= t)].sum() / n for t in thresholds])
    return tpr, fpr


def brute_eer(y, s, w) -> float:
    """Dense walk along every ROC segment; the EER is where FPR and FNR meet."""
    tpr, fpr = brute_roc(y, s, w)
    best, eer = math.inf, None
    for k in range(1, tpr.size):
        t = np.linspace(0.0, 1.0, 4001)
        f = fpr[k - 1] + t * (fpr[k] - fpr[k - 1])
        fn = 1.0 - (tpr[k - 1] + t * (tpr[k] - tpr[k - 1]))
        i = int(np.argmin(np.abs(f - fn)))
        if abs(f[i] - fn[i]) < best:
            best, eer = abs(f[i] - fn[i]), (f[i] + fn[i]) / 2
    return float(eer)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_auprc_match_sklearn_with_weights_and_ties(seed):
    y, s, w = pairs_data(seed)
    a, p = auroc_w(y, s, w), auprc_w(y, s, w)
    for b in range(w.shape[0]):
        assert a[b] == pytest.approx(roc_auc_score(y, s, sample_weight=w[b]), abs=1e-12)
        assert p[b] == pytest.approx(average_precision_score(y, s, sample_weight=w[b]), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 3, 4])
def test_eer_and_fpr_at_tpr_match_brute_force(seed):
    y, s, w = pairs_data(seed)
    e, f = eer_w(y, s, w), fpr_at_tpr_w(y, s, w, 0.8)
    for b in range(w.shape[0]):
        assert e[b] == pytest.approx(brute_eer(y, s, w[b]), abs=5e-4)
        tpr, fpr = brute_roc(y, s, w[b])
        assert f[b] == pytest.approx(fpr[tpr >= 0.8].min(), abs=1e-12)


def test_auroc_is_directional_and_eer_stays_finite():
    y = np.array([1, 1, 1, 0, 0, 0], bool)
    good = np.array([3.0, 2.5, 2.0, 1.0, 0.5, 0.0])
    one = np.ones((1, 6))
    assert auroc_w(y, good, one)[0] == 1.0 and auroc_w(y, -good, one)[0] == 0.0  # inverted is reported, not flipped
    assert eer_w(y, good, one)[0] == 0.0 and eer_w(y, -good, one)[0] == 1.0
    assert eer_w(y, np.zeros(6), one)[0] == pytest.approx(0.5)
    assert fpr_at_tpr_w(y, -good, one, 0.8)[0] == 1.0
    for scores in (good, -good, np.zeros(6)):
        eer, thr = eer_threshold(y, scores)
        assert math.isfinite(eer) and math.isfinite(thr) and thr in scores
        dumps_strict({"eer": eer, "threshold": thr})  # strict JSON: no Infinity anywhere


def test_lesion_bootstrap_uses_the_clustered_auroc_draws_and_ignores_pair_multiplicity():
    rng = np.random.default_rng(5)
    clusters = np.repeat(np.arange(30), 4)
    y = (rng.random(120) < 0.4).astype(int)
    a, b = rng.normal(size=120) + y, rng.normal(size=120) + 0.3 * y
    got = lesion_bootstrap(y, {"a": a, "b": b}, clusters, metrics=["auroc", "eer"], n_boot=300, seed=9)
    ref = clustered_bootstrap_auroc(y, [a, b], clusters, n_boot=300, seed=9)
    np.testing.assert_allclose(got["a"]["auroc"][1:], ref.samples[:, 0], atol=1e-12)
    np.testing.assert_allclose(got["b"]["auroc"][1:], ref.samples[:, 1], atol=1e-12)
    assert got["a"]["auroc"][0] == pytest.approx(roc_auc_score(y, a))
    # every pair duplicated inside its lesion cluster: the same resamples, so the same interval (a pair-level
    # bootstrap would narrow it)
    dup = lesion_bootstrap(np.repeat(y, 2), {"a": np.repeat(a, 2)}, np.repeat(clusters, 2), metrics=["auroc"],
                           n_boot=300, seed=9)
    np.testing.assert_allclose(dup["a"]["auroc"], got["a"]["auroc"], atol=1e-12)
    with pytest.raises(ValueError, match="unknown metric"):
        lesion_bootstrap(y, {"a": a}, clusters, metrics=["accuracy"], n_boot=10, seed=0)


def test_t_interval_recomputes_the_dermajepa_seed_sweep():
    # DermaJEPA reports 0.9435 +/- 0.0029 (sd) over 5 seeds with CI [0.9409, 0.9461]: half-width 0.0026, which is
    # 1.96 sd / sqrt(5) = 0.00254 (up to the rounding of the reported mean and sd), not the t-based 0.00360.
    reported_half = (0.9461 - 0.9409) / 2
    z_half = 1.959964 * 0.0029 / math.sqrt(5)
    ti = t_interval(mean=0.9435, sd=0.0029, n=5)
    t_half = (ti.ci[1] - ti.ci[0]) / 2
    assert abs(reported_half - z_half) < 1e-4 < abs(reported_half - t_half)
    assert ti.t_crit == pytest.approx(2.776445, abs=1e-6)
    assert ti.ci[0] == pytest.approx(0.939899, abs=1e-6) and ti.ci[1] == pytest.approx(0.947101, abs=1e-6)
    assert (round(ti.ci[0], 4), round(ti.ci[1], 4)) == (0.9399, 0.9471)
    assert (ti.ci[1] - ti.ci[0]) / (2 * z_half) == pytest.approx(2.776445 / 1.959964, rel=1e-5)  # ~42% wider
    values = [0.91, 0.95, 0.93, 0.94, 0.92]
    got = t_interval(values, level=0.9)
    want = stats.t.interval(0.9, df=4, loc=np.mean(values), scale=stats.sem(values))
    assert got.ci == pytest.approx(want, abs=1e-12) and got.sd == pytest.approx(np.std(values, ddof=1))
    with pytest.raises(ValueError, match="at least 2"):
        t_interval([0.9])


def slow_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM by the definition: a Gaussian-weighted window at every valid position, pixel by pixel."""
    g1 = np.exp(-np.arange(-5, 6) ** 2 / (2 * 1.5 ** 2))
    g = np.outer(g1, g1) / np.outer(g1, g1).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    per_channel = []
    for c in range(a.shape[2]):
        vals = []
        for i in range(5, a.shape[0] - 5):
            for j in range(5, a.shape[1] - 5):
                x, y = a[i - 5:i + 6, j - 5:j + 6, c], b[i - 5:i + 6, j - 5:j + 6, c]
                mx, my = (g * x).sum(), (g * y).sum()
                vx, vy = (g * (x - mx) ** 2).sum(), (g * (y - my) ** 2).sum()
                cxy = (g * (x - mx) * (y - my)).sum()
                vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
        per_channel.append(np.mean(vals))
    return float(np.mean(per_channel))


def test_ssim_matches_the_slow_definition_and_pixel_l2_is_rms():
    rng = np.random.default_rng(0)
    a = rng.random((19, 23, 3))
    b = np.clip(a + 0.2 * rng.normal(size=a.shape), 0, 1)
    assert ssim(a, b) == pytest.approx(slow_ssim(a, b), abs=1e-10)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert gaussian_window().size == 11 and gaussian_window().sum() == pytest.approx(1.0)
    assert pixel_l2(a, b) == pytest.approx(np.sqrt(((a - b) ** 2).mean()))
    scores = pair_pixel_scores([a, a[:, :, 0]], [b, np.zeros((30, 30))], size=16)
    assert scores["ssim_distance"][0] == pytest.approx(1 - slow_ssim(a, b), abs=1e-10)
    assert scores["pixel_l2"].shape == (2,) and np.isfinite(scores["pixel_l2"]).all()
    with pytest.raises(ValueError, match="smaller than"):
        ssim(a[:8, :8], b[:8, :8])
