"""Density construction "A": how unusual a token is under the distribution of training patients' tokens.

Two label-free scorers, both fitted on tokens only (never masks):

* :class:`GaussianDensity` - one global Gaussian with Ledoit-Wolf shrinkage; score = squared Mahalanobis
  distance, computed as ``||L^T (x - mu)||^2`` with ``Sigma^-1 = L L^T`` from a Cholesky factor (no explicit
  inverse inside an einsum). Global, not per grid position: CT and ultrasound images are not aligned.
* :class:`KNNDensity` - mean distance to the ``k`` nearest training tokens (PatchCore / deep-kNN style),
  exact search in float32 chunks with torch.

Scores are "higher = more lesion-like". Shapes: ``tokens`` is ``(n, d)``.

Precision: fits are float64; scoring is float32 (one fused ``addmm`` and a row sum of squares), which is ~1.1x the
cost of a single fp32 ``n x d x d`` matmul (``make bench`` measures it) and changes the token AUROC on the
embedded default by less than 1e-6 (also measured there).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

__all__ = ["GaussianDensity", "KNNDensity", "check_tokens", "affine_sq_norm"]


def check_tokens(tokens: np.ndarray, *, what: str = "tokens", dtype: type = np.float64) -> np.ndarray:
    """Validate a ``(n, d)`` token matrix (finite, 2-D, non-empty) and return it as ``dtype`` (no copy if it is)."""
    arr = np.asarray(tokens)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what}: expected a non-empty (n, d) matrix, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise ValueError(f"{what}: {bad} token(s) contain NaN or Inf")
    return arr.astype(dtype, copy=False)


#: rows scored per block by :func:`affine_sq_norm` (8192 x 768 float32 = 24 MiB)
SCORE_ROWS = 8192


def affine_sq_norm(tokens: np.ndarray, weight: np.ndarray, offset: np.ndarray, *, what: str = "tokens") -> np.ndarray:
    """``||x W - b||^2`` of each row ``x`` in float32: an ``addmm`` and a row-norm pass per block of
    :data:`SCORE_ROWS` rows, into one reused buffer (the ``n x m`` product is never held whole, and the norm reads
    each block while it is still in cache).

    A NaN/Inf token makes its own score non-finite (``x W`` spreads it over the row), so the finite check runs on
    the ``n`` scores instead of the ``n x d`` tokens.

    Args:
        tokens: ``(n, d)`` tokens (float32 are used without a copy).
        weight: ``(d, m)`` float64 map from the fit (cast to float32 once).
        offset: ``(m,)`` float64, ``b = mu W`` for centred scores.

    Returns:
        ``(n,)`` float64 scores (computed in float32).

    Raises:
        ValueError: wrong shape, or tokens with NaN/Inf (counted).
    """
    arr = np.asarray(tokens)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what}: expected a non-empty (n, d) matrix, got shape {arr.shape}")
    if arr.shape[1] != weight.shape[0]:
        raise ValueError(f"{what}: dimension {arr.shape[1]}, the fit had {weight.shape[0]}")
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    w = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
    b = torch.from_numpy(np.ascontiguousarray(offset, dtype=np.float32))
    neg_b, norms = b.neg(), torch.empty(x.shape[0], dtype=torch.float32)
    buf = torch.empty(min(SCORE_ROWS, x.shape[0]), w.shape[1], dtype=torch.float32)
    for s in range(0, x.shape[0], SCORE_ROWS):
        rows = x[s:s + SCORE_ROWS]
        block = torch.addmm(neg_b, rows, w, out=buf[:rows.shape[0]])
        torch.linalg.vector_norm(block, dim=1, out=norms[s:s + rows.shape[0]])
    out = norms.double().square_().numpy()
    bad = ~np.isfinite(out)
    if bad.any():
        raise ValueError(f"{what}: {int(bad.sum())} token(s) contain NaN or Inf (or overflow float32 scoring)")
    return out


@dataclass
class GaussianDensity:
    """Global Gaussian with Ledoit-Wolf shrinkage; score = squared Mahalanobis distance."""

    mean_: np.ndarray | None = None
    chol_prec_: np.ndarray | None = None  # L with Sigma^-1 = L L^T
    shrinkage_: float | None = None

    def fit(self, tokens: np.ndarray) -> "GaussianDensity":
        x = check_tokens(tokens, what="fit tokens")
        if x.shape[0] < 2:
            raise ValueError(f"fit tokens: need at least 2 tokens, got {x.shape[0]}")
        lw = LedoitWolf(assume_centered=False).fit(x)
        self.mean_ = lw.location_
        self.shrinkage_ = float(lw.shrinkage_)
        cov = lw.covariance_
        # Cholesky of the covariance, then L = (C^-1)^T so that Sigma^-1 = L L^T; solve, never invert.
        c = np.linalg.cholesky(cov)
        self.chol_prec_ = np.linalg.solve(c, np.eye(c.shape[0])).T
        return self

    def score(self, tokens: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each token, shape ``(n,)``."""
        if self.mean_ is None:
            raise RuntimeError("GaussianDensity.score called before fit")
        return affine_sq_norm(tokens, self.chol_prec_, self.mean_ @ self.chol_prec_)


@dataclass
class KNNDensity:
    """Mean Euclidean distance to the ``k`` nearest tokens of the fitted bank."""

    k: int = 5
    chunk: int = 4096
    bank_: torch.Tensor | None = None

    def fit(self, tokens: np.ndarray) -> "KNNDensity":
        x = check_tokens(tokens, what="fit tokens")
        if x.shape[0] < self.k:
            raise ValueError(f"fit tokens: need at least k={self.k} tokens, got {x.shape[0]}")
        self.bank_ = torch.from_numpy(x.astype(np.float32))  # exact search in float32, as scoring
        return self

    def score(self, tokens: np.ndarray) -> np.ndarray:
        if self.bank_ is None:
            raise RuntimeError("KNNDensity.score called before fit")
        q = torch.from_numpy(np.ascontiguousarray(check_tokens(tokens, dtype=np.float32)))
        out = []
        for start in range(0, q.shape[0], self.chunk):
            d = torch.cdist(q[start:start + self.chunk], self.bank_)
            out.append(d.topk(self.k, dim=1, largest=False).values.mean(dim=1))
        return torch.cat(out).double().numpy()
