"""Volumes: slice selection and 3-D aggregation of token scores across the slices of one volume.

Token scores come per image (slice) as ``(S, N)`` or ``(S, gh, gw)`` arrays. A volume is the set of slices sharing
a volume (series or patient) id, ordered by slice position. From there:

* :func:`slice_scores` - one score per slice: max, mean, or the mean of the top fraction of token scores
  (AnomalyDINO's image score);
* :func:`volume_score` - one score per volume: max, mean, or mean of the top-k slice scores;
* :func:`select_slices` - the k highest-scoring slices (ties go to the lower slice), in slice order;
* :func:`smooth_across_slices` - a 3-D max or mean filter over (slice, row, column) token neighbourhoods, so a
  lesion seen on adjacent slices reinforces itself while a single-slice spike does not; slices must be evenly
  spaced, since a filter across a gap would treat distant slices as neighbours;
* :func:`aggregate_volumes` - all of it from flat per-image arrays and ids.

Scores only: nothing here reads masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["Volume", "group_volumes", "slice_scores", "volume_score", "select_slices", "smooth_across_slices",
           "aggregate_volumes", "SLICE_REDUCERS", "VOLUME_REDUCERS"]

SLICE_REDUCERS = ("max", "mean", "top_fraction")
VOLUME_REDUCERS = ("max", "mean", "top_k_mean")


@dataclass(frozen=True)
class Volume:
    """One volume: its id, the image rows of its slices in slice order, and their positions (sorted)."""

    volume_id: str
    rows: np.ndarray
    positions: np.ndarray


def group_volumes(volume_ids: Sequence[str], positions: Sequence[float]) -> list[Volume]:
    """Group image rows into volumes ordered by id, slices ordered by position.

    Args:
        volume_ids: ``(n_images,)`` volume (series or patient) id of each image.
        positions: ``(n_images,)`` slice position (index or mm along the slice axis).

    Raises:
        ValueError: lengths differ, a position is not finite, or two slices of a volume share a position.
    """
    ids, pos = np.asarray(volume_ids), np.asarray(positions, dtype=np.float64)
    if ids.shape != pos.shape or ids.ndim != 1:
        raise ValueError(f"volume_ids {ids.shape} and positions {pos.shape} must be equal-length 1-D arrays")
    if not np.isfinite(pos).all():
        raise ValueError(f"slice positions must be finite, got {pos[~np.isfinite(pos)][:3].tolist()}")
    out = []
    for vid in sorted(set(ids.tolist())):
        rows = np.flatnonzero(ids == vid)
        order = np.argsort(pos[rows], kind="stable")
        rows, p = rows[order], pos[rows][order]
        dup = p[1:][np.diff(p) == 0]
        if dup.size:
            raise ValueError(f"volume {vid!r}: two slices at position {dup[0]}")
        out.append(Volume(str(vid), rows, p))
    return out


def slice_scores(token_scores: np.ndarray, *, reduce: str = "max", fraction: float = 0.01) -> np.ndarray:
    """One score per slice.

    Args:
        token_scores: ``(S, N)`` or ``(S, gh, gw)`` token scores of the slices.
        reduce: ``"max"``, ``"mean"`` or ``"top_fraction"`` (mean of the ``ceil(fraction * N)`` highest).
        fraction: for ``"top_fraction"``, in (0, 1].

    Returns:
        ``(S,)`` float64.
    """
    s = np.asarray(token_scores, dtype=np.float64)
    if s.ndim not in (2, 3) or s.shape[0] == 0 or s[0].size == 0:
        raise ValueError(f"token_scores must be a non-empty (S, N) or (S, gh, gw) array, got shape {s.shape}")
    s = s.reshape(s.shape[0], -1)
    if reduce == "max":
        return s.max(axis=1)
    if reduce == "mean":
        return s.mean(axis=1)
    if reduce == "top_fraction":
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
        k = max(1, int(np.ceil(fraction * s.shape[1] - 1e-9)))
        return np.sort(s, axis=1)[:, -k:].mean(axis=1)
    raise ValueError(f"unknown slice reducer {reduce!r}; choose one of {SLICE_REDUCERS}")


def volume_score(scores: np.ndarray, *, reduce: str = "max", k: int = 3) -> float:
    """One score per volume from its ``(S,)`` slice scores (``"top_k_mean"``: mean of the min(k, S) highest)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"slice scores must be a non-empty 1-D array, got shape {s.shape}")
    if reduce == "max":
        return float(s.max())
    if reduce == "mean":
        return float(s.mean())
    if reduce == "top_k_mean":
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return float(np.sort(s)[-min(k, s.size):].mean())
    raise ValueError(f"unknown volume reducer {reduce!r}; choose one of {VOLUME_REDUCERS}")


