"""Hard-concrete token gates (Louizos, Welling & Kingma, "Learning sparse neural networks through L0
regularization", ICLR 2018).

A gate with location ``log_alpha`` draws ``u ~ U(0, 1)``, ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``,
stretches it to ``(gamma, zeta)`` with ``s_bar = s (zeta - gamma) + gamma`` and clips: ``z = min(1, max(0, s_bar))``.
The clip puts point masses on exactly 0 and exactly 1, so gates can switch tokens off while staying
differentiable in ``log_alpha`` between them. Constants: ``gamma = -0.1``, ``zeta = 1.1``, ``beta = 2/3``.

* expected L0 (probability that a gate is not exactly 0): ``sigmoid(log_alpha - beta log(-gamma / zeta))``;
* deterministic test-time gate: ``clip(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)``.
"""
from __future__ import annotations

import math

import torch

__all__ = ["GAMMA", "ZETA", "BETA", "sample_gates", "prob_nonzero", "prob_one", "deterministic_gates",
           "gate_entropy"]

GAMMA = -0.1
ZETA = 1.1
BETA = 2.0 / 3.0
_U_EPS = 1e-6


def sample_gates(log_alpha: torch.Tensor, *, generator: torch.Generator | None = None,
                 beta: float = BETA) -> torch.Tensor:
    """One stochastic (reparameterised) draw of every gate.

    Args:
        log_alpha: ``(...)`` gate locations.
        generator: torch RNG for ``u`` (seeded by the caller for reproducible runs).
        beta: temperature.

    Returns:
        ``(...)`` gates in [0, 1], differentiable in ``log_alpha``.
    """
    u = torch.rand(log_alpha.shape, generator=generator, dtype=log_alpha.dtype, device=log_alpha.device)
    u = u.clamp(_U_EPS, 1.0 - _U_EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor, *, beta: float = BETA) -> torch.Tensor:
    """``P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta))``, the expected L0 of each gate."""
    return torch.sigmoid(log_alpha - beta * math.log(-GAMMA / ZETA))


def prob_one(log_alpha: torch.Tensor, *, beta: float = BETA) -> torch.Tensor:
    """``P(z == 1) = 1 - sigmoid(beta log((1 - gamma) / (zeta - 1)) - log_alpha)`` (the mass clipped to 1)."""
    return 1.0 - torch.sigmoid(beta * math.log((1.0 - GAMMA) / (ZETA - 1.0)) - log_alpha)


def deterministic_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    """Test-time gates ``clip(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)``; a token is kept when its gate > 0."""
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def gate_entropy(log_alpha: torch.Tensor, *, beta: float = BETA) -> torch.Tensor:
    """Mean binary entropy (nats) of the keep/drop event ``z != 0``: 0 when every gate is decided."""
    p = prob_nonzero(log_alpha, beta=beta).clamp(1e-12, 1 - 1e-12)
    return -(p * p.log() + (1 - p) * (1 - p).log()).mean()
