"""The common layout every dataset adapter produces.

One :class:`ImageItem` per 2-D image or slice (pixels, patient id, spacing, modality). Lesion masks are never
part of an item: adapters return them separately inside :class:`EvalMasks`, sealed, and only code in
``covtoken.eval`` can open a :class:`SealedMask` (see :func:`unseal`). Subspace construction, coverage and the
token gate therefore cannot see labels even by accident, and the label-leak test checks that they do not try.
"""
from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np

__all__ = ["ImageItem", "SealedMask", "EvalMasks", "LabelLeakError", "unseal", "unseal_labels", "EVAL_PACKAGE",
           "DATA_PACKAGE"]

#: Evaluation opens masks to score against them.
EVAL_PACKAGE = "covtoken.eval"
#: The data layer reads and writes mask files (loaders, dataset export); it hands masks out sealed.
DATA_PACKAGE = "covtoken.data"
_ALLOWED = (EVAL_PACKAGE, DATA_PACKAGE)


class LabelLeakError(RuntimeError):
    """A mask or label was opened outside evaluation."""


@dataclass(frozen=True)
class ImageItem:
    """One image or slice in the common layout.

    Attributes:
        image: ``(H, W)`` float32 grey image (CT in HU or windowed to [0, 1]; ultrasound in [0, 1]) or
            ``(H, W, 3)`` float32 RGB in [0, 1].
        image_id: unique within the dataset.
        patient_id: the independent sampling unit; splits are made on it.
        modality: ``"CT"``, ``"US"`` or ``"dermoscopy"``.
        spacing_mm: in-plane pixel spacing (row, col) in mm, or None when the source has none.
        source: file or dataset row the pixels came from (used in error messages).
        meta: free metadata (lesion id, diagnosis, site, slice position...).
    """

    image: np.ndarray
    image_id: str
    patient_id: str
    modality: str
    spacing_mm: tuple[float, float] | None = None
    source: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = self.source or self.image_id
        if not self.patient_id:
            raise ValueError(f"{where}: missing patient id")
        img = self.image
        if not isinstance(img, np.ndarray) or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
            raise ValueError(f"{where}: image must be (H, W) or (H, W, 3), got {getattr(img, 'shape', type(img))}")
        if not np.isfinite(img).all():
            raise ValueError(f"{where}: image contains NaN or Inf")

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])


class SealedMask:
    """A binary lesion mask, with the image's labels (diagnosis...), that refuses to be read outside
    ``covtoken.eval`` (and the data layer that wrote it).

    The pixels and labels are not attributes of the object: they live in a module-private vault keyed by the
    mask object, and only :func:`unseal` / :func:`unseal_labels` (which check their caller) read them back.
    ``np.asarray(mask)`` raises; copies and pickles carry no pixels. The static check in
    ``tests/test_label_leak.py`` fails on any access to the vault outside ``data/`` and ``eval/``.
    """

    __slots__ = ("source", "_shape", "__weakref__")

    def __init__(self, array: np.ndarray, *, source: str, labels: Mapping[str, Any] | None = None) -> None:
        arr = np.asarray(array)
        if arr.ndim != 2:
            raise ValueError(f"{source}: mask must be 2-D, got shape {arr.shape}")
        arr = arr.astype(bool, copy=True)
        arr.setflags(write=False)
        _VAULT[self] = (arr, dict(labels or {}))
        self._shape = (int(arr.shape[0]), int(arr.shape[1]))
        self.source = source

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape  # the geometry is not a label

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise LabelLeakError(f"mask {self.source!r} is evaluation-only; open it with covtoken.eval")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise LabelLeakError(f"mask {self.source!r} cannot be pickled or copied; it stays sealed in this process")

    def __repr__(self) -> str:
        return f"SealedMask(source={self.source!r}, shape={self.shape})"


#: mask object -> (pixels, labels); weak keys, so a mask's pixels go with the mask
_VAULT: "weakref.WeakKeyDictionary[SealedMask, tuple[np.ndarray, dict]]" = weakref.WeakKeyDictionary()


def _open(mask: SealedMask) -> tuple[np.ndarray, dict]:
    try:
        return _VAULT[mask]
    except (KeyError, TypeError):
        raise LabelLeakError(f"{mask!r} is not a sealed mask of this process") from None


def _check_caller(caller: str, mask: SealedMask) -> None:
    if not any(caller == p or caller.startswith(p + ".") for p in _ALLOWED):
        raise LabelLeakError(f"{caller or '<unknown>'} tried to open mask {mask.source!r}; only {EVAL_PACKAGE} may "
                             f"(and {DATA_PACKAGE}, which reads and writes mask files)")


def unseal(mask: SealedMask) -> np.ndarray:
    """Return the boolean mask array (read-only); only callable from ``covtoken.eval`` (and ``covtoken.data``).

    Raises:
        LabelLeakError: when the caller lives anywhere else, or ``mask`` is not a sealed mask of this process.
    """
    _check_caller(sys._getframe(1).f_globals.get("__name__", ""), mask)
    return _open(mask)[0]


def unseal_labels(mask: SealedMask) -> Mapping[str, Any]:
    """The image-level labels sealed with the mask (e.g. ``diagnosis``); same rule as :func:`unseal`."""
    _check_caller(sys._getframe(1).f_globals.get("__name__", ""), mask)
    return dict(_open(mask)[1])


class EvalMasks(Mapping[str, SealedMask]):
    """Sealed masks keyed by image id, checked against the images they belong to."""

    def __init__(self, masks: Mapping[str, SealedMask], items: list[ImageItem] | None = None) -> None:
        self._masks = dict(masks)
        if items is not None:
            for item in items:
                m = self._masks.get(item.image_id)
                if m is None:
                    raise ValueError(f"{item.source or item.image_id}: no mask for image {item.image_id!r}")
                if m.shape != item.hw:
                    raise ValueError(
                        f"{m.source}: mask shape {m.shape} does not match image {item.source or item.image_id} "
                        f"shape {item.hw}"
                    )

    def __getitem__(self, key: str) -> SealedMask:
        return self._masks[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)
