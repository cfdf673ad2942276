"""Coverage functionals against their definitions, and the mechanism behind G6's negative result.

References: RankMe's closed forms (``Z = I_d`` gives ``d``; rank 1 gives about 1) and a numpy transcription of
Garrido et al.'s formula; the coding rate against a direct ``numpy.linalg.slogdet`` of the d x d matrix (so
the n x n Gram branch is checked against the other form) and the MCR^2 code's eps convention; weights in
{0, 1} against the functional of the kept subset.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from covtoken.coverage import coding_rate, energy, evaluate, get_functional, rankme, relative_change

SLACK = 0.05  # 1 - c for the locked target c = 0.95


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def _rankme_numpy(z: np.ndarray, eps: float = 1e-7) -> float:
    s = np.linalg.svd(z, compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def _coding_rate_numpy(z: np.ndarray, eps: float) -> float:
    zh = z / np.linalg.norm(z, axis=1, keepdims=True)
    m, d = zh.shape
    sign, logdet = np.linalg.slogdet(np.eye(d) + d / (m * eps ** 2) * zh.T @ zh)
    assert sign > 0
    return 0.5 * logdet


@pytest.mark.parametrize("d", [1, 8, 64])
def test_rankme_closed_forms(d):
    value = float(rankme(torch.eye(d, dtype=torch.float64)))
    p = 1.0 / d + 1e-7  # the paper's eps shifts every p_k a little
    assert value == pytest.approx(np.exp(-d * p * np.log(p)), rel=1e-12)
    assert value == pytest.approx(d, rel=1e-4)
    u, v = np.random.default_rng(d).standard_normal((2, 40, d))
    rank1 = np.outer(u[:, 0], v[0])
    assert float(rankme(_t(rank1))) == pytest.approx(1.0, abs=0.02)


def test_rankme_matches_formula_and_subsets():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((30, 12)) * np.linspace(3, 0.1, 12)
    assert float(rankme(_t(z))) == pytest.approx(_rankme_numpy(z), rel=1e-10)
    assert float(rankme(_t(7.0 * z))) == pytest.approx(_rankme_numpy(z), rel=1e-10)  # scale-free
    keep = rng.random(30) < 0.5
    assert float(rankme(_t(z), _t(keep))) == pytest.approx(_rankme_numpy(z[keep]), rel=1e-10)
    # raw Z, not centred: a shared offset changes the value
    assert abs(float(rankme(_t(z + 5.0))) - _rankme_numpy(z)) > 0.5


@pytest.mark.parametrize("n, d", [(10, 32), (50, 16)])  # Gram branch (n < d) and d x d branch
def test_coding_rate_matches_direct_logdet(n, d):
    rng = np.random.default_rng(n)
    z = rng.standard_normal((n, d)) * rng.uniform(0.1, 3.0, size=(n, 1))  # unequal norms: normalisation matters
    for eps in (0.1, 0.5, 1.0):
        assert float(coding_rate(_t(z), eps=eps)) == pytest.approx(_coding_rate_numpy(z, eps), rel=1e-10)
    keep = np.zeros(n, bool)
    keep[rng.choice(n, n // 2, replace=False)] = True
    assert float(coding_rate(_t(z), _t(keep), eps=0.5)) == pytest.approx(_coding_rate_numpy(z[keep], 0.5), rel=1e-10)
    # scale of the raw tokens does not matter (they are normalised), their directions do
    assert float(coding_rate(_t(3 * z), eps=0.5)) == pytest.approx(float(coding_rate(_t(z), eps=0.5)), rel=1e-12)


def test_coding_rate_eps_convention_matches_mcr2_code():
    # ryanchankh/mcr2 compute_discrimn_loss_empirical(W, eps) with W (p, m): 0.5 logdet(I + p / (m * eps) W W^T),
    # i.e. its eps is our eps squared.
    rng = np.random.default_rng(1)
    z = rng.standard_normal((40, 8))
    zh = z / np.linalg.norm(z, axis=1, keepdims=True)
    w, (p, m), mcr2_eps = zh.T, zh.T.shape, 0.01
    mcr2 = 0.5 * np.linalg.slogdet(np.eye(p) + p / (m * mcr2_eps) * w @ w.T)[1]
    assert float(coding_rate(_t(z), eps=0.1)) == pytest.approx(mcr2, rel=1e-12)


def test_energy_batches_and_registry():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((3, 20, 5))
    keep = rng.random((3, 20)) < 0.6
    want = [np.mean((z[i][keep[i]] ** 2).sum(1)) for i in range(3)]
    np.testing.assert_allclose(evaluate("energy", z, keep), want, rtol=1e-12)
    np.testing.assert_allclose(energy(_t(z)).numpy(), (z ** 2).sum(-1).mean(-1), rtol=1e-12)
    with pytest.raises(KeyError, match="coding_rate"):
        get_functional("volume")
    with pytest.raises(ValueError, match="empty"):
        rankme(_t(z[0]), torch.zeros(20, dtype=torch.float64))
    with pytest.raises(ValueError, match="one per token"):
        coding_rate(_t(z[0]), torch.ones(19, dtype=torch.float64))


def test_gradients_flow_to_soft_weights():
    z = _t(np.random.default_rng(3).standard_normal((16, 8)))
    w = torch.full((16,), 0.7, dtype=torch.float64, requires_grad=True)
    for name, params in (("rankme", {}), ("coding_rate", {"eps": 0.5}), ("energy", {})):
        w.grad = None
        get_functional(name, **params)(z, w).backward()
        assert w.grad is not None and torch.isfinite(w.grad).all() and float(w.grad.abs().sum()) > 0, name


def _toy_image(n_lesion: int, rng: np.random.Generator, d: int = 64) -> np.ndarray:
    """1024 anatomy tokens on a decaying spectrum plus ``n_lesion`` off-manifold lesion tokens (last rows)."""
    anatomy = rng.standard_normal((1024, d)) * np.sqrt(np.exp(-np.arange(d) / 8.0)) + 0.5
    lesion = 0.3 * rng.standard_normal((n_lesion, d))
    lesion[:, -8:] += 1.5  # directions the anatomy barely uses
    return np.concatenate([anatomy, lesion])[None]


@pytest.mark.parametrize("name, params", [("rankme", {}), ("coding_rate", {"eps": 0.5}), ("energy", {})])
def test_dropping_a_small_lesion_barely_moves_the_functionals(name, params):
    """Science notes section 8: 4 lesion tokens among 1024 move every functional by far less than the slack, so
    a constraint F(kept) >= 0.95 F(all) is met with every lesion token dropped. A lesion covering a fifth of the
    image does move RankMe and the coding rate by more than the slack: the check is able to fail."""
    rng = np.random.default_rng(0)
    small = _toy_image(4, rng)
    drop = np.zeros(small.shape[:2], bool)
    drop[0, 1024:] = True
    random4 = np.zeros_like(drop)
    random4[0, rng.choice(1024, 4, replace=False)] = True
    d_lesion = float(relative_change(name, small, drop, **params)[0])
    d_random = float(relative_change(name, small, random4, **params)[0])
    assert abs(d_lesion) < SLACK / 1.5, d_lesion
    assert abs(d_random) < 1e-3, d_random
    if name != "energy":  # lesion tokens are visible to the spread functionals, just not enough to matter
        assert abs(d_lesion) > 10 * abs(d_random)
        big = _toy_image(256, rng)
        drop_big = np.zeros(big.shape[:2], bool)
        drop_big[0, 1024:] = True
        assert -float(relative_change(name, big, drop_big, **params)[0]) > SLACK
