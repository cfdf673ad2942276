"""Trivial label-free baselines a localisation claim must be read against.

:func:`token_intensity` is the mean pixel intensity inside each token's region after the backbone's square
resize: "brightness" (CT nodules) or, negated, "darkness" (hypoechoic ultrasound masses). Which sign is used
is chosen on the validation split, never on test.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["token_intensity"]


def token_intensity(images: Sequence[np.ndarray], grid: tuple[int, int]) -> np.ndarray:
    """Mean intensity of each token region.

    Args:
        images: ``(H, W)`` grey or ``(H, W, 3)`` RGB arrays (RGB is averaged over channels).
        grid: token grid ``(gh, gw)``.

    Returns:
        ``(len(images), gh * gw)`` float64.
    """
    out = np.empty((len(images), grid[0] * grid[1]), dtype=np.float64)
    for i, img in enumerate(images):
        a = np.asarray(img, dtype=np.float32)
        if a.ndim == 3:
            a = a.mean(axis=2)
        out[i] = F.adaptive_avg_pool2d(torch.from_numpy(a)[None, None], grid).reshape(-1).numpy()
    return out
