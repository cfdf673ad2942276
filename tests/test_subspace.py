"""Subspace constructions against slow, obvious references, and their failure modes."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist, mahalanobis
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA

from covtoken.subspace import CONSTRUCTIONS, GaussianDensity, KNNDensity, PCAResidual, build_scorer, score_blocks


@pytest.fixture
def tokens():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 12)) @ rng.standard_normal((12, 12))
    q = rng.standard_normal((50, 12)) * 2
    return a, q


def test_gaussian_matches_scipy_mahalanobis(tokens):
    fit, q = tokens
    g = GaussianDensity().fit(fit)
    lw = LedoitWolf().fit(fit)
    prec = np.linalg.inv(lw.covariance_)
    ref = np.array([mahalanobis(x, lw.location_, prec) ** 2 for x in q])
    np.testing.assert_allclose(g.score(q), ref, rtol=1e-9)
    assert 0.0 <= g.shrinkage_ <= 1.0


def test_knn_matches_brute_force(tokens):
    fit, q = tokens
    d = cdist(q, fit)
    ref = np.sort(d, axis=1)[:, :5].mean(axis=1)
    np.testing.assert_allclose(KNNDensity(k=5, chunk=7).fit(fit).score(q), ref, rtol=1e-5)


def test_pca_residual_matches_sklearn(tokens):
    fit, q = tokens
    r = PCAResidual(explained_variance=0.8).fit(fit)
    p = PCA(n_components=r.k).fit(fit)
    qc = q - p.mean_
    ref = (qc ** 2).sum(1) - ((qc @ p.components_.T) ** 2).sum(1)
    np.testing.assert_allclose(r.score(q), ref, rtol=1e-6, atol=1e-8)
    ev = np.cumsum(p.explained_variance_ratio_)
    assert ev[-1] >= 0.8 and (r.k == 1 or ev[-2] < 0.8)  # smallest k reaching the target


def test_off_subspace_token_scores_highest():
    rng = np.random.default_rng(1)
    basis = rng.standard_normal((3, 16))
    fit = rng.standard_normal((500, 3)) @ basis + 0.01 * rng.standard_normal((500, 16))
    normal = rng.standard_normal((20, 3)) @ basis
    odd = normal[:1] + 3.0 * rng.standard_normal((1, 16))
    q = np.vstack([normal, odd])
    for name in CONSTRUCTIONS:
        s = build_scorer(name).fit(fit).score(q)
        assert np.argmax(s) == len(q) - 1, name


@pytest.mark.parametrize("bad", [np.full((3, 4), np.nan), np.zeros((0, 4)), np.zeros(4)])
def test_bad_tokens_fail_clearly(bad):
    with pytest.raises(ValueError, match="tokens"):
        GaussianDensity().fit(bad)


def test_nan_query_token_is_named():
    fit = np.random.default_rng(0).standard_normal((50, 4))
    q = fit[:3].copy()
    q[1, 2] = np.nan
    with pytest.raises(ValueError, match="1 token"):
        PCAResidual().fit(fit).score(q)


def test_unknown_construction_lists_choices():
    with pytest.raises(KeyError, match="A_gauss"):
        build_scorer("nope")


def test_score_blocks_refuses_overlapping_fit_and_score_rows():
    toks = np.random.default_rng(0).standard_normal((6, 4, 3))
    with pytest.raises(ValueError, match="overlap"):
        score_blocks(lambda b, r: toks[r], blocks=[0], constructions=["A_gauss"], fit_rows=np.array([0, 1, 2]),
                     score_rows=np.array([2, 3]), params={}, seed=0, max_fit_tokens=100)