def select_slices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest slice scores (ties -> lower index), returned in slice order, ``(k,)`` int64."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or not 1 <= k <= s.size:
        raise ValueError(f"need 1-D slice scores and 1 <= k <= {s.size}, got shape {s.shape} and k={k}")
    return np.sort(np.argsort(-s, kind="stable")[:k]).astype(np.int64)


def smooth_across_slices(token_scores: np.ndarray, *, size: tuple[int, int, int] = (3, 3, 3), mode: str = "max",
                         positions: np.ndarray | None = None, rel_tol: float = 1e-3) -> np.ndarray:
    """3-D neighbourhood filter of token scores over (slice, row, column).

    Args:
        token_scores: ``(S, gh, gw)`` scores of one volume's slices, in slice order.
        size: odd filter extent along (slice, row, column).
        mode: ``"max"`` or ``"mean"``; borders mirror without repeating the edge (``d c b | a b c d``), so an
            edge slice or token is not counted twice in its own mean.
        positions: optional ``(S,)`` sorted slice positions; must be evenly spaced (within ``rel_tol``).

    Returns:
        ``(S, gh, gw)`` float64.
    """
    s = np.asarray(token_scores, dtype=np.float64)
    if s.ndim != 3 or 0 in s.shape:
        raise ValueError(f"token_scores must be a non-empty (S, gh, gw) array, got shape {s.shape}")
    if len(size) != 3 or any(int(z) < 1 or int(z) % 2 == 0 for z in size):
        raise ValueError(f"size must be three odd positive extents, got {size}")
    if positions is not None:
        p = np.asarray(positions, dtype=np.float64)
        if p.shape != (s.shape[0],):
            raise ValueError(f"positions {p.shape} do not match {s.shape[0]} slices")
        gaps = np.diff(p)
        if gaps.size and (np.any(gaps <= 0) or np.ptp(gaps) > rel_tol * gaps.mean()):
            j = int(np.argmax(np.abs(gaps - np.median(gaps))))
            raise ValueError(f"slices are not evenly spaced: gap {gaps[j]} between positions {p[j]} and {p[j + 1]} "
                             f"(median {np.median(gaps)}); a 3-D filter would join non-adjacent slices")
    if mode == "max":
        return ndimage.maximum_filter(s, size=tuple(int(z) for z in size), mode="mirror")
    if mode == "mean":
        return ndimage.uniform_filter(s, size=tuple(int(z) for z in size), mode="mirror")
    raise ValueError(f"unknown smoothing mode {mode!r}; choose 'max' or 'mean'")


def aggregate_volumes(token_scores: np.ndarray, volume_ids: Sequence[str], positions: Sequence[float], *,
                      slice_reduce: str = "max", volume_reduce: str = "max", k: int = 3,
                      fraction: float = 0.01) -> dict[str, dict]:
    """Per volume: slice scores in slice order, the volume score and the top-k slices.

    Args:
        token_scores: ``(n_images, N)`` token scores, one row per image (slice).
        volume_ids, positions: per image, see :func:`group_volumes`.
        slice_reduce, fraction: see :func:`slice_scores`.
        volume_reduce, k: see :func:`volume_score`; ``k`` also sets how many slices are selected.

    Returns:
        ``{volume_id: {"rows": (S,), "slice_scores": (S,), "score": float, "top_rows": (min(k, S),)}}``.
    """
    s = np.asarray(token_scores)
    if s.ndim != 2 or s.shape[0] != len(volume_ids):
        raise ValueError(f"token_scores {s.shape} must be (n_images, N) with one row per volume id")
    out = {}
    for vol in group_volumes(volume_ids, positions):
        per = slice_scores(s[vol.rows], reduce=slice_reduce, fraction=fraction)
        out[vol.volume_id] = {"rows": vol.rows, "slice_scores": per,
                              "score": volume_score(per, reduce=volume_reduce, k=k),
                              "top_rows": vol.rows[select_slices(per, min(k, per.size))]}
    return out
