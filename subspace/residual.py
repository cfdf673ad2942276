"""Residual construction "B": energy of a token outside the dominant (anatomy) subspace.

Fit the mean and the top-``k`` principal axes of the training tokens with scikit-learn's ``PCA`` (float64,
``svd_solver="covariance_eigh"``: the eigendecomposition of the d x d covariance, for n >> d), with ``k`` the
smallest number of components whose explained-variance ratio reaches the target, never chosen by labels. Score
``r(x) = ||(I - V_k V_k^T)(x - mu)||^2``; higher = further off the subspace. Scoring projects onto the orthonormal
complement ``U`` of the kept axes (the remaining ``d - k`` principal axes; ``r = ||U^T (x - mu)||^2``) in float32,
one ``addmm`` of width ``d - k``: the residual is formed directly, never as the difference of two large norms (no
cancellation). With fewer fit tokens than dimensions the complement is incomplete and the projector
``I - V_k V_k^T`` (width ``d``) is used instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .density import affine_sq_norm, check_tokens

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
    _projector: np.ndarray | None = field(default=None, repr=False)  # (d, d - k) complement, or I - V_k V_k^T

    def fit(self, tokens: np.ndarray) -> "PCAResidual":
        if not 0.0 < self.explained_variance < 1.0:
            raise ValueError(f"explained_variance must be in (0, 1), got {self.explained_variance}")
        from sklearn.decomposition import PCA

        x = check_tokens(tokens, what="fit tokens")
        if x.shape[0] < 2:
            raise ValueError(f"fit tokens: need at least 2 tokens, got {x.shape[0]}")
        if not np.any(x.var(axis=0) > 0):
            raise ValueError("fit tokens: zero variance, the subspace is undefined")
        pca = PCA(svd_solver="covariance_eigh").fit(x)
        ratio = np.cumsum(pca.explained_variance_ratio_)
        k = int(np.searchsorted(ratio, self.explained_variance) + 1)
        k = min(k, x.shape[1] - 1, self.max_k or x.shape[1] - 1)
        self.mean_ = pca.mean_
        self.components_ = pca.components_[:k].T
        if pca.components_.shape[0] == x.shape[1]:  # a full orthonormal basis: its last d - k axes span the residual
            self._projector = pca.components_[k:].T
        else:
            self._projector = np.eye(x.shape[1]) - self.components_ @ self.components_.T
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
        p = self._projector
        return affine_sq_norm(tokens, p, self.mean_ @ p)
