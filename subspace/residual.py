"""Residual construction "B": energy of a token outside the dominant (anatomy) subspace.

Fit the mean and the top-``k`` eigenvectors of the training tokens' covariance (``numpy.linalg.eigh`` on the
symmetric matrix), with ``k`` chosen by explained variance, never by labels. Score
``r(x) = ||(I - V_k V_k^T)(x - mu)||^2``; higher = further off the subspace.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .density import check_tokens

__all__ = ["PCAResidual"]


@dataclass
class PCAResidual:
    """PCA residual scorer.

    Args:
        explained_variance: keep the smallest ``k`` whose eigenvalues explain at least this fraction.
        max_k: optional cap on ``k`` (``None`` = no cap), always ``< d`` so a residual exists.
    """

    explained_variance: float = 0.9
    max_k: int | None = None
    mean_: np.ndarray | None = None
    components_: np.ndarray | None = None  # (d, k)

    def fit(self, tokens: np.ndarray) -> "PCAResidual":
        if not 0.0 < self.explained_variance < 1.0:
            raise ValueError(f"explained_variance must be in (0, 1), got {self.explained_variance}")
        x = check_tokens(tokens, what="fit tokens")
        self.mean_ = x.mean(axis=0)
        xc = x - self.mean_
        cov = xc.T @ xc / max(x.shape[0] - 1, 1)
        evals, evecs = np.linalg.eigh(cov)  # ascending
        evals, evecs = evals[::-1].clip(min=0.0), evecs[:, ::-1]
        total = evals.sum()
        if total <= 0:
            raise ValueError("fit tokens: zero variance, the subspace is undefined")
        k = int(np.searchsorted(np.cumsum(evals) / total, self.explained_variance) + 1)
        k = min(k, x.shape[1] - 1, self.max_k or x.shape[1] - 1)
        self.components_ = evecs[:, :k]
        return self

    @property
    def k(self) -> int:
        if self.components_ is None:
            raise RuntimeError("PCAResidual not fitted")
        return int(self.components_.shape[1])

    def score(self, tokens: np.ndarray) -> np.ndarray:
        """Squared residual norm of each token, shape ``(n,)``."""
        if self.components_ is None:
            raise RuntimeError("PCAResidual.score called before fit")
        xc = check_tokens(tokens) - self.mean_
        proj = xc @ self.components_
        return np.einsum("nd,nd->n", xc, xc) - np.einsum("nk,nk->n", proj, proj)
