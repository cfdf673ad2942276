"""Synthetic acquisition nuisances in three disjoint families, deterministic from a seed.

A *stable* pair (:mod:`covtoken.data.pairs`) is one image and a nuisance-augmented copy of it: the lesion is
unchanged, only the acquisition differs. The nuisances come in three families that share no operation, so a
predictor can be trained on two and evaluated on the held-out third:

* ``lighting`` - exposure and tone: brightness (a gain on every channel), gamma, contrast about the mean
  luma, with torchvision ``transforms.v2.functional`` (``adjust_brightness``, ``adjust_gamma``,
  ``adjust_contrast``). Acts on intensity; a grey image stays grey.
* ``geometry`` - framing: rotation, isotropic scale and a crop offset as one torchvision ``affine`` (bilinear)
  after horizontal/vertical flips (``horizontal_flip``/``vertical_flip``), on a reflect-padded image cropped back
  to the same size (reflected borders, as before: torchvision's ``affine`` alone fills with a constant).
* ``colour`` - chroma: hue rotation and saturation in the YIQ chroma plane (luma Y untouched), and white
  balance as per-channel gains normalised to unit luma gain. This family stays a 3x3 colour matrix:
  torchvision's ``adjust_hue`` rotates hue in HSV, which changes luma, so it would leak exposure changes into the
  colour family and break the disjointness the held-out-family design rests on.

Parameters are drawn by :func:`sample_nuisance` from an RNG that :func:`nuisance_rng` derives from a seed
and a string key (e.g. the image id and view index), so a view is reproducible from ``(seed, key)`` alone
and never depends on the order in which views are made. Images are float32 in [0, 1], ``(H, W, 3)`` RGB or
``(H, W)`` grey (grey images accept lighting and geometry only).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

__all__ = ["FAMILIES", "NuisanceParams", "nuisance_rng", "sample_nuisance", "apply_nuisance", "augment",
           "LUMA_WEIGHTS", "check_family"]

#: Operations of each family; no operation belongs to two families.
FAMILIES: Mapping[str, tuple[str, ...]] = {
    "lighting": ("brightness", "gamma", "contrast"),
    "geometry": ("rotation_deg", "flip_h", "flip_v", "scale", "shift_y", "shift_x"),
    "colour": ("hue_deg", "saturation", "wb_r", "wb_g", "wb_b"),
}
#: ITU-R BT.601 luma weights (the Y of YIQ).
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)

# Ranges of the parameters (uniform unless noted).
_BRIGHTNESS = (0.75, 1.25)
_GAMMA_LOG = (math.log(0.7), math.log(1.4))   # log-uniform
_CONTRAST = (0.7, 1.3)
_ROTATION = (-90.0, 90.0)
_SCALE = (0.85, 1.2)                          # > 1 zooms in (a crop), < 1 zooms out
_SHIFT = (-0.08, 0.08)                        # crop offset as a fraction of the side
_HUE = (-30.0, 30.0)
_SATURATION = (0.6, 1.4)
_WB = (0.85, 1.15)


def check_family(family: str) -> str:
    """Return ``family`` if it is one of :data:`FAMILIES`, else raise naming the choices."""
    if family not in FAMILIES:
        raise ValueError(f"unknown nuisance family {family!r}; choose one of {sorted(FAMILIES)}")
    return family


@dataclass(frozen=True)
class NuisanceParams:
    """One drawn nuisance: its family and the value of every operation of that family.

    Attributes:
        family: a key of :data:`FAMILIES`.
        values: ``(operation, value)`` pairs, in the order of ``FAMILIES[family]`` (flips are 0.0 or 1.0).
    """

    family: str
    values: tuple[tuple[str, float], ...]

    def __post_init__(self) -> None:
        check_family(self.family)
        names = tuple(k for k, _ in self.values)
        if names != FAMILIES[self.family]:
            raise ValueError(f"nuisance {self.family}: operations {names} are not {FAMILIES[self.family]}")

    def as_dict(self) -> dict[str, float]:
        return dict(self.values)

    @classmethod
    def identity(cls, family: str) -> "NuisanceParams":
        """The parameters under which :func:`apply_nuisance` leaves an image unchanged (up to resampling)."""
        neutral = {"brightness": 1.0, "gamma": 1.0, "contrast": 1.0, "rotation_deg": 0.0, "flip_h": 0.0,
                   "flip_v": 0.0, "scale": 1.0, "shift_y": 0.0, "shift_x": 0.0, "hue_deg": 0.0, "saturation": 1.0,
                   "wb_r": 1.0, "wb_g": 1.0, "wb_b": 1.0}
        return cls(check_family(family), tuple((k, neutral[k]) for k in FAMILIES[family]))


def nuisance_rng(seed: int, key: str) -> np.random.Generator:
    """An RNG that depends only on ``seed`` and the string ``key`` (not on call order or process)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence([int(seed), digest]))


