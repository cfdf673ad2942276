"""NIfTI CT volumes with segmentations (KiTS23, MSD Task03 liver, MSD Task07 pancreas) to the common layout.

Both volumes are reoriented with :func:`nibabel.as_closest_canonical` (RAS+: axis 0 increases towards the patient's
right, axis 1 towards anterior, axis 2 towards superior), so axial slices are ``data[:, :, k]``.
Each slice is shown the radiological way, like an axial DICOM image: rows run anterior to posterior, columns
from the patient's right to left (``image = data[::-1, ::-1, k].T``). In-plane spacing comes from the canonical
header zooms as (row, column) = (zoom[1], zoom[0]).

Slice selection here never looks at the segmentation (the label-free pipeline must not); choosing slices that
contain lesions is an evaluation concern and lives in ``covtoken.eval``.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from covtoken.data.dicom import WindowPreset, apply_preset
from covtoken.data.layout import EvalMasks, ImageItem, SealedMask

__all__ = ["TUMOUR_LABELS", "NiftiVolume", "load_volume", "select_slices", "volume_items"]

log = logging.getLogger(__name__)

#: Segmentation labels that count as lesion, per dataset convention.
TUMOUR_LABELS: Mapping[str, tuple[int, ...]] = {
    "kits23": (2,),  # 1 kidney, 2 tumour, 3 cyst
    "kits23_with_cyst": (2, 3),
    "msd_liver": (2,),  # Task03: 1 liver, 2 tumour
    "msd_pancreas": (2,),  # Task07: 1 pancreas, 2 tumour (cancer)
}


@dataclass(frozen=True)
class NiftiVolume:
    """A canonical (RAS+) volume and, optionally, its binary lesion mask.

    Attributes:
        data: ``(X, Y, Z)`` float32 intensities (HU for CT).
        lesion: ``(X, Y, Z)`` bool lesion mask, or None without a segmentation.
        zooms_mm: voxel size (x, y, z) in mm after reorientation.
        affine: 4x4 canonical affine.
        image_path: the image file.
        seg_path: the segmentation file, or None.
    """

    data: np.ndarray
    lesion: np.ndarray | None
    zooms_mm: tuple[float, float, float]
    affine: np.ndarray
    image_path: str
    seg_path: str | None

    @property
    def n_slices(self) -> int:
        return int(self.data.shape[2])

    def axial(self, k: int) -> np.ndarray:
        """Slice ``k`` as ``(Y, X)`` float32, rows anterior to posterior, columns right to left."""
        return np.ascontiguousarray(self.data[::-1, ::-1, k].T)

    @property
    def spacing_mm(self) -> tuple[float, float]:
        """In-plane (row, column) spacing of :meth:`axial` slices."""
        return (self.zooms_mm[1], self.zooms_mm[0])


def _load(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        img = nib.load(str(path))
    except (ImageFileError, OSError, EOFError, ValueError, zlib.error) as exc:
        raise ValueError(f"{path}: cannot read NIfTI header: {exc}") from exc
    if len(img.shape) != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {img.shape}")
    try:
        canon = nib.as_closest_canonical(img)
        data = np.asanyarray(canon.dataobj)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise ValueError(f"{path}: cannot read NIfTI voxel data (corrupt or truncated?): {exc}") from exc
    zooms = (float(z) for z in canon.header.get_zooms()[:3])
    return data, canon.affine, tuple(zooms)  # type: ignore[return-value]


def load_volume(
    image_path: str | Path,
    seg_path: str | Path | None = None,
    *,
    tumour_labels: Iterable[int] | str = (2,),
    affine_atol_mm: float = 1e-3,
) -> NiftiVolume:
    """Read an image volume and optionally its segmentation, both reoriented to RAS+.

    Args:
        image_path: the image NIfTI (``.nii`` or ``.nii.gz``).
        seg_path: the label NIfTI, or None.
        tumour_labels: label values that make up the lesion mask, or a key of :data:`TUMOUR_LABELS`.
        affine_atol_mm: largest allowed difference between the image and segmentation affines.

    Returns:
        The volume (float32) and a bool lesion mask (None without ``seg_path``).

    Raises:
        ValueError: unreadable or truncated file, non-3-D data, non-finite voxels, image and segmentation
            shapes or affines that differ (naming both files), unknown label preset.
    """
    image_path = Path(image_path)
    labels = _labels(tumour_labels)
    data, affine, zooms = _load(image_path)
    vol = data.astype(np.float32, copy=False)
    if not np.isfinite(vol).all():
        raise ValueError(f"{image_path}: volume contains NaN or Inf")
    lesion = None
    if seg_path is not None:
        seg_path = Path(seg_path)
        seg, seg_affine, _ = _load(seg_path)
        if seg.shape != vol.shape:
            raise ValueError(
                f"{seg_path}: segmentation shape {seg.shape} does not match image {image_path} shape {vol.shape}"
            )
        if not np.allclose(seg_affine, affine, atol=affine_atol_mm):
            raise ValueError(
                f"{seg_path}: segmentation affine does not match image {image_path} "
                f"(max difference {np.abs(seg_affine - affine).max():.4g})"
            )
        seg_int = np.rint(seg).astype(np.int64)
        if not np.array_equal(seg_int, seg):
            raise ValueError(f"{seg_path}: segmentation has non-integer labels")
        lesion = np.isin(seg_int, labels)
    return NiftiVolume(vol, lesion, zooms, affine, str(image_path), None if seg_path is None else str(seg_path))


def _labels(tumour_labels: Iterable[int] | str) -> tuple[int, ...]:
    if isinstance(tumour_labels, str):
        if tumour_labels not in TUMOUR_LABELS:
            raise ValueError(f"unknown label preset {tumour_labels!r}; choose one of {sorted(TUMOUR_LABELS)}")
        return TUMOUR_LABELS[tumour_labels]
    labels = tuple(int(v) for v in tumour_labels)
    if not labels or 0 in labels:
        raise ValueError(f"tumour labels must be non-empty and exclude background 0, got {labels}")
    return labels


def select_slices(volume: NiftiVolume | int, *, every: int = 1, start: int = 0) -> list[int]:
    """Axial slice indices chosen without looking at any label.

    Args:
        volume: a volume, or its number of slices.
        every: keep one slice in ``every`` (1 keeps all).
        start: first index.

    Returns:
        ``[start, start + every, ...]`` below the number of slices.
    """
    n = volume.n_slices if isinstance(volume, NiftiVolume) else int(volume)
    if every < 1 or start < 0:
        raise ValueError(f"every must be >= 1 and start >= 0, got every={every}, start={start}")
    return list(range(start, n, every))


def volume_items(
    volume: NiftiVolume,
    *,
    patient_id: str,
    slices: Sequence[int] | None = None,
    preset: str | WindowPreset | None = None,
    modality: str = "CT",
) -> tuple[list[ImageItem], EvalMasks]:
    """Axial slices of ``volume`` as common-layout items with sealed lesion masks.

    Args:
        volume: from :func:`load_volume`, with a segmentation.
        patient_id: the patient (KiTS23 case id, MSD case name...).
        slices: indices to take (default: all, see :func:`select_slices`).
        preset: window to [0, 1]; None keeps HU.
        modality: layout modality.

    Returns:
        ``(items, masks)``; image ids are ``"<patient_id>/z<index>"``.
    """
    if volume.lesion is None:
        raise ValueError(f"{volume.image_path}: no segmentation loaded; pass seg_path to load_volume")
    if not patient_id:
        raise ValueError(f"{volume.image_path}: missing patient id")
    idx = select_slices(volume) if slices is None else list(slices)
    bad = [k for k in idx if not 0 <= k < volume.n_slices]
    if bad:
        raise ValueError(f"{volume.image_path}: slice indices {bad[:5]} outside 0..{volume.n_slices - 1}")
    items, masks = [], {}
    for k in idx:
        img = volume.axial(k)
        iid = f"{patient_id}/z{k:04d}"
        items.append(
            ImageItem(
                image=img if preset is None else apply_preset(img, preset),
                image_id=iid,
                patient_id=patient_id,
                modality=modality,
                spacing_mm=volume.spacing_mm,
                source=f"{volume.image_path}#z={k}",
                meta={"slice_index": k, "slice_thickness_mm": volume.zooms_mm[2]},
            )
        )
        lesion = np.ascontiguousarray(volume.lesion[::-1, ::-1, k].T)
        masks[iid] = SealedMask(lesion, source=f"{volume.seg_path}#z={k}")
    log.info("%s: %d slices as items", volume.image_path, len(items))
    return items, EvalMasks(masks, items)
