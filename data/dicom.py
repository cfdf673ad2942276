"""DICOM reading: stored values to Hounsfield units, windowing presets, series sorting, orientation checks.

Reading goes through pydicom. A CT slice becomes float32 HU via RescaleSlope/RescaleIntercept; pixels equal to
PixelPaddingValue (outside the reconstruction field of view) are set to -1024 HU, the usual CT floor. A series
is sorted by ImagePositionPatient projected on the slice normal (the cross product of the two direction cosines
in ImageOrientationPatient), falling back to InstanceNumber when positions are missing. Slices whose normal is
more than ``max_tilt_deg`` away from the patient z axis are refused as non-axial unless ``allow_non_axial`` is
passed, because everything downstream assumes axial slices.

Errors name the file: a corrupt or truncated file raises ``ValueError(f"{path}: ...")``.
"""
from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue

from covtoken.data.layout import ImageItem

__all__ = [
    "WindowPreset",
    "PRESETS",
    "DicomSlice",
    "window",
    "apply_preset",
    "to_hu",
    "read_dicom",
    "read_series",
    "slices_to_items",
]

log = logging.getLogger(__name__)

#: HU value given to PixelPaddingValue pixels (outside the field of view).
PADDING_HU = -1024.0


@dataclass(frozen=True)
class WindowPreset:
    """A display window in HU: ``[center - width/2, center + width/2]`` maps to ``[0, 1]``."""

    center: float
    width: float


#: Named windows (center, width) in HU. Lung, mediastinum, abdomen/soft tissue, liver and bone are the usual
#: radiology values; "kidney" is the KiTS19 nnU-Net foreground clip [-79, 304] HU (Isensee et al. 2019).
PRESETS: Mapping[str, WindowPreset] = {
    "lung": WindowPreset(-600.0, 1500.0),
    "mediastinum": WindowPreset(50.0, 350.0),
    "soft_tissue": WindowPreset(40.0, 400.0),
    "abdomen": WindowPreset(40.0, 400.0),
    "liver": WindowPreset(60.0, 160.0),
    "kidney": WindowPreset(112.5, 383.0),
    "pancreas": WindowPreset(40.0, 400.0),
    "bone": WindowPreset(400.0, 1800.0),
}


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linearly map ``[center - width/2, center + width/2]`` to ``[0, 1]`` and clip.

    Args:
        hu: array of HU values, any shape.
        center: window center in HU.
        width: window width in HU, > 0.

    Returns:
        float32 array of the same shape with values in [0, 1].
    """
    if not (width > 0 and math.isfinite(width) and math.isfinite(center)):
        raise ValueError(f"window width must be finite and > 0 and center finite, got center={center}, width={width}")
    lo = center - width / 2.0
    out = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) / np.float32(width)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def apply_preset(hu: np.ndarray, preset: str | WindowPreset) -> np.ndarray:
    """Window ``hu`` with a named preset from :data:`PRESETS` (or a :class:`WindowPreset`).

    Args:
        hu: array of HU values.
        preset: preset name or an explicit window.

    Returns:
        float32 array in [0, 1].
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown window preset {preset!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    return window(hu, preset.center, preset.width)


@dataclass(frozen=True)
class DicomSlice:
    """One decoded DICOM image.

    Attributes:
        hu: ``(rows, cols)`` float32, rescaled values (HU for CT).
        path: the file it came from.
        modality: DICOM Modality (``"CT"``, ``"MR"``...).
        spacing_mm: PixelSpacing as (row spacing, column spacing) in mm, or None when absent.
        position: ImagePositionPatient (x, y, z) in mm, or None.
        orientation: ImageOrientationPatient (6 direction cosines), or None.
        instance_number: InstanceNumber, or None.
        slice_thickness_mm: SliceThickness, or None.
        meta: identifiers and geometry kept for the common layout (patient id, series and SOP instance UIDs...).
    """

    hu: np.ndarray
    path: str
    modality: str
    spacing_mm: tuple[float, float] | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    instance_number: int | None
    slice_thickness_mm: float | None
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def normal(self) -> np.ndarray | None:
        """Unit slice normal (row cosines x column cosines), or None without an orientation."""
        return None if self.orientation is None else _normal(self.orientation)


def _normal(orientation: Iterable[float]) -> np.ndarray:
    iop = np.asarray(list(orientation), dtype=np.float64)
    n = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        raise ValueError(f"degenerate ImageOrientationPatient {iop.tolist()}")
    return n / norm


def _floats(value: Any, n: int, what: str, path: str) -> tuple[float, ...] | None:
    if value is None or value == "":
        return None
    try:
        seq = value if isinstance(value, (list, tuple, MultiValue)) else [value]
        vals = tuple(float(v) for v in seq)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {what} is not numeric: {value!r}") from exc
    if len(vals) != n or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"{path}: {what} must have {n} finite values, got {value!r}")
    return vals


