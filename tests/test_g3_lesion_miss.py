"""Keep sets and lesion-miss statistics against slow, obvious references.

References: per-lesion Python loops for best ranks and retention; ``math.comb`` and a Monte Carlo draw for
the random-keep miss probability; resamples materialised lesion by lesion (same cluster counts) for the
clustered rate and median bootstraps.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from covtoken.eval.bootstrap import draw_cluster_counts, encode_clusters
from covtoken.eval.lesion_miss import (LesionSet, best_rank, clustered_median_bootstrap, clustered_rate_bootstrap,
                                       random_miss_probability, retained_by, select_lowest_miss)
from covtoken.gate.keep import keep_count, token_ranks, topk_keep


def test_keep_count_and_ranks_with_ties():
    assert [keep_count(64, r) for r in (0.1, 0.3, 0.5, 1.0)] == [7, 20, 32, 64]
    assert keep_count(10, 0.3) == 3  # 0.3 * 10 is 3.0000000000000004 in floating point
    with pytest.raises(ValueError, match="keep rate"):
        keep_count(64, 0.0)
    scores = np.array([[0.5, 2.0, 2.0, -1.0], [1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_array_equal(token_ranks(scores), [[2, 0, 1, 3], [0, 1, 2, 3]])
    np.testing.assert_array_equal(topk_keep(scores, np.array([1, 3])), [[0, 1, 0, 0], [1, 1, 1, 0]])
    with pytest.raises(ValueError, match="non-finite"):
        token_ranks(np.array([[0.0, np.nan]]))


def _random_lesions(rng: np.random.Generator, n_img: int, n_tok: int) -> LesionSet:
    comps, patients = [], []
    for i in range(n_img):
        comps.append([{"area_tokens": float(rng.uniform(0.1, 3)),
                       "tokens": np.sort(rng.choice(n_tok, size=int(rng.integers(1, 5)), replace=False))}
                      for _ in range(int(rng.integers(0, 4)))])
        patients.append(f"p{i // 3}")
    return LesionSet.from_components(comps, patients)


def test_best_rank_and_retention_match_loops():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((12, 16))
    les = _random_lesions(rng, 12, 16)
    ranks = token_ranks(scores)
    want = [min(ranks[i, t] for t in toks) for i, toks in zip(les.image, les.tokens)]
    np.testing.assert_array_equal(best_rank(ranks, les), want)
    keep = topk_keep(scores, 5)
    np.testing.assert_array_equal(retained_by(keep, les), [keep[i, toks].any() for i, toks in zip(les.image, les.tokens)])
    np.testing.assert_array_equal(retained_by(keep, les), best_rank(ranks, les) < 5)  # two routes, one answer
    small = les.select(les.area <= 1.0)
    assert len(small) == int((les.area <= 1.0).sum()) and (small.area <= 1.0).all()


def test_random_miss_probability_exact_and_monte_carlo():
    n, t, k = 20, np.array([1, 2, 5, 16]), np.array([3, 7, 10, 5])
    want = [math.comb(n - ti, ki) / math.comb(n, ki) for ti, ki in zip(t, k)]
    np.testing.assert_allclose(random_miss_probability(n, t, k), want, rtol=1e-10)
    assert random_miss_probability(n, np.array([16]), 5)[0] == 0.0  # more kept tokens than free ones
    rng = np.random.default_rng(1)
    draws = np.array([rng.permutation(n)[:7] for _ in range(20000)])
    mc = np.mean(~np.isin(draws, [0, 1]).any(axis=1))  # lesion touching tokens 0 and 1
    assert mc == pytest.approx(random_miss_probability(n, np.array([2]), 7)[0], abs=0.01)


def test_clustered_rate_bootstrap_matches_materialised_resamples():
    rng = np.random.default_rng(2)
    les = _random_lesions(rng, 30, 16)
    events = rng.random((3, len(les))) < np.array([[0.2], [0.5], [0.8]])
    rb = clustered_rate_bootstrap(events, les, n_boot=200, ci_level=0.9, seed=7)
    ids, idx = encode_clusters(les.patient, len(les))
    counts = draw_cluster_counts([np.arange(ids.size)], ids.size, 200, 7)
    for b in range(0, 200, 37):
        take = np.repeat(np.arange(len(les)), counts[b, idx])  # every lesion as often as its patient was drawn
        np.testing.assert_allclose(rb.samples[b], events[:, take].mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(rb.value, events.mean(axis=1))
    lo, hi = rb.ci(0)
    assert lo <= rb.value[0] <= hi and rb.n["lesions"] == len(les) and rb.n["patients"] == ids.size
    d, (dlo, dhi) = rb.diff(2, 0)
    assert dlo > 0 and d == pytest.approx(rb.value[2] - rb.value[0])
    with pytest.raises(ValueError, match="lesions per arm"):
        clustered_rate_bootstrap(events[:, 1:], les, n_boot=10, ci_level=0.9, seed=0)


def test_clustered_median_bootstrap_matches_materialised_resamples():
    rng = np.random.default_rng(3)
    values = rng.standard_normal(40)
    patients = np.repeat([f"p{i}" for i in range(10)], 4)
    med, (lo, hi), n = clustered_median_bootstrap(values, patients, n_boot=300, ci_level=0.9, seed=5)
    assert med == pytest.approx(np.median(values)) and lo <= med <= hi and n["patients"] == 10
    ids, idx = encode_clusters(patients, 40)
    counts = draw_cluster_counts([np.arange(10)], 10, 300, 5)
    naive = []
    for b in range(300):
        v = np.sort(np.repeat(values, counts[b, idx]))
        naive.append(v[(v.size - 1) // 2])  # lower median
    want = np.quantile(naive, [0.05, 0.95])
    assert (lo, hi) == pytest.approx(tuple(want), abs=1e-12)


def test_select_lowest_miss_rule():
    ranks = {"A_gauss@2": np.array([0, 9, 9]), "B_pca@1": np.array([0, 9, 9]), "A_knn@0": np.array([9, 9, 9])}
    arm, miss = select_lowest_miss(ranks, k=5)
    assert arm == "B_pca@1" and miss["A_knn@0"] == 1.0  # tie on miss rate -> lower block
