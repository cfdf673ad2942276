"""Cheap pair baselines a change-detection probe must be read against (higher = more changed).

* pixel L2: root-mean-square difference of the two images;
* SSIM distance: ``1 - SSIM`` (Wang, Bovik, Sheikh & Simoncelli, IEEE TIP 13(4):600, 2004) with the
  paper's constants: an 11 x 11 Gaussian window (sigma 1.5, normalised), K1 = 0.01, K2 = 0.03, dynamic range
  L = 1; local statistics are weighted population moments; the SSIM map is kept only where the window lies
  fully inside the image ("valid" region) and averaged, then averaged over RGB channels;
* raw cosine distance between the two frozen embeddings (what the probe reduces to before training) lives
  with the probe (:func:`covtoken.arch.probe.cosine_distance`).

Grey is compared with RGB as RGB; images of a pair with different sizes are both resized (bilinear, antialiased) to ``size`` x ``size``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import correlate1d

__all__ = ["gaussian_window", "ssim", "pixel_l2", "pair_pixel_scores", "SSIM_SIGMA", "SSIM_RADIUS"]

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5          # 11 x 11 window
_K1, _K2 = 0.01, 0.03


def gaussian_window(sigma: float = SSIM_SIGMA, radius: int = SSIM_RADIUS) -> np.ndarray:
    """The normalised 1-D Gaussian taps ``(2 * radius + 1,)``; the 2-D window is their outer product."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-(x ** 2) / (2.0 * sigma ** 2))
    return g / g.sum()


def _as_channels(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 2:
        return a[..., None]
    if a.ndim == 3 and a.shape[2] in (1, 3):
        return a
    raise ValueError(f"image must be (H, W), (H, W, 1) or (H, W, 3), got shape {a.shape}")


def _filter_valid(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    r = (g.size - 1) // 2
    out = correlate1d(correlate1d(a, g, axis=0, mode="constant"), g, axis=1, mode="constant")
    return out[r:a.shape[0] - r, r:a.shape[1] - r]


def ssim(a: np.ndarray, b: np.ndarray, *, data_range: float = 1.0) -> float:
    """Mean SSIM of two images of one shape.

    Args:
        a, b: ``(H, W)`` or ``(H, W, 3)`` float images, ``H, W >= 11``.
        data_range: L, the dynamic range of the pixel values.

    Returns:
        SSIM in [-1, 1] (1 for identical images), averaged over the valid region and the channels.
    """
    x, y = _as_channels(a), _as_channels(b)
    if x.shape != y.shape:
        raise ValueError(f"ssim needs images of one shape, got {x.shape} and {y.shape}")
    g = gaussian_window()
    if min(x.shape[:2]) < g.size:
        raise ValueError(f"images of shape {x.shape[:2]} are smaller than the {g.size}-pixel SSIM window")
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    vals = []
    for c in range(x.shape[2]):
        xc, yc = x[..., c], y[..., c]
        mx, my = _filter_valid(xc, g), _filter_valid(yc, g)
        vx = _filter_valid(xc * xc, g) - mx * mx
        vy = _filter_valid(yc * yc, g) - my * my
        cxy = _filter_valid(xc * yc, g) - mx * my
        smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        vals.append(smap.mean())
    return float(np.mean(vals))


def pixel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """Root-mean-square pixel difference of two images of one shape."""
    x, y = _as_channels(a), _as_channels(b)
    if x.shape != y.shape:
        raise ValueError(f"pixel_l2 needs images of one shape, got {x.shape} and {y.shape}")
    return float(np.sqrt(np.mean((x - y) ** 2)))


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    t = torch.as_tensor(_as_channels(img), dtype=torch.float32).permute(2, 0, 1)[None]
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[0].permute(1, 2, 0).numpy().astype(np.float64)


def pair_pixel_scores(contexts: Sequence[np.ndarray], targets: Sequence[np.ndarray], *,
                      size: int = 128) -> dict[str, np.ndarray]:
    """Pixel baselines of every pair.

    Args:
        contexts: n context images.
        targets: n target images (same order).
        size: common side used when the two images of a pair differ in shape.

    Returns:
        ``{"pixel_l2": (n,), "ssim_distance": (n,)}``; higher = more changed.
    """
    if len(contexts) != len(targets) or not len(contexts):
        raise ValueError(f"need as many targets as contexts (>= 1), got {len(contexts)} and {len(targets)}")
    l2, sd = np.empty(len(contexts)), np.empty(len(contexts))
    for i, (a, b) in enumerate(zip(contexts, targets)):
        a, b = _as_channels(a), _as_channels(b)
        if a.shape[2] != b.shape[2]:  # grey against RGB: compare as RGB
            a, b = np.repeat(a, 3 // a.shape[2], axis=2), np.repeat(b, 3 // b.shape[2], axis=2)
        if a.shape != b.shape:
            a, b = _resize(a, size), _resize(b, size)
        l2[i] = pixel_l2(a, b)
        sd[i] = 1.0 - ssim(a, b)
    return {"pixel_l2": l2, "ssim_distance": sd}
