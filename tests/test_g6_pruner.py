"""Hard-concrete gates against their closed forms, and the coverage-constrained pruner against known optima.

References: Monte Carlo frequencies of sampled gates vs Louizos et al.'s P(z != 0) and P(z = 1); the energy
constraint, whose smallest feasible keep set is a single token with at least c times the mean squared norm;
the constraint itself, checked on every returned keep set with the functional computed from scratch.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from covtoken.coverage import evaluate
from covtoken.gate.hard_concrete import (BETA, GAMMA, ZETA, deterministic_gates, gate_entropy, prob_nonzero,
                                         prob_one, sample_gates)
from covtoken.gate.pruner import PrunerConfig, fit_pruner


def test_constants_are_louizos():
    assert (GAMMA, ZETA) == (-0.1, 1.1) and BETA == pytest.approx(2 / 3)


@pytest.mark.parametrize("log_alpha", [-3.0, -0.5, 0.0, 1.0, 4.0])
def test_sampled_gates_match_closed_forms(log_alpha):
    la = torch.full((200_000,), log_alpha, dtype=torch.float64)
    z = sample_gates(la, generator=torch.Generator().manual_seed(0))
    assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0
    assert float((z > 0).double().mean()) == pytest.approx(float(prob_nonzero(la[:1])), abs=4e-3)
    assert float((z == 1).double().mean()) == pytest.approx(float(prob_one(la[:1])), abs=4e-3)
    # the explicit formula of the expected L0 term
    want = 1 / (1 + math.exp(-(log_alpha - BETA * math.log(-GAMMA / ZETA))))
    assert float(prob_nonzero(la[:1])) == pytest.approx(want, rel=1e-12)


def test_deterministic_gates_and_entropy():
    la = torch.tensor([-10.0, 0.0, 10.0], dtype=torch.float64)
    np.testing.assert_allclose(deterministic_gates(la).numpy(), [0.0, 0.5, 1.0], atol=1e-12)
    decided = gate_entropy(torch.tensor([-30.0, 30.0], dtype=torch.float64))
    undecided = gate_entropy(torch.tensor([BETA * math.log(-GAMMA / ZETA)], dtype=torch.float64))
    assert float(decided) < 1e-9 and float(undecided) == pytest.approx(math.log(2), rel=1e-9)


def _images(b: int, n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((b, n, d)) * np.sqrt(np.exp(-np.arange(d) / 4.0)) + 0.3


def test_coding_rate_pruner_meets_its_constraint_and_prunes():
    x = _images(6, 48, 16, seed=0)
    cfg = PrunerConfig(functional="coding_rate", eps=0.5, target=0.95, steps=150, lr=0.1, seed=1)
    res = fit_pruner(x, cfg)
    ratio = evaluate("coding_rate", x, res.kept, eps=0.5) / evaluate("coding_rate", x, None, eps=0.5)
    np.testing.assert_allclose(res.ratio, ratio, rtol=1e-10)
    assert (ratio >= 0.95).all()
    assert res.keep_fraction.mean() < 0.8  # it actually prunes (every gate starts open)
    start = float(prob_nonzero(torch.tensor(cfg.init_log_alpha)))
    assert start > 0.99 and res.history[-1]["expected_keep"] < start - 0.2
    assert all(h["lambda_mean"] >= 0 for h in res.history)
    again = fit_pruner(x, cfg)
    np.testing.assert_array_equal(again.kept, res.kept)  # seeded: same gate noise, same keep sets
    other = fit_pruner(x, PrunerConfig(**{**cfg.__dict__, "seed": 2}))
    assert not np.array_equal(other.log_alpha, res.log_alpha)


def test_energy_pruner_finds_the_smallest_feasible_set():
    x = _images(4, 40, 8, seed=3)
    res = fit_pruner(x, PrunerConfig(functional="energy", eps=None, target=0.9, steps=200, lr=0.1))
    norms = (x ** 2).sum(-1)
    assert (res.kept.sum(1) == 1).all()  # one token is enough, and the pruner finds that
    chosen = norms[res.kept]
    assert (chosen >= 0.9 * norms.mean(1)).all()


def test_repair_restores_the_constraint():
    x = _images(3, 32, 16, seed=4)
    res = fit_pruner(x, PrunerConfig(target=0.999, steps=3, lr=1.0, dual_lr=0.001, init_log_alpha=-3.0))
    assert (res.repaired > 0).all()  # three steps from closed gates cannot meet a 0.999 target
    assert (res.ratio >= 0.999).all()
    assert ((res.gates > 0).sum(1) + res.repaired == res.kept.sum(1)).all()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="target"):
        PrunerConfig(target=1.5)
    with pytest.raises(ValueError, match=r"\(B, N, d\)"):
        fit_pruner(np.zeros((3, 4)), PrunerConfig())
    with pytest.raises(KeyError, match="coding_rate"):
        fit_pruner(_images(1, 8, 4, 0), PrunerConfig(functional="volume"))
