"""Label-free lesion subspace in mid-layer ViT patch tokens.

Constructions are fitted on training patients' tokens only; nothing here may import the mask loader
(``tests/test_label_leak.py`` checks it). ``build_scorer`` maps a construction name to a fresh scorer.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .density import GaussianDensity, KNNDensity
from .residual import PCAResidual

__all__ = ["Scorer", "CONSTRUCTIONS", "build_scorer", "GaussianDensity", "KNNDensity", "PCAResidual",
           "fit_subsample", "score_blocks"]


class Scorer(Protocol):
    def fit(self, tokens: np.ndarray) -> "Scorer": ...

    def score(self, tokens: np.ndarray) -> np.ndarray: ...


#: construction name -> (family, builder). "A" = density, "B" = residual.
CONSTRUCTIONS: dict[str, tuple[str, Any]] = {
    "A_gauss": ("A", lambda p: GaussianDensity()),
    "A_knn": ("A", lambda p: KNNDensity(k=int(p.get("knn_k", 5)))),
    "B_pca": ("B", lambda p: PCAResidual(explained_variance=float(p.get("pca_explained_variance", 0.9)))),
}


def build_scorer(name: str, params: dict | None = None) -> Scorer:
    """A fresh, unfitted scorer for construction ``name``.

    Raises:
        KeyError: listing the valid names.
    """
    try:
        return CONSTRUCTIONS[name][1](params or {})
    except KeyError:
        raise KeyError(f"unknown construction {name!r}; choose one of {sorted(CONSTRUCTIONS)}") from None


def fit_subsample(n: int, max_tokens: int, seed: int) -> np.ndarray:
    """Indices of at most ``max_tokens`` of ``n`` fit tokens, drawn without replacement (sorted)."""
    if n <= max_tokens:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_tokens, replace=False))


def score_blocks(tokens_of: Any, *, blocks: list[int], constructions: list[str], fit_rows: np.ndarray,
                 score_rows: np.ndarray, params: dict, seed: int, max_fit_tokens: int) -> dict[str, np.ndarray]:
    """Fit every construction on the fit images' tokens of every block and score the other images.

    Args:
        tokens_of: ``tokens_of(block, rows) -> (len(rows), N, d)`` (a token bank's accessor).
        blocks: 0-based blocks to score.
        constructions: names from :data:`CONSTRUCTIONS`.
        fit_rows: image rows whose tokens fit the subspace (training patients only).
        score_rows: image rows to score.
        params: construction parameters (``knn_k``, ``pca_explained_variance``).
        seed: seed of the fit-token subsample.
        max_fit_tokens: cap on fit tokens per block (uniform subsample).

    Returns:
        ``{"<construction>@<block>": (len(score_rows) * N,) float64}`` in row-major (image, token) order.
    """
    if np.intersect1d(fit_rows, score_rows).size:
        raise ValueError("fit and score images overlap; a lesion must never explain itself")
    out: dict[str, np.ndarray] = {}
    for b in blocks:
        fit = tokens_of(b, fit_rows)
        fit = fit.reshape(-1, fit.shape[-1])
        fit = fit[fit_subsample(fit.shape[0], max_fit_tokens, seed + b)]
        query = tokens_of(b, score_rows)
        query = query.reshape(-1, query.shape[-1])
        for c in constructions:
            out[f"{c}@{b}"] = build_scorer(c, params).fit(fit).score(query)
    return out