def sample_nuisance(family: str, rng: np.random.Generator) -> NuisanceParams:
    """Draw the parameters of one nuisance of ``family``.

    Args:
        family: ``"lighting"``, ``"geometry"`` or ``"colour"``.
        rng: e.g. from :func:`nuisance_rng`.

    Returns:
        :class:`NuisanceParams` with a value for every operation of the family.
    """
    check_family(family)
    if family == "lighting":
        v = {"brightness": rng.uniform(*_BRIGHTNESS), "gamma": math.exp(rng.uniform(*_GAMMA_LOG)),
             "contrast": rng.uniform(*_CONTRAST)}
    elif family == "geometry":
        v = {"rotation_deg": rng.uniform(*_ROTATION), "flip_h": float(rng.random() < 0.5),
             "flip_v": float(rng.random() < 0.5), "scale": rng.uniform(*_SCALE), "shift_y": rng.uniform(*_SHIFT),
             "shift_x": rng.uniform(*_SHIFT)}
    else:
        gains = rng.uniform(*_WB, size=3)
        gains = gains / float(LUMA_WEIGHTS @ gains)  # unit luma gain: white balance does not change exposure
        v = {"hue_deg": rng.uniform(*_HUE), "saturation": rng.uniform(*_SATURATION), "wb_r": gains[0],
             "wb_g": gains[1], "wb_b": gains[2]}
    return NuisanceParams(family, tuple((k, float(v[k])) for k in FAMILIES[family]))


def _luma(img: np.ndarray) -> np.ndarray:
    return img @ LUMA_WEIGHTS if img.ndim == 3 else img


def _tensor(img: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, 3) -> (C, H, W) float32 tensor, the layout torchvision's functionals take."""
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1)


def _array(t: torch.Tensor, ndim: int) -> np.ndarray:
    return (t[0] if ndim == 2 else t.permute(1, 2, 0)).numpy().astype(np.float64)


def _lighting(img: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    x = TF.adjust_brightness(_tensor(img), p["brightness"])     # gain, clamped to [0, 1]
    x = TF.adjust_gamma(x, p["gamma"])                           # x ** gamma
    x = TF.adjust_contrast(x, p["contrast"])                     # about the mean luma (grey: the mean)
    return _array(x, img.ndim)


def _geometry(img: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    h, w = img.shape[:2]
    x = _tensor(img)
    if p["flip_h"]:
        x = TF.horizontal_flip(x)
    if p["flip_v"]:
        x = TF.vertical_flip(x)
    if p["rotation_deg"] == 0.0 and p["scale"] == 1.0 and p["shift_x"] == 0.0 and p["shift_y"] == 0.0:
        return _array(x, img.ndim)  # no resampling for the identity (bilinear grids add ~1e-6 of rounding)
    ph, pw = h // 2, w // 2  # reflected borders: rotation <= 90 deg, zoom-out and shift stay inside
    x = TF.pad(x, [pw, ph, pw, ph], padding_mode="reflect")
    x = TF.affine(x, angle=p["rotation_deg"], translate=[-p["shift_x"] * w, -p["shift_y"] * h],
                  scale=p["scale"], shear=[0.0, 0.0], interpolation=InterpolationMode.BILINEAR)
    return _array(TF.crop(x, ph, pw, h, w), img.ndim)


def _colour(img: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    if img.ndim != 3:
        raise ValueError(f"the colour family needs an (H, W, 3) RGB image, got shape {img.shape}")
    th = math.radians(p["hue_deg"])
    chroma = p["saturation"] * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    yiq = np.eye(3)
    yiq[1:, 1:] = chroma
    m = _YIQ_TO_RGB @ yiq @ _RGB_TO_YIQ            # hue + saturation, luma preserved
    x = img @ m.T
    return x * np.array([p["wb_r"], p["wb_g"], p["wb_b"]])


_APPLY = {"lighting": _lighting, "geometry": _geometry, "colour": _colour}


def apply_nuisance(image: np.ndarray, params: NuisanceParams) -> np.ndarray:
    """Apply one drawn nuisance.

    Args:
        image: ``(H, W, 3)`` or ``(H, W)`` float image in [0, 1].
        params: from :func:`sample_nuisance` (or :meth:`NuisanceParams.identity`).

    Returns:
        float32 array of the same shape, clipped to [0, 1].
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"image must be (H, W) or (H, W, 3), got shape {img.shape}")
    if not np.isfinite(img).all():
        raise ValueError("image contains NaN or Inf")
    out = _APPLY[params.family](img, params.as_dict())
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def augment(image: np.ndarray, family: str, *, seed: int, key: str) -> tuple[np.ndarray, NuisanceParams]:
    """Draw a nuisance of ``family`` from ``(seed, key)`` and apply it.

    Returns:
        ``(augmented (H, W[, 3]) float32, params)``.
    """
    params = sample_nuisance(family, nuisance_rng(seed, f"{family}|{key}"))
    return apply_nuisance(image, params), params
