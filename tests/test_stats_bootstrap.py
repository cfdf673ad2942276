"""Clustered bootstrap (covtoken.eval.bootstrap) against a slow reference that materialises every resample."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from covtoken.eval.bootstrap import clustered_bootstrap_auroc, draw_cluster_counts, spearman_with_ci
from covtoken.eval.rank import WeightedAUROC, WeightedSpearman


def make_tokens(seed: int = 0, n_patients: int = 30, pos_patients: int | None = None):
    """Token-level data: variable tokens per patient, patient effects, heavy ties in both arms."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(3, 40, size=n_patients)
    pid = np.repeat(np.array([f"P{i:03d}" for i in range(n_patients)]), sizes)
    has_lesion = rng.random(n_patients) < 0.5
    if pos_patients is not None:
        has_lesion = np.arange(n_patients) < pos_patients
    lesion = np.repeat(has_lesion, sizes)
    y = (lesion & (rng.random(pid.size) < 0.3)).astype(np.int64)
    effect = np.repeat(rng.normal(size=n_patients), sizes)
    a = np.round(effect + 1.2 * y + rng.normal(size=pid.size), 1)
    b = rng.integers(0, 6, size=pid.size) + 1.0 * y + np.round(effect)
    return y, a, b, pid


def reference_counts(y: np.ndarray, pid: np.ndarray, n_boot: int, seed: int, stratify: bool = True):
    """Cluster ids, token->cluster index and the draw counts, strata rebuilt here from the raw labels."""
    ids, idx = np.unique(pid, return_inverse=True)
    has_pos = np.array([y[idx == k].any() for k in range(ids.size)])
    strata = [np.flatnonzero(has_pos), np.flatnonzero(~has_pos)] if stratify else [np.arange(ids.size)]
    return idx, has_pos, draw_cluster_counts(strata, ids.size, n_boot, seed)


def materialised_auc(y, score, idx, counts_row) -> float:
    rep = counts_row[idx]  # every token repeated as often as its patient was drawn
    return roc_auc_score(np.repeat(y, rep), np.repeat(score, rep))


def test_resamples_equal_materialised_sklearn() -> None:
    y, a, b, pid = make_tokens(0)
    res = clustered_bootstrap_auroc(y, [a, b], pid, n_boot=12, seed=7)
    idx, has_pos, counts = reference_counts(y, pid, 12, 7)
    assert counts.shape == (12, 30)
    ref = np.array([[materialised_auc(y, s, idx, row) for s in (a, b)] for row in counts])
    np.testing.assert_allclose(res.samples, ref, rtol=0, atol=1e-12)
    assert np.ptp(res.samples[:, 0]) > 0.01  # resamples really differ
    assert res.auroc == pytest.approx((roc_auc_score(y, a), roc_auc_score(y, b)), abs=1e-12)
    assert (res.n_clusters, res.n_pos, res.n_neg) == (30, int(y.sum()), int((1 - y).sum()))
    assert res.method == "patient-clustered class-stratified paired percentile bootstrap"


@pytest.mark.parametrize("route", ["direct", "bilinear"])
@pytest.mark.parametrize("max_bytes", [1, 4096, 200 * 2**20])
def test_kernel_routes_and_chunking_are_exact(route: str, max_bytes: int) -> None:
    y, a, _, pid = make_tokens(3)
    idx, _, counts = reference_counts(y, pid, 9, 11)
    got = WeightedAUROC(y == 1, a, idx, counts.shape[1]).auroc(counts, route=route, max_bytes=max_bytes)
    ref = [materialised_auc(y, a, idx, row) for row in counts]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    with_weights = [roc_auc_score(y, a, sample_weight=row[idx]) for row in counts]  # second, unrelated path
    np.testing.assert_allclose(got, with_weights, rtol=0, atol=1e-12)


