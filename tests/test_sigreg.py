"""SIGReg (Epps-Pulley over random slices) against its null, against non-Gaussian inputs, against scipy, and against
the covariance-to-identity penalty it must not be confused with."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import integrate

from covtoken.arch.sigreg import (covariance_penalty, epps_pulley, gradient_bound, null_mean, quadrature,
                                  random_directions, sigreg)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def direct_integrand(u: np.ndarray):
    def f(t: np.ndarray) -> np.ndarray:
        x = np.multiply.outer(np.atleast_1d(t), u)
        err = (np.cos(x).mean(-1) - np.exp(-np.atleast_1d(t) ** 2 / 2)) ** 2 + np.sin(x).mean(-1) ** 2
        return u.size * err * np.exp(-np.atleast_1d(t) ** 2 / 2)
    return f


def test_quadrature_null_mean_is_about_1_05_and_converges_to_the_integral():
    assert null_mean() == pytest.approx(1.05, abs=0.01)
    exact, _ = integrate.quad(lambda t: np.exp(-t * t / 2) * (1 - np.exp(-t * t)), -3, 3)
    assert null_mean(knots=401) == pytest.approx(exact, abs=1e-5)
    assert abs(null_mean() - exact) > 1e-4  # 17 knots is a coarse rule: the null mean is the rule's, not the integral's


def test_one_dimensional_value_matches_direct_integration_with_scipy():
    u = np.random.default_rng(0).standard_normal(300) * 1.3 + 0.2
    ours = float(epps_pulley(torch.tensor(u, dtype=torch.float64)))
    t = np.linspace(-3, 3, 33)  # the same 17 knots per side on the whole symmetric interval
    ref = integrate.trapezoid(direct_integrand(u)(t), t)
    assert ours == pytest.approx(ref, rel=1e-6)
    fine = float(epps_pulley(torch.tensor(u), knots=801))
    cont, _ = integrate.quad(lambda s: float(direct_integrand(u)(s)[0]), -3, 3, epsabs=1e-10, limit=200)
    assert fine == pytest.approx(cont, rel=1e-5)


def test_gaussian_statistic_sits_in_its_sampled_null():
    g = gen(1)
    stats = epps_pulley(torch.randn(1000, 400, generator=g))  # 400 independent 1-D null draws
    se = float(stats.std()) / np.sqrt(stats.numel())
    assert abs(float(stats.mean()) - null_mean()) < 4 * se
    assert 0.6 < float(stats.std()) < 1.3  # simulated sd ~ 0.92 at N = 1000


@pytest.mark.parametrize("kind", ["uniform", "rademacher", "collapsed", "anisotropic", "shifted"])
def test_non_gaussian_embeddings_score_far_above_the_null(kind):
    g = gen(2)
    n, d = 2000, 4
    null = [float(sigreg(torch.randn(n, d, generator=g), num_slices=64, generator=g)) for _ in range(60)]
    z = {"uniform": lambda: torch.rand(n, d, generator=g),
         "rademacher": lambda: torch.randint(0, 2, (n, d), generator=g).float() * 2 - 1,
         "collapsed": lambda: torch.randn(n, 1, generator=g).expand(n, d) * 0.01,
         "anisotropic": lambda: torch.randn(n, d, generator=g) * torch.tensor([0.2, 1.0, 1.0, 3.0]),
         "shifted": lambda: torch.randn(n, d, generator=g) + 0.5}[kind]()
    assert float(sigreg(z, num_slices=64, generator=g)) > 5 * np.quantile(null, 0.99)


def test_uniform_matches_the_published_magnitude():
    stat = float(epps_pulley(torch.rand(1000, 50, generator=gen(3))).mean())
    assert 400 < stat < 600  # science notes: Uniform(0, 1) ~ 490 at N = 1000


def test_rademacher_with_identity_covariance_is_penalised_by_sigreg_not_by_the_covariance_penalty():
    g = gen(4)
    n, d = 4000, 4
    gauss = [torch.randn(n, d, generator=g) for _ in range(40)]
    rad = [torch.randint(0, 2, (n, d), generator=g).float() * 2 - 1 for _ in range(40)]
    cov_g = np.array([float(covariance_penalty(z)) for z in gauss])
    cov_r = np.array([float(covariance_penalty(z)) for z in rad])
    sig_g = np.array([float(sigreg(z, num_slices=64, generator=g)) for z in gauss])
    sig_r = np.array([float(sigreg(z, num_slices=64, generator=g)) for z in rad])
    # the covariance penalty cannot tell them apart: Rademacher is not above the Gaussian null
    assert np.median(cov_r) <= np.quantile(cov_g, 0.95)
    # SIGReg separates them completely
    assert sig_r.min() > 5 * sig_g.max()


def test_gradients_are_finite_and_bounded_even_for_wild_inputs():
    g = gen(5)
    n, d = 256, 16
    for scale in (1e-3, 1.0, 1e4):
        z = (torch.randn(n, d, generator=g) * scale).requires_grad_(True)
        loss = sigreg(z, num_slices=32, generator=g)
        loss.backward()
        assert torch.isfinite(z.grad).all()
        # dT/du_n is bounded by gradient_bound() for every slice; unit directions keep the bound per row of z
        assert float(z.grad.norm(dim=1).max()) <= gradient_bound() + 1e-5
    u = (torch.randn(100, generator=g) * 1e6).requires_grad_(True)
    epps_pulley(u).backward()
    assert float(u.grad.abs().max()) <= gradient_bound()


def test_directions_are_unit_and_fresh_each_draw():
    g = gen(6)
    a, b = random_directions(8, 16, generator=g), random_directions(8, 16, generator=g)
    assert torch.allclose(a.norm(dim=0), torch.ones(16)) and not torch.allclose(a, b)


def test_computed_in_float32_under_bf16_inputs():
    z = torch.randn(512, 8, generator=gen(7))
    s32 = sigreg(z, num_slices=16, generator=gen(8))
    sbf = sigreg(z.bfloat16(), num_slices=16, generator=gen(8))
    assert sbf.dtype == torch.float32 and float(sbf) == pytest.approx(float(s32), rel=0.05)


def test_bad_shapes_and_quadrature_fail_clearly():
    with pytest.raises(ValueError, match="knots"):
        quadrature(knots=1)
    with pytest.raises(ValueError, match="N >= 2"):
        epps_pulley(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        sigreg(torch.zeros(4), num_slices=2, generator=gen())