def to_hu(ds: Dataset, path: str | Path = "<dataset>") -> np.ndarray:
    """Decode the pixel data of ``ds`` and apply RescaleSlope/RescaleIntercept.

    Args:
        ds: a single-frame greyscale DICOM dataset.
        path: used in error messages.

    Returns:
        ``(rows, cols)`` float32 array (HU for CT). Padding pixels become :data:`PADDING_HU` for CT.

    Raises:
        ValueError: pixel data missing, truncated, multi-frame or colour; non-numeric rescale values.
    """
    if "PixelData" not in ds:
        raise ValueError(f"{path}: no PixelData element")
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises ValueError, NotImplementedError, RuntimeError... for bad pixel data
        raise ValueError(f"{path}: pixel data cannot be decoded (truncated or corrupt?): {exc}") from exc
    if stored.ndim != 2:
        raise ValueError(f"{path}: expected a single-frame greyscale image, got pixel array shape {stored.shape}")
    slope = _floats(ds.get("RescaleSlope", 1), 1, "RescaleSlope", str(path))
    intercept = _floats(ds.get("RescaleIntercept", 0), 1, "RescaleIntercept", str(path))
    slope_v = 1.0 if slope is None else slope[0]
    intercept_v = 0.0 if intercept is None else intercept[0]
    hu = stored.astype(np.float32) * np.float32(slope_v) + np.float32(intercept_v)
    pad = ds.get("PixelPaddingValue")
    if pad is not None and str(ds.get("Modality", "")).upper() == "CT":
        padded = stored == pad
        if padded.any():
            hu[padded] = PADDING_HU
    return hu