def test_unit_level_data_matches_sklearn_and_single_cluster_tokens() -> None:
    rng = np.random.default_rng(5)
    y = (rng.random(200) < 0.3).astype(int)
    s = rng.integers(0, 4, 200) + y  # massive ties
    res = clustered_bootstrap_auroc(y, s, np.arange(200), n_boot=5, seed=1)
    idx, _, counts = reference_counts(y, np.arange(200), 5, 1)
    ref = [materialised_auc(y, s, idx, row) for row in counts]
    np.testing.assert_allclose(res.samples[:, 0], ref, rtol=0, atol=1e-12)
    assert res.diff is None and res.diff_ci is None and res.samples.shape == (5, 1)
    assert res.method == "patient-clustered class-stratified percentile bootstrap"


def test_paired_difference_uses_the_same_resamples() -> None:
    y, a, b, pid = make_tokens(1)
    two = clustered_bootstrap_auroc(y, np.stack([a, b]), pid, n_boot=300, seed=3)
    only_b = clustered_bootstrap_auroc(y, b, pid, n_boot=300, seed=3)
    np.testing.assert_array_equal(two.samples[:, 1], only_b.samples[:, 0])  # same draw for every arm
    d = two.samples[:, 0] - two.samples[:, 1]
    assert two.diff == pytest.approx(two.auroc[0] - two.auroc[1], abs=1e-15)
    assert two.diff_ci == pytest.approx(tuple(np.quantile(d, [0.025, 0.975])), abs=1e-15)
    assert two.ci[0] == pytest.approx(tuple(np.quantile(two.samples[:, 0], [0.025, 0.975])), abs=1e-15)
    # pairing: the difference varies less than it would for independent resamples of the two arms
    other = clustered_bootstrap_auroc(y, b, pid, n_boot=300, seed=4).samples[:, 0]
    assert np.std(d) < np.std(two.samples[:, 0] - other)


def test_stratification_keeps_positive_patients_in_every_resample() -> None:
    y, a, _, pid = make_tokens(2, n_patients=30, pos_patients=3)
    res = clustered_bootstrap_auroc(y, a, pid, n_boot=1000, seed=0)
    assert np.isfinite(res.samples).all()
    idx, has_pos, counts = reference_counts(y, pid, 1000, 0)
    assert has_pos.sum() == 3
    np.testing.assert_array_equal(counts[:, has_pos].sum(axis=1), 3)
    np.testing.assert_array_equal(counts[:, ~has_pos].sum(axis=1), 27)
    assert (counts[:, has_pos] > 0).any(axis=1).all()
    # without strata, P(no positive patient) = (27/30)**30 ~ 4% per resample: refused, not silently skipped
    with pytest.raises(ValueError, match="no positive or no negative"):
        clustered_bootstrap_auroc(y, a, pid, n_boot=1000, seed=0, stratify=False)


def test_unstratified_resamples_equal_materialised_sklearn() -> None:
    y, a, b, pid = make_tokens(4)
    res = clustered_bootstrap_auroc(y, [a, b], pid, n_boot=6, seed=2, stratify=False)
    idx, has_pos, counts = reference_counts(y, pid, 6, 2, stratify=False)
    np.testing.assert_array_equal(counts.sum(axis=1), 30)
    assert (counts[:, ~has_pos].sum(axis=1) != counts[0, ~has_pos].sum()).any()  # strata sizes float freely
    ref = np.array([[materialised_auc(y, s, idx, row) for s in (a, b)] for row in counts])
    np.testing.assert_allclose(res.samples, ref, rtol=0, atol=1e-12)
    assert res.method == "patient-clustered paired percentile bootstrap"


def test_deterministic_under_seed_and_prefix_stable() -> None:
    y, a, b, pid = make_tokens(6)
    r1 = clustered_bootstrap_auroc(y, [a, b], pid, n_boot=100, seed=42)
    r2 = clustered_bootstrap_auroc(y, [a, b], pid, n_boot=100, seed=42)
    r3 = clustered_bootstrap_auroc(y, [a, b], pid, n_boot=100, seed=43)
    np.testing.assert_array_equal(r1.samples, r2.samples)
    assert r1.ci == r2.ci and r1.diff_ci == r2.diff_ci
    assert not np.array_equal(r1.samples, r3.samples)
    short = clustered_bootstrap_auroc(y, [a, b], pid, n_boot=10, seed=42)
    np.testing.assert_array_equal(short.samples, r1.samples[:10])


