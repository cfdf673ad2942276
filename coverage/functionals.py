"""Coverage functionals of a token set: RankMe, coding rate and energy, with optional soft token weights.

All three take a token matrix ``z`` of shape ``(..., n, d)`` (leading batch dimensions allowed) and an optional
weight vector ``w`` of shape ``(..., n)`` with entries in [0, 1]: token ``j`` enters with weight ``w_j``. With
``w`` in {0, 1} every functional equals its value on the kept subset (the rows with ``w_j = 1``), which is
how a pruner's hard keep set is scored; soft weights make the functionals differentiable in the gates.

* **RankMe** (Garrido et al., ICML 2023): singular values ``sigma`` of the *raw* (uncentred, unnormalised)
  matrix ``diag(sqrt(w)) Z``; ``p_k = sigma_k / ||sigma||_1 + eps`` with ``eps = 1e-7`` added after the
  division (the paper's placement); RankMe ``= exp(-sum_k p_k log p_k)``. No centring and no
  normalisation by ``log min(n, d)``. ``Z = I_d`` gives ``d``; a rank-1 ``Z`` gives about 1.
* **Coding rate** (MCR^2, Yu et al., NeurIPS 2020): tokens are L2-normalised first (the rate depends on
  scale); ``R = 1/2 logdet(I_d + d / (m eps^2) Zhat^T diag(w) Zhat)`` with ``m = sum_j w_j``. Here ``eps``
  is the epsilon *of the formula*: the reference code (ryanchankh/mcr2 ``loss.py``) passes ``eps^2`` as its
  ``eps`` argument (default 0.01, i.e. ``eps = 0.1`` here). The log-determinant uses ``slogdet`` and the
  ``n x n`` Gram form ``logdet(I_n + c A A^T)`` (Sylvester) whenever ``n < d``; both forms are the same number.
* **Energy**: weighted mean squared norm ``sum_j w_j ||z_j||^2 / sum_j w_j`` of the raw tokens.

Everything is torch (differentiable; float64 recommended on CPU) with numpy conveniences. Nothing here sees
a mask: ``tests/test_label_leak.py`` checks that this package imports no label code.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

__all__ = ["RANKME_EPS", "rankme", "coding_rate", "energy", "FUNCTIONALS", "get_functional", "evaluate",
           "relative_change"]

#: epsilon of RankMe (Garrido et al.), added to every normalised singular value.
RANKME_EPS = 1e-7


def _check(z: torch.Tensor, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(z).__name__}")
    if z.ndim < 2 or z.shape[-1] == 0 or z.shape[-2] == 0:
        raise ValueError(f"tokens must have shape (..., n, d) with n, d > 0, got {tuple(z.shape)}")
    if w is None:
        w = torch.ones(z.shape[:-1], dtype=z.dtype, device=z.device)
    elif w.shape != z.shape[:-1]:
        raise ValueError(f"weights must have shape {tuple(z.shape[:-1])} (one per token), got {tuple(w.shape)}")
    if not bool((w.sum(-1) > 0).all()):
        raise ValueError("every token set needs a positive total weight; got an empty set")
    return z, w.to(z.dtype)


def rankme(z: torch.Tensor, w: torch.Tensor | None = None, *, eps: float = RANKME_EPS) -> torch.Tensor:
    """RankMe effective rank of the raw tokens.

    Args:
        z: ``(..., n, d)`` raw tokens.
        w: ``(..., n)`` token weights in [0, 1] (rows are scaled by ``sqrt(w)``), or None for all ones.
        eps: added to each normalised singular value (1e-7 in the paper).

    Returns:
        ``(...)`` RankMe values.
    """
    z, w = _check(z, w)
    sigma = torch.linalg.svdvals(z * w.clamp_min(0).sqrt()[..., None])
    p = sigma / sigma.sum(-1, keepdim=True) + eps
    return torch.exp(-(p * torch.log(p)).sum(-1))


def coding_rate(z: torch.Tensor, w: torch.Tensor | None = None, *, eps: float = 0.5) -> torch.Tensor:
    """Coding rate ``R(Z, eps)`` of the L2-normalised tokens.

    Args:
        z: ``(..., n, d)`` tokens (normalised here to unit length).
        w: ``(..., n)`` token weights in [0, 1], or None; ``m = sum(w)``.
        eps: the formula's epsilon (distortion); ``eps**2`` multiplies ``m`` in the denominator.

    Returns:
        ``(...)`` coding rates in nats.
    """
    if not eps > 0:
        raise ValueError(f"coding rate needs eps > 0, got {eps!r}")
    z, w = _check(z, w)
    n, d = z.shape[-2], z.shape[-1]
    zh = torch.nn.functional.normalize(z, dim=-1)
    m = w.sum(-1)
    scale = (d / (m * eps ** 2))[..., None, None]
    if n < d:  # Gram form: logdet(I_n + c A A^T) with A = diag(sqrt(w)) Zhat
        a = zh * w.clamp_min(0).sqrt()[..., None]
        mat = torch.eye(n, dtype=z.dtype, device=z.device) + scale * (a @ a.transpose(-1, -2))
    else:
        mat = torch.eye(d, dtype=z.dtype, device=z.device) + scale * (zh.transpose(-1, -2) @ (zh * w[..., None]))
    sign, logabs = torch.linalg.slogdet(mat)
    if not bool((sign > 0).all()):
        raise FloatingPointError("coding rate: I + c Z^T Z lost positive definiteness (non-finite or negative weights?)")
    return 0.5 * logabs


def energy(z: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean squared norm of the raw tokens.

    Args:
        z: ``(..., n, d)`` raw tokens.
        w: ``(..., n)`` token weights, or None.

    Returns:
        ``(...)`` energies.
    """
    z, w = _check(z, w)
    return (w * (z * z).sum(-1)).sum(-1) / w.sum(-1)


