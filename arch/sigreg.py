"""SIGReg: the sketched isotropic-Gaussian regulariser of LeJEPA, and the covariance penalty it is not.

LeJEPA (Balestriero & LeCun, arXiv 2511.08544) pushes embeddings towards an isotropic Gaussian by testing
1-D projections of them. Each training step draws ``M`` fresh random unit directions ``a_k``, projects the
batch ``u_k = Z a_k`` and scores every slice with the Epps-Pulley statistic

    T(u) = N * integral |phi_hat_u(t) - exp(-t^2/2)|^2 w(t) dt,    w(t) = exp(-t^2/2),

where ``phi_hat_u(t) = mean_n exp(i t u_n)`` is the empirical characteristic function, so
``|phi_hat - phi|^2 = (mean cos(t u) - exp(-t^2/2))^2 + (mean sin(t u))^2``. The integrand is even in ``t``; the
integral over ``[-t_max, t_max]`` is evaluated with the trapezoid rule on ``knots`` points of ``[0, t_max]`` with
doubled weights (default 17 knots, ``t_max = 3``). SIGReg is the mean of ``T`` over slices.

Under the null (``u`` i.i.d. N(0, 1)), ``E[T] = sum_k w_k (1 - exp(-t_k^2))`` (about 1.05 at the defaults,
:func:`null_mean`), not 0: the loss floor is about one per slice. Non-Gaussian marginals score far higher
(Uniform(0, 1): ~490 at N = 1000). The gradient is bounded because ``|exp(i t u)| = 1``.

:func:`covariance_penalty` is the *ablation* (the VICReg family, and what MedJEPA calls "SIGReg"):
``||C - I||_F^2`` only sees second moments, so Rademacher and Gaussian white noise score the same.
Everything is computed in float32, whatever the autocast dtype outside.
"""
from __future__ import annotations


import torch

__all__ = ["quadrature", "epps_pulley", "sigreg", "random_directions", "covariance_penalty", "null_mean",
           "gradient_bound", "DEFAULT_T_MAX", "DEFAULT_KNOTS"]

DEFAULT_T_MAX = 3.0
DEFAULT_KNOTS = 17


def quadrature(*, t_max: float = DEFAULT_T_MAX, knots: int = DEFAULT_KNOTS,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Knots and weights of the Epps-Pulley integral over ``[-t_max, t_max]`` folded onto ``[0, t_max]``.

    Returns:
        ``(t, w)``: ``(knots,)`` float32 each; ``w`` holds the trapezoid weights, doubled by symmetry, times the
        Gaussian weight ``exp(-t^2/2)``.
    """
    if knots < 2 or not t_max > 0:
        raise ValueError(f"need knots >= 2 and t_max > 0, got knots={knots}, t_max={t_max}")
    t = torch.linspace(0.0, float(t_max), int(knots), dtype=torch.float32, device=device)
    dt = float(t_max) / (int(knots) - 1)
    trap = torch.full_like(t, dt)
    trap[0] = trap[-1] = dt / 2
    return t, 2.0 * trap * torch.exp(-t.square() / 2)


def null_mean(*, t_max: float = DEFAULT_T_MAX, knots: int = DEFAULT_KNOTS) -> float:
    """Expected statistic for i.i.d. N(0, 1) samples at this quadrature: ``sum_k w_k (1 - exp(-t_k^2))``."""
    t, w = quadrature(t_max=t_max, knots=knots)
    return float((w.double() * (1 - torch.exp(-t.double().square()))).sum())


def gradient_bound(*, t_max: float = DEFAULT_T_MAX, knots: int = DEFAULT_KNOTS) -> float:
    """Upper bound on ``|dT/du_n|`` for any sample (``4 sum_k w_k t_k``): the statistic cannot blow up gradients."""
    t, w = quadrature(t_max=t_max, knots=knots)
    return float(4 * (w.double() * t.double()).sum())


def epps_pulley(u: torch.Tensor, *, t_max: float = DEFAULT_T_MAX, knots: int = DEFAULT_KNOTS) -> torch.Tensor:
    """Epps-Pulley statistic of each column of ``u`` against N(0, 1).

    Args:
        u: ``(N, M)`` projections (``N`` samples of ``M`` slices); a ``(N,)`` vector is one slice.

    Returns:
        ``(M,)`` float32 statistics (a 0-d tensor for a vector input).
    """
    if u.ndim not in (1, 2) or u.shape[0] < 2:
        raise ValueError(f"u must be (N,) or (N, M) with N >= 2, got {tuple(u.shape)}")
    squeeze = u.ndim == 1
    u2 = (u[:, None] if squeeze else u).float()
    n = u2.shape[0]
    t, w = quadrature(t_max=t_max, knots=knots, device=u2.device)
    with torch.autocast(device_type=u2.device.type, enabled=False):
        x = u2[..., None] * t  # (N, M, K)
        err = (x.cos().mean(0) - torch.exp(-t.square() / 2)).square() + x.sin().mean(0).square()  # (M, K)
        stat = n * (err * w).sum(-1)
    return stat[0] if squeeze else stat


def random_directions(dim: int, num_slices: int, *, generator: torch.Generator,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """``(dim, num_slices)`` float32 unit directions drawn from ``generator`` (fresh ones every training step)."""
    a = torch.randn(dim, num_slices, generator=generator, dtype=torch.float32).to(device)
    return a / a.norm(dim=0, keepdim=True)


def sigreg(z: torch.Tensor, *, num_slices: int, generator: torch.Generator, t_max: float = DEFAULT_T_MAX,
           knots: int = DEFAULT_KNOTS) -> torch.Tensor:
    """SIGReg of embeddings ``z`` (``(N, D)``): the mean Epps-Pulley statistic over random 1-D projections.

    Args:
        z: the batch (all views), any dtype; projected in float32.
        num_slices: ``M``, the number of random directions.
        generator: source of the directions; the caller draws fresh ones each step (same on every rank).

    Returns:
        0-d float32 tensor.
    """
    if z.ndim != 2:
        raise ValueError(f"z must be (N, D), got {tuple(z.shape)}")
    a = random_directions(z.shape[1], int(num_slices), generator=generator, device=z.device)
    with torch.autocast(device_type=z.device.type, enabled=False):
        u = z.float() @ a
    return epps_pulley(u, t_max=t_max, knots=knots).mean()


def covariance_penalty(z: torch.Tensor) -> torch.Tensor:
    """ABLATION, not SIGReg: ``||C - I||_F^2`` of the sample covariance (VICReg-style second-moment matching).

    Kept to show what it misses: any white distribution (Gaussian, Rademacher, uniform rescaled to unit variance)
    scores the same, and with ``N < D`` the sample covariance is singular and the penalty degenerates.
    """
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"z must be (N, D) with N >= 2, got {tuple(z.shape)}")
    with torch.autocast(device_type=z.device.type, enabled=False):
        x = z.float() - z.float().mean(0, keepdim=True)
        c = x.T @ x / (x.shape[0] - 1)
        return (c - torch.eye(c.shape[0], device=c.device)).square().sum()

