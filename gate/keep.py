"""Keep sets from token scores: ranks, keep counts and top-k masks (label-free).

Conventions shared by every pruning arm (membership, CLS-attention saliency, the constrained pruner's
matched-count comparison):

* a keep rate ``rho`` keeps ``ceil(rho * N)`` of the ``N`` patch tokens of an image (EViT keeps
  ``ceil(rho (N_total - 1))`` tokens besides the CLS token, the same number);
* tokens are ranked per image by decreasing score, ties broken by the lower token index, so keep sets are
  deterministic and nested in the keep rate; rank 0 is the most salient / most lesion-like token.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["keep_count", "token_ranks", "topk_keep"]


def keep_count(n_tokens: int, rate: float) -> int:
    """``ceil(rate * n_tokens)`` (at least 1).

    Args:
        n_tokens: patch tokens per image ``N``.
        rate: keep rate in (0, 1].

    Raises:
        ValueError: a rate outside (0, 1] or a non-positive token count.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"keep rate (keep fraction) must lie in (0, 1], got {rate!r}")
    return max(1, math.ceil(rate * n_tokens - 1e-9))


def token_ranks(scores: np.ndarray) -> np.ndarray:
    """Rank of every token within its image (0 = highest score; ties -> lower token index first).

    Args:
        scores: ``(B, N)`` finite scores, higher = keep first.

    Returns:
        ``(B, N)`` int64 ranks, a permutation of ``0..N-1`` per row.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.size == 0:
        raise ValueError(f"scores must be a non-empty (B, N) array, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"scores contain {int((~np.isfinite(s)).sum())} non-finite value(s)")
    order = np.argsort(-s, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(s.shape[1])[None, :].repeat(s.shape[0], 0), axis=1)
    return ranks


def topk_keep(scores: np.ndarray, k: int | np.ndarray) -> np.ndarray:
    """Keep the ``k`` highest-scoring tokens of every image.

    Args:
        scores: ``(B, N)`` scores.
        k: one count for all images or ``(B,)`` counts per image (``0 <= k <= N``).

    Returns:
        ``(B, N)`` bool keep mask.
    """
    ranks = token_ranks(scores)
    kk = np.broadcast_to(np.asarray(k, dtype=np.int64), (ranks.shape[0],))
    if (kk < 0).any() or (kk > ranks.shape[1]).any():
        raise ValueError(f"keep counts must lie in [0, {ranks.shape[1]}], got range [{kk.min()}, {kk.max()}]")
    return ranks < kk[:, None]
