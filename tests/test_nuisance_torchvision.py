"""The lighting and geometry nuisances are torchvision transforms.v2 functionals; checked against plain numpy."""
from __future__ import annotations

import numpy as np
import pytest

from covtoken.data.nuisance import NuisanceParams, apply_nuisance


def geometry(rot: float = 0.0, flip_h: float = 0.0, flip_v: float = 0.0, scale: float = 1.0) -> NuisanceParams:
    return NuisanceParams("geometry", (("rotation_deg", rot), ("flip_h", flip_h), ("flip_v", flip_v),
                                       ("scale", scale), ("shift_y", 0.0), ("shift_x", 0.0)))


def test_flips_and_quarter_turn_equal_numpy() -> None:
    img = np.random.default_rng(0).random((17, 17), dtype=np.float32)
    np.testing.assert_array_equal(apply_nuisance(img, geometry(flip_h=1.0)), img[:, ::-1])
    np.testing.assert_array_equal(apply_nuisance(img, geometry(flip_v=1.0)), img[::-1])
    np.testing.assert_allclose(apply_nuisance(img, geometry(rot=90.0)), np.rot90(img, -1), atol=1e-5)  # clockwise


def test_borders_are_reflected_not_filled() -> None:
    ones = np.ones((32, 40, 3), np.float32)
    out = apply_nuisance(ones, geometry(rot=45.0, scale=0.85))
    assert out.min() == pytest.approx(1.0, abs=1e-5)  # torchvision's affine alone would fill corners with 0


def test_lighting_equals_the_formula() -> None:
    img = np.random.default_rng(1).random((9, 11, 3), dtype=np.float32)
    p = NuisanceParams("lighting", (("brightness", 1.2), ("gamma", 0.8), ("contrast", 1.1)))
    x = np.clip(img * 1.2, 0, 1) ** 0.8
    m = (x @ np.array([0.2989, 0.587, 0.114])).mean()  # torchvision's grey weights
    np.testing.assert_allclose(apply_nuisance(img, p), np.clip((x - m) * 1.1 + m, 0, 1), atol=1e-5)