#: functional name -> callable ``f(z, w, **params)``.
FUNCTIONALS: dict[str, Callable[..., torch.Tensor]] = {"rankme": rankme, "coding_rate": coding_rate, "energy": energy}


def get_functional(name: str, **params: float) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """The functional ``name`` with its parameters bound (``eps`` for RankMe and coding rate).

    Raises:
        KeyError: naming the valid functionals.
    """
    try:
        fn = FUNCTIONALS[name]
    except KeyError:
        raise KeyError(f"unknown coverage functional {name!r}; choose one of {sorted(FUNCTIONALS)}") from None
    if name == "energy" and params:
        raise ValueError(f"energy takes no parameters, got {sorted(params)}")

    def bound(z: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        return fn(z, w, **params)

    return bound


def evaluate(name: str, tokens: np.ndarray, keep: np.ndarray | None = None, **params: float) -> np.ndarray:
    """Numpy convenience: functional ``name`` of each image's kept tokens, in float64.

    Args:
        name: a key of :data:`FUNCTIONALS`.
        tokens: ``(B, n, d)`` or ``(n, d)`` tokens.
        keep: boolean ``(B, n)`` / ``(n,)`` keep mask, or None for all tokens.
        **params: functional parameters (``eps``).

    Returns:
        ``(B,)`` (or scalar array) values.
    """
    z = torch.from_numpy(np.asarray(tokens, dtype=np.float64))
    w = None if keep is None else torch.from_numpy(np.asarray(keep, dtype=np.float64))
    with torch.no_grad():
        return get_functional(name, **params)(z, w).numpy()


def relative_change(name: str, tokens: np.ndarray, drop: np.ndarray, **params: float) -> np.ndarray:
    """Relative change ``(F(kept) - F(all)) / F(all)`` when the tokens flagged in ``drop`` are removed.

    Args:
        name: functional name.
        tokens: ``(B, n, d)`` tokens.
        drop: boolean ``(B, n)``, True for tokens to remove (at least one token must stay per image).
        **params: functional parameters.

    Returns:
        ``(B,)`` signed relative changes (negative = removing the tokens lowers the functional).
    """
    drop = np.asarray(drop, dtype=bool)
    full = evaluate(name, tokens, None, **params)
    kept = evaluate(name, tokens, ~drop, **params)
    return (kept - full) / full