def _width(res) -> float:
    return res.ci[0][1] - res.ci[0][0]


def test_clustering_matters_duplicated_tokens_do_not_shrink_the_ci() -> None:
    rng = np.random.default_rng(8)
    n_pat, copies = 60, 50
    y1 = (rng.random(n_pat) < 0.4).astype(int)
    s1 = rng.normal(size=n_pat) + 1.0 * y1
    one = clustered_bootstrap_auroc(y1, s1, np.arange(n_pat), n_boot=500, seed=0)
    y50, s50, pid50 = np.repeat(y1, copies), np.repeat(s1, copies), np.repeat(np.arange(n_pat), copies)
    dup = clustered_bootstrap_auroc(y50, s50, pid50, n_boot=500, seed=0)
    # 50 identical copies carry no extra information: same resampled AUROCs, same interval
    np.testing.assert_allclose(dup.samples, one.samples, rtol=0, atol=1e-12)
    assert _width(dup) == pytest.approx(_width(one), abs=1e-12)
    # a token-level bootstrap of the copies pretends to have 50x the data: ~sqrt(50) = 7x too narrow
    naive = clustered_bootstrap_auroc(y50, s50, np.arange(y50.size), n_boot=500, seed=0)
    assert _width(naive) < 0.3 * _width(one)
    # independent tokens inside each patient do carry information: the clustered CI narrows accordingly
    s_iid = rng.normal(size=y50.size) + 1.0 * y50
    iid = clustered_bootstrap_auroc(y50, s_iid, pid50, n_boot=500, seed=0)
    iid_tokens = clustered_bootstrap_auroc(y50, s_iid, np.arange(y50.size), n_boot=500, seed=0)
    assert _width(iid) < 0.35 * _width(dup)
    assert _width(iid) == pytest.approx(_width(iid_tokens), rel=0.35)


def test_cluster_ids_of_any_hashable_type() -> None:
    y, a, _, pid = make_tokens(9)
    codes = np.unique(pid, return_inverse=True)[1]
    by_str = clustered_bootstrap_auroc(y, a, pid, n_boot=20, seed=1)
    by_int = clustered_bootstrap_auroc(y, a, codes * 7 + 3, n_boot=20, seed=1)  # same order of ids
    by_obj = clustered_bootstrap_auroc(y, a, pid.astype(object), n_boot=20, seed=1)
    np.testing.assert_array_equal(by_str.samples, by_int.samples)
    np.testing.assert_array_equal(by_str.samples, by_obj.samples)
    mixed = np.array([1 if p == "P000" else p for p in pid.tolist()], dtype=object)  # unorderable mix
    assert clustered_bootstrap_auroc(y, a, mixed, n_boot=20, seed=1).n_clusters == 30


@pytest.mark.parametrize("kwargs,match", [
    ({"scores": "nan"}, "non-finite"),
    ({"scores": "inf"}, "non-finite"),
    ({"scores": "short"}, "length mismatch"),
    ({"clusters": "short"}, "length mismatch"),
    ({"y": "three"}, r"binary.*\[3\]"),
    ({"y": "zeros"}, "no positives"),
    ({"y": "ones"}, "no negatives"),
    ({"n_boot": 0}, "n_boot"),
    ({"ci_level": 1.0}, "ci_level"),
    ({"seed": -1}, "seed"),
    ({"clusters": "one"}, "at least 2 clusters"),
    ({"scores": "3d"}, "shape"),
    ({"scores": "empty"}, "empty"),
])
def test_invalid_inputs_raise(kwargs: dict, match: str) -> None:
    y, a, b, pid = make_tokens(0)
    args = {"y": y, "scores": [a, b], "clusters": pid}
    special = {
        ("scores", "nan"): [a, np.where(np.arange(a.size) == 5, np.nan, b)],
        ("scores", "inf"): np.where(np.arange(a.size) == 2, np.inf, a),
        ("scores", "short"): [a, b[:-1]],
        ("clusters", "short"): pid[1:],
        ("clusters", "one"): np.zeros(pid.size, dtype=int),
        ("y", "three"): np.where(np.arange(y.size) == 0, 3, y),
        ("y", "zeros"): np.zeros_like(y),
        ("y", "ones"): np.ones_like(y),
        ("scores", "3d"): a.reshape(1, 1, -1),
        ("scores", "empty"): [],
    }
    opts = {}
    for key, val in kwargs.items():
        if key in args:
            args[key] = special[(key, val)]
        else:
            opts[key] = val
    with pytest.raises(ValueError, match=match):
        clustered_bootstrap_auroc(args["y"], args["scores"], args["clusters"], **{"n_boot": 5, **opts})


