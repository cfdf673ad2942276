"""Density construction "A": how unusual a token is under the distribution of training patients' tokens.

Two label-free scorers, both fitted on tokens only (never masks):

* :class:`GaussianDensity` - one global Gaussian with Ledoit-Wolf shrinkage; score = squared Mahalanobis
  distance, computed as ``||L^T (x - mu)||^2`` with ``Sigma^-1 = L L^T`` from a Cholesky factor (no explicit
  inverse inside an einsum). Global, not per grid position: CT and ultrasound images are not aligned.
* :class:`KNNDensity` - mean distance to the ``k`` nearest training tokens (PatchCore / deep-kNN style),
  exact search in float32 chunks with torch.

Scores are "higher = more lesion-like". Shapes: ``tokens`` is ``(n, d)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

__all__ = ["GaussianDensity", "KNNDensity", "check_tokens"]


def check_tokens(tokens: np.ndarray, *, what: str = "tokens") -> np.ndarray:
    """Validate a ``(n, d)`` token matrix (finite, 2-D, non-empty) and return it as float64."""
    arr = np.asarray(tokens)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what}: expected a non-empty (n, d) matrix, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise ValueError(f"{what}: {bad} token(s) contain NaN or Inf")
    return arr.astype(np.float64, copy=False)


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
        x = check_tokens(tokens)
        z = (x - self.mean_) @ self.chol_prec_
        return np.einsum("nd,nd->n", z, z)


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
        self.bank_ = torch.from_numpy(x.astype(np.float32))
        return self

    def score(self, tokens: np.ndarray) -> np.ndarray:
        if self.bank_ is None:
            raise RuntimeError("KNNDensity.score called before fit")
        q = torch.from_numpy(check_tokens(tokens).astype(np.float32))
        out = []
        for start in range(0, q.shape[0], self.chunk):
            d = torch.cdist(q[start:start + self.chunk], self.bank_)
            out.append(d.topk(self.k, dim=1, largest=False).values.mean(dim=1))
        return torch.cat(out).double().numpy()
