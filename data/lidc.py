"""LIDC-IDRI nodule slices (Armato et al. 2011, TCIA) from the preprocessed sample to the common layout.

Expected folder: ``lidc_nodule_slices.npz`` with ``images`` (N, H, W) and ``masks`` (N, H, W) bool, and
``index.csv`` with one row per slice and the columns ``patient`` and ``image`` (optional ``mask_pixels`` is
checked against the mask).

The slices are NOT in Hounsfield units: the source pipeline z-scored each slice, median-filtered it, applied
anisotropic diffusion and set everything outside a k-means lung mask to 0. No CT window applies, so each slice
is scaled robustly on its own: the 0.5th and 99.5th percentiles of its pixels map to 0 and 1, values outside
are clipped. Pixel spacing was lost in preprocessing (``spacing_mm=None``). Split by patient, never by slice.
"""
from __future__ import annotations

import csv
import logging
import zipfile
from pathlib import Path

import numpy as np

from covtoken.data.imageio import check_mask
from covtoken.data.layout import EvalMasks, ImageItem, SealedMask

__all__ = ["load_lidc", "robust_unit_scale"]

log = logging.getLogger(__name__)


def robust_unit_scale(
    image: np.ndarray, *, low_pct: float = 0.5, high_pct: float = 99.5
) -> tuple[np.ndarray, float, float]:
    """Map the ``low_pct``/``high_pct`` percentiles of ``image`` to 0/1 and clip.

    Args:
        image: 2-D array.
        low_pct: lower percentile.
        high_pct: upper percentile.

    Returns:
        ``(scaled float32 image, low value, high value)``.

    Raises:
        ValueError: when the two percentiles are equal (a constant slice).
    """
    img = np.asarray(image, dtype=np.float32)
    lo, hi = (float(v) for v in np.percentile(img, [low_pct, high_pct]))
    if not hi - lo > 1e-6:
        raise ValueError(f"percentiles {low_pct}/{high_pct} are equal ({lo}); constant slice")
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0).astype(np.float32), lo, hi


def load_lidc(
    root: str | Path, *, npz: str = "lidc_nodule_slices.npz", index: str = "index.csv"
) -> tuple[list[ImageItem], EvalMasks]:
    """Load the LIDC-IDRI slice sample.

    Args:
        root: folder holding ``npz`` and ``index``.
        npz: archive name.
        index: index CSV name.

    Returns:
        ``(items, masks)``; image ids from the ``image`` column, patient ids from ``patient``.

    Raises:
        ValueError: unreadable archive or missing arrays (naming the file), index rows that do not match the
            slices, a missing patient id, duplicate image ids, constant slices, all-lesion masks, or
            ``mask_pixels`` that disagree with the mask.
    """
    root = Path(root)
    npz_path, index_path = root / npz, root / index
    for p in (npz_path, index_path):
        if not p.is_file():
            raise ValueError(f"{p}: no such file")
    try:
        with np.load(npz_path, allow_pickle=False) as z:
            found = list(z.files)
            arrays = {k: z[k] for k in ("images", "masks") if k in found}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{npz_path}: cannot read archive (corrupt or truncated?): {exc}") from exc
    if len(arrays) != 2:
        raise ValueError(f"{npz_path}: expected arrays 'images' and 'masks', found {found}")
    images, masks = arrays["images"], arrays["masks"]
    if images.ndim != 3 or masks.shape != images.shape:
        raise ValueError(f"{npz_path}: images {images.shape} and masks {masks.shape} must both be (N, H, W)")
    if masks.dtype != bool and not set(np.unique(masks).tolist()) <= {0, 1}:
        raise ValueError(f"{npz_path}: masks are not binary")
    with open(index_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or [])
        rows = list(reader)
    missing = {"patient", "image"} - columns
    if missing:
        raise ValueError(f"{index_path}: missing columns {sorted(missing)}")
    if len(rows) != images.shape[0]:
        raise ValueError(f"{index_path}: {len(rows)} rows but {npz_path} holds {images.shape[0]} slices")
    items: list[ImageItem] = []
    sealed: dict[str, SealedMask] = {}
    for i, row in enumerate(rows):
        where = f"{index_path}:{i + 2}"
        patient, image_id = (row.get("patient") or "").strip(), (row.get("image") or "").strip()
        if not patient:
            raise ValueError(f"{where}: missing patient id")
        if not image_id or image_id in sealed:
            raise ValueError(f"{where}: missing or duplicate image id {image_id!r}")
        src = f"{npz_path}[{i}]"
        if not np.isfinite(images[i]).all():
            raise ValueError(f"{src}: slice contains NaN or Inf")
        try:
            scaled, lo, hi = robust_unit_scale(images[i])
        except ValueError as exc:
            raise ValueError(f"{src}: {exc}") from exc
        mask = masks[i].astype(bool)
        empty = check_mask(mask, scaled.shape, mask_where=f"{npz_path}[masks][{i}]", image_where=src)
        if row.get("mask_pixels") not in (None, "") and int(row["mask_pixels"]) != int(mask.sum()):
            raise ValueError(
                f"{where}: mask_pixels={row['mask_pixels']} but the mask has {int(mask.sum())}; index out of sync"
            )
        if empty:
            log.warning("%s: empty mask (no nodule pixel)", src)
        items.append(
            ImageItem(
                image=scaled, image_id=image_id, patient_id=patient, modality="CT", spacing_mm=None, source=src,
                meta={"scale_low": lo, "scale_high": hi, "intensity": "robust_unit_scale"},
            )
        )
        sealed[image_id] = SealedMask(mask, source=f"{npz_path}[masks][{i}]")
    log.info("%s: %d slices from %d patients", root, len(items), len({it.patient_id for it in items}))
    return items, EvalMasks(sealed, items)
