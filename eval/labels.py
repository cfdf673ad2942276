"""Where masks meet tokens: per-token lesion fraction and the token label rule.

This is the only place masks are opened (through :func:`covtoken.data.layout.unseal`). The lesion fraction of
a token is the mean of the binary mask over the image region that the token covers after the backbone's
square resize (area averaging with ``adaptive_avg_pool2d``, exact when the image side is a multiple of the
grid). A token is positive when its fraction is at least ``positive_min``, negative when it is at most
``negative_max`` and excluded (ambiguous border token) in between.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.layout import EvalMasks, unseal

__all__ = ["token_lesion_fraction", "token_labels", "lesion_components"]


def token_lesion_fraction(masks: EvalMasks, image_ids: Sequence[str], grid: tuple[int, int]) -> np.ndarray:
    """Lesion fraction of every token.

    Args:
        masks: sealed masks keyed by image id.
        image_ids: images in token-bank order.
        grid: token grid ``(gh, gw)``.

    Returns:
        ``(len(image_ids), gh * gw)`` float32 in [0, 1], row-major over the grid.
    """
    out = np.empty((len(image_ids), grid[0] * grid[1]), dtype=np.float32)
    for i, iid in enumerate(image_ids):
        m = torch.from_numpy(unseal(masks[iid]).astype(np.float32))[None, None]
        out[i] = F.adaptive_avg_pool2d(m, grid).reshape(-1).numpy()
    return out


def token_labels(fraction: np.ndarray, *, positive_min: float, negative_max: float) -> np.ndarray:
    """``1`` positive, ``0`` negative, ``-1`` excluded, same shape as ``fraction``."""
    if not 0.0 <= negative_max < positive_min <= 1.0:
        raise ValueError(f"need 0 <= negative_max < positive_min <= 1, got {negative_max}, {positive_min}")
    lab = np.full(fraction.shape, -1, dtype=np.int8)
    lab[fraction >= positive_min] = 1
    lab[fraction <= negative_max] = 0
    return lab


def lesion_components(masks: EvalMasks, image_ids: Sequence[str], grid: tuple[int, int]) -> list[list[dict]]:
    """Connected lesions of each image with their area in tokens and the tokens they touch.

    Returns:
        per image, a list of ``{"area_tokens": float, "tokens": np.ndarray of flat token indices}``.
    """
    from scipy import ndimage

    res: list[list[dict]] = []
    for iid in image_ids:
        m = unseal(masks[iid])
        lab, n = ndimage.label(m)
        h, w = m.shape
        token_area = (h / grid[0]) * (w / grid[1])
        comps = []
        for k in range(1, n + 1):
            comp = torch.from_numpy((lab == k).astype(np.float32))[None, None]
            frac = F.adaptive_avg_pool2d(comp, grid).reshape(-1).numpy()
            comps.append({"area_tokens": float((lab == k).sum() / token_area), "tokens": np.flatnonzero(frac > 0)})
        res.append(comps)
    return res