def read_dicom(
    path: str | Path, *, allow_non_axial: bool = False, max_tilt_deg: float = 20.0
) -> DicomSlice:
    """Read one DICOM file into a :class:`DicomSlice`.

    Args:
        path: the file.
        allow_non_axial: accept slices whose normal is far from z, or that carry no orientation.
        max_tilt_deg: largest angle between the slice normal and the z axis still called axial (gantry tilt).

    Returns:
        The decoded slice with spacing, position and orientation.

    Raises:
        ValueError: unreadable, truncated or non-DICOM file; non-axial slice unless allowed.
    """
    path = str(path)
    try:
        ds = pydicom.dcmread(path)
        for _ in ds.iterall():  # decode every element now, so a truncated header fails here with the file name
            pass
    except (InvalidDicomError, BytesLengthException, OSError, EOFError, ValueError, KeyError, TypeError,
            struct.error) as exc:
        raise ValueError(f"{path}: not a readable DICOM file: {exc}") from exc
    hu = to_hu(ds, path)
    spacing = _floats(ds.get("PixelSpacing"), 2, "PixelSpacing", path)
    position = _floats(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", path)
    orientation = _floats(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", path)
    if orientation is None:
        if not allow_non_axial:
            raise ValueError(
                f"{path}: no ImageOrientationPatient, so the slice cannot be confirmed axial; "
                "pass allow_non_axial=True to accept it"
            )
    else:
        try:
            n = _normal(orientation)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        tilt = math.degrees(math.acos(min(1.0, abs(float(n[2])))))
        if tilt > max_tilt_deg and not allow_non_axial:
            raise ValueError(
                f"{path}: non-axial slice (normal {np.round(n, 3).tolist()} is {tilt:.1f} deg from z, "
                f"limit {max_tilt_deg} deg); pass allow_non_axial=True to accept it"
            )
    inst = ds.get("InstanceNumber")
    thick = _floats(ds.get("SliceThickness"), 1, "SliceThickness", path)
    meta = {
        "patient_id": str(ds.get("PatientID", "")),
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
        "rows": int(ds.get("Rows", hu.shape[0])),
        "cols": int(ds.get("Columns", hu.shape[1])),
    }
    return DicomSlice(
        hu=hu,
        path=path,
        modality=str(ds.get("Modality", "")),
        spacing_mm=None if spacing is None else (spacing[0], spacing[1]),
        position=None if position is None else (position[0], position[1], position[2]),
        orientation=orientation,
        instance_number=None if inst in (None, "") else int(inst),
        slice_thickness_mm=None if thick is None else thick[0],
        meta=meta,
    )


def read_series(
    paths: str | Path | Iterable[str | Path],
    *,
    allow_non_axial: bool = False,
    max_tilt_deg: float = 20.0,
    pattern: str = "*.dcm",
) -> list[DicomSlice]:
    """Read and sort the slices of one series.

    Slices are sorted by ImagePositionPatient projected on the common slice normal; when any slice lacks a
    position or orientation the order falls back to InstanceNumber (logged).

    Args:
        paths: a directory (files matching ``pattern``) or an iterable of files.
        allow_non_axial: see :func:`read_dicom`.
        max_tilt_deg: see :func:`read_dicom`.
        pattern: glob used when ``paths`` is a directory.

    Returns:
        Slices in ascending position along the normal.

    Raises:
        ValueError: no files; files from several series; differing orientations or shapes; two slices at the
            same position; neither positions nor instance numbers to sort by.
    """
    if isinstance(paths, (str, Path)):
        root = Path(paths)
        if not root.is_dir():
            raise ValueError(f"{root}: not a directory")
        files = sorted(root.glob(pattern))
        where = str(root)
    else:
        files = [Path(p) for p in paths]
        where = ", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
    if not files:
        raise ValueError(f"{where}: no DICOM files")
    slices = [read_dicom(f, allow_non_axial=allow_non_axial, max_tilt_deg=max_tilt_deg) for f in files]
    first = slices[0]
    for s in slices[1:]:
        if s.meta["series_instance_uid"] != first.meta["series_instance_uid"]:
            raise ValueError(
                f"{s.path}: SeriesInstanceUID {s.meta['series_instance_uid']} differs from "
                f"{first.path} ({first.meta['series_instance_uid']}); read one series at a time"
            )
        if s.hu.shape != first.hu.shape:
            raise ValueError(f"{s.path}: shape {s.hu.shape} differs from {first.path} shape {first.hu.shape}")
        if (s.orientation is None) != (first.orientation is None) or (
            s.orientation is not None and not np.allclose(s.orientation, first.orientation, atol=1e-4)
        ):
            raise ValueError(f"{s.path}: ImageOrientationPatient differs from {first.path}")
    if all(s.position is not None and s.orientation is not None for s in slices):
        n = first.normal
        keys = [float(np.dot(n, s.position)) for s in slices]
        order = np.argsort(keys, kind="stable")
        sorted_keys = [keys[i] for i in order]
        for a, b in zip(order[:-1], order[1:]):
            if abs(keys[b] - keys[a]) < 1e-3:
                raise ValueError(
                    f"{slices[b].path}: same position along the slice normal as {slices[a].path} "
                    f"({keys[a]:.3f} mm); several acquisitions in one series?"
                )
        log.debug("sorted %d slices by position, %.2f..%.2f mm", len(slices), sorted_keys[0], sorted_keys[-1])
        return [slices[i] for i in order]
    if any(s.instance_number is None for s in slices):
        missing = next(s.path for s in slices if s.instance_number is None)
        raise ValueError(
            f"{missing}: neither ImagePositionPatient/ImageOrientationPatient nor InstanceNumber to sort by"
        )
    log.warning("%s: slice positions missing; sorting %d slices by InstanceNumber", where, len(slices))
    return sorted(slices, key=lambda s: s.instance_number)


def _preset_label(preset: str | WindowPreset | None) -> str | list[float] | None:
    if preset is None or isinstance(preset, str):
        return preset
    return [preset.center, preset.width]


def slices_to_items(
    slices: Iterable[DicomSlice], *, preset: str | WindowPreset | None = None, patient_id: str | None = None
) -> list[ImageItem]:
    """Turn decoded slices into common-layout items (no masks: DICOM images carry none).

    Args:
        slices: from :func:`read_dicom` / :func:`read_series`.
        preset: window to map HU to [0, 1]; None keeps HU.
        patient_id: overrides the DICOM PatientID (which must otherwise be non-empty).

    Returns:
        One :class:`ImageItem` per slice, image id ``"<series uid>/<sop instance uid>"``.
    """
    items = []
    for s in slices:
        pid = patient_id or s.meta["patient_id"]
        if not pid:
            raise ValueError(f"{s.path}: missing patient id (PatientID is empty)")
        img = s.hu if preset is None else apply_preset(s.hu, preset)
        items.append(
            ImageItem(
                image=img,
                image_id=f"{s.meta['series_instance_uid']}/{s.meta['sop_instance_uid']}",
                patient_id=pid,
                modality=s.modality,
                spacing_mm=s.spacing_mm,
                source=s.path,
                meta={
                    "instance_number": s.instance_number,
                    "position_mm": s.position,
                    "slice_thickness_mm": s.slice_thickness_mm,
                    "window": _preset_label(preset),
                },
            )
        )
    return items