def test_spearman_point_estimate_matches_published_fixture() -> None:
    res = spearman_with_ci([1, 2, 3, 4, 5], [5, 6, 7, 8, 7], n_boot=200, seed=0)
    assert res.rho == pytest.approx(0.8207826816681233, abs=1e-14)
    assert res.p == pytest.approx(0.0885870053135438, abs=1e-14)
    assert res.samples.shape == (200,) and res.method == "iid percentile bootstrap"
    # 5 points: some resamples repeat one y value only (rho undefined); they are counted, not hidden
    undefined = np.isnan(res.samples)
    assert res.n_undefined == int(undefined.sum()) > 0
    assert res.ci == pytest.approx(tuple(np.quantile(res.samples[~undefined], [0.025, 0.975])), abs=1e-12)


@pytest.mark.parametrize("clustered", [False, True])
def test_spearman_resamples_equal_materialised_spearmanr(clustered: bool) -> None:
    rng = np.random.default_rng(12)
    n_pat = 25
    sizes = rng.integers(1, 8, n_pat)
    pid = np.repeat(np.arange(n_pat), sizes)
    x = np.round(rng.normal(size=pid.size) + np.repeat(rng.normal(size=n_pat), sizes), 1)
    y = rng.integers(0, 5, pid.size) + x  # ties in both variables
    clusters = pid if clustered else None
    res = spearman_with_ci(x, y, clusters, n_boot=15, seed=4)
    ref_rho = spearmanr(x, y)
    assert (res.rho, res.p) == pytest.approx((ref_rho.statistic, ref_rho.pvalue), abs=1e-14)
    units = pid if clustered else np.arange(pid.size)
    k = np.unique(units).size
    counts = draw_cluster_counts([np.arange(k)], k, 15, 4)
    ref = [spearmanr(np.repeat(x, row[units]), np.repeat(y, row[units])).statistic for row in counts]
    np.testing.assert_allclose(res.samples, ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(WeightedSpearman(x, y, units, k).rho(counts, max_bytes=1), ref, rtol=0, atol=1e-12)
    assert res.n_clusters == k and res.n_undefined == 0


def test_spearman_ci_covers_and_validates() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=300)
    y = x + rng.normal(size=300)
    res = spearman_with_ci(x, y, n_boot=500, seed=1)
    assert res.ci[0] < res.rho < res.ci[1] and res.ci[1] - res.ci[0] < 0.25
    with pytest.raises(ValueError, match="constant"):
        spearman_with_ci(np.ones(10), np.arange(10.0))
    with pytest.raises(ValueError, match="length mismatch"):
        spearman_with_ci(np.arange(10.0), np.arange(9.0))
    with pytest.raises(ValueError, match="non-finite"):
        spearman_with_ci(np.r_[np.arange(9.0), np.nan], np.arange(10.0))
    with pytest.raises(ValueError, match="at least 2 clusters, got 1"):
        spearman_with_ci(np.arange(6.0), np.arange(6.0), clusters=[0, 0, 0, 0, 0, 0], n_boot=20)
    xs = np.array([1.0, 1.0, 2.0, 2.0, 3.0, 3.0])  # constant within a cluster: 1 in 9 resamples has no rho
    three = spearman_with_ci(xs, 2 * xs, clusters=[0, 0, 1, 1, 2, 2], n_boot=900)
    assert 60 < three.n_undefined < 140 and three.ci == (1.0, 1.0)
