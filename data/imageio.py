"""Decoding 2-D image files and PIL images into layout arrays: grey or RGB in [0, 1], strict binary masks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["open_image", "pil_to_grey", "pil_to_rgb", "pil_to_mask", "check_mask"]

_16BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file.

    Args:
        path: PNG/JPEG/... file.

    Returns:
        The decoded PIL image (pixels loaded, file closed).

    Raises:
        ValueError: missing, unidentifiable or truncated file, naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{path}: cannot decode image (corrupt or truncated?): {exc}") from exc


def _array(img: Image.Image, where: str) -> np.ndarray:
    if img.mode in ("P", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    elif img.mode in ("LA", "1"):
        img = img.convert("L")
    if img.mode not in ("L", "RGB") and img.mode not in _16BIT_MODES:
        raise ValueError(f"{where}: unsupported image mode {img.mode!r}")
    return np.asarray(img)


def _scale(arr: np.ndarray, mode: str, where: str) -> np.ndarray:
    if mode in _16BIT_MODES:
        if arr.min() < 0 or arr.max() > 65535:
            raise ValueError(f"{where}: 32-bit integer image outside the 16-bit range")
        return arr.astype(np.float32) / np.float32(65535.0)
    return arr.astype(np.float32) / np.float32(255.0)


def pil_to_grey(img: Image.Image, where: str) -> np.ndarray:
    """A PIL image as ``(H, W)`` float32 grey in [0, 1].

    8-bit images are divided by 255, 16-bit by 65535. RGB images whose three channels are equal give one
    channel; other colour images are converted with PIL's ITU-R 601-2 luma.

    Args:
        img: decoded image.
        where: file or row name for error messages.

    Returns:
        The grey image.
    """
    mode = img.mode
    arr = _array(img, where)
    if arr.ndim == 3:
        if (arr == arr[..., :1]).all():
            arr = arr[..., 0]
        else:
            arr = np.asarray(Image.fromarray(arr).convert("L"))
        mode = "L"
    return _scale(arr, mode, where)


def pil_to_rgb(img: Image.Image, where: str) -> np.ndarray:
    """A PIL image as ``(H, W, 3)`` float32 RGB in [0, 1] (grey images are repeated on three channels).

    Args:
        img: decoded image.
        where: file or row name for error messages.

    Returns:
        The RGB image.
    """
    arr = _array(img, where)
    if arr.ndim == 2:
        arr = _scale(arr, img.mode, where)
        return np.repeat(arr[..., None], 3, axis=2)
    return _scale(arr, "RGB", where)


def pil_to_mask(img: Image.Image, where: str) -> np.ndarray:
    """A mask image as ``(H, W)`` bool; values must be {0, 1} or {0, 255} (or a subset).

    Args:
        img: decoded mask.
        where: file or row name for error messages.

    Returns:
        The boolean mask.

    Raises:
        ValueError: channels that differ, or values other than 0 and one foreground level.
    """
    arr = _array(img, where)
    if arr.ndim == 3:
        if not (arr == arr[..., :1]).all():
            raise ValueError(f"{where}: colour mask with differing channels")
        arr = arr[..., 0]
    values = np.unique(arr)
    if not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
        more = "..." if values.size > 8 else ""
        raise ValueError(f"{where}: mask is not binary (values {values[:8].tolist()}{more})")
    return arr > 0


def check_mask(mask: np.ndarray, image_shape: tuple[int, ...], *, mask_where: str, image_where: str) -> bool:
    """Check a mask against its image; return whether it is empty.

    Args:
        mask: ``(H, W)`` bool.
        image_shape: shape of the image it belongs to.
        mask_where: mask file or row (for messages).
        image_where: image file or row (for messages).

    Returns:
        True when the mask has no lesion pixel.

    Raises:
        ValueError: shape mismatch (naming both), or a mask that covers the whole image.
    """
    if mask.shape != tuple(image_shape[:2]):
        raise ValueError(
            f"{mask_where}: mask shape {mask.shape} does not match image {image_where} shape {tuple(image_shape[:2])}"
        )
    if mask.all():
        raise ValueError(f"{mask_where}: mask covers the whole image (all lesion); wrong file or inverted mask?")
    return not mask.any()


def colour_fraction(arr: np.ndarray, *, spread: float = 16 / 255) -> float:
    """Fraction of pixels whose channels differ by more than ``spread`` (0 for a 2-D grey image).

    Grey ultrasound/CT stored as RGB scores near 0 (annotation marks may colour a few per cent); a colour
    photograph (dermoscopy) scores near 1.

    Args:
        arr: ``(H, W)`` or ``(H, W, 3)`` image, uint8 or float in [0, 1].
        spread: channel spread (in [0, 1] units) above which a pixel counts as coloured.
    """
    a = np.asarray(arr)
    if a.ndim != 3:
        return 0.0
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / np.float32(255.0)
    return float(((a.max(axis=2) - a.min(axis=2)) > spread).mean())
