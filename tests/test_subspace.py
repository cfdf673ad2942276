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
    np.testing.assert_allclose(g.score(q), ref, rtol=2e-6)  # float64 fit, float32 scoring
    assert 0.0 <= g.shrinkage_ <= 1.0
    assert not np.array_equal(g.score(q), ref)  # it really is float32 arithmetic (the bench measures its cost)


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
    resid = qc - (qc @ p.components_.T) @ p.components_  # float64 reference, residual formed directly
    ref = (resid ** 2).sum(1)
    np.testing.assert_allclose(r.score(q), ref, rtol=2e-5, atol=1e-6)
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


def test_pca_residual_without_a_full_basis_uses_the_projector():
    rng = np.random.default_rng(4)
    fit = rng.standard_normal((10, 24))  # fewer tokens than dimensions: the complement is not spanned
    q = rng.standard_normal((30, 24))
    r = PCAResidual(explained_variance=0.7).fit(fit)
    qc = q - fit.mean(0)
    ref = ((qc - (qc @ r.components_) @ r.components_.T) ** 2).sum(1)
    np.testing.assert_allclose(r.score(q), ref, rtol=2e-5)


def test_float32_scoring_keeps_a_small_residual_far_from_the_mean():
    """The residual is formed directly: a token 1e3 along the subspace and 1e-1 off it keeps its residual."""
    rng = np.random.default_rng(5)
    basis = np.linalg.qr(rng.standard_normal((32, 32)))[0]
    fit = (rng.standard_normal((2000, 4)) * 10) @ basis[:, :4].T + 1e-3 * rng.standard_normal((2000, 32))
    r = PCAResidual(explained_variance=0.99).fit(fit)
    assert r.k == 4
    x = (fit.mean(0) + 1e3 * basis[:, 0] + 0.1 * basis[:, 9])[None]
    xc = x.astype(np.float32).astype(np.float64) - r.mean_
    ref = ((xc - (xc @ r.components_) @ r.components_.T) ** 2).sum(1)  # float64, same fit
    np.testing.assert_allclose(r.score(x), ref, rtol=1e-3)
    # the attack: the difference of two float32 norms (~1e6 each) loses the 1e-2 residual entirely
    x32, c32 = xc.astype(np.float32), r.components_.astype(np.float32)
    naive = (x32 ** 2).sum(1) - ((x32 @ c32) ** 2).sum(1)
    assert abs(naive[0] - ref[0]) > 10 * abs(r.score(x)[0] - ref[0])


def test_scores_are_computed_in_row_blocks_without_losing_a_row(tokens, monkeypatch):
    """Blocks of SCORE_ROWS rows (here 7: seven whole blocks and a partial one of 1 row) give every token its own
    score, in order, and a NaN token in the partial last block is still counted."""
    from covtoken.subspace import density

    fit, q = tokens
    g, p = GaussianDensity().fit(fit), PCAResidual(explained_variance=0.8).fit(fit)
    whole = g.score(q), p.score(q)
    monkeypatch.setattr(density, "SCORE_ROWS", 7)
    np.testing.assert_allclose(g.score(q), whole[0], rtol=1e-6)
    np.testing.assert_allclose(p.score(q), whole[1], rtol=1e-6, atol=1e-6 * whole[1].max())
    np.testing.assert_allclose(g.score(q[::-1]), whole[0][::-1], rtol=1e-6)  # row i's score is row i's
    bad = q.copy()
    bad[-1, 0] = np.nan
    with pytest.raises(ValueError, match="1 token"):
        g.score(bad)
