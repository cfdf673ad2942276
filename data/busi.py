"""BUSI breast ultrasound (Al-Dhabyani et al., Data in Brief 28:104863, 2020) to the common layout.

Expected folder: ``index.csv`` with at least the columns ``file`` and ``mask`` (paths relative to the folder),
optionally ``label`` (benign/malignant/normal, sealed with the mask as label ``diagnosis``), ``h``/``w`` (checked) and
``patient_id``. Masks are 0/255 PNGs with multi-lesion masks already merged (as in ``../shared/realdata/busi``).

BUSI publishes no patient identifiers, so without a ``patient_id`` column each image is its own patient (patient
id = image file stem). BUSI is known to hold several images of the same woman, so patient-level splits on it can
still leak; say so when reporting BUSI numbers. If a ``patient_id`` column exists, an empty cell is an error.

Images become grey float32 in [0, 1] (8-bit / 255; colour images with identical channels keep one channel,
others go through luma). A mask with no lesion pixel (BUSI "normal" images) is allowed and logged; a mask covering
the whole image is an error.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

from covtoken.data.imageio import check_mask, open_image, pil_to_grey, pil_to_mask
from covtoken.data.layout import EvalMasks, ImageItem, SealedMask

__all__ = ["load_busi"]

log = logging.getLogger(__name__)


def load_busi(root: str | Path, *, index: str = "index.csv", modality: str = "US") -> tuple[list[ImageItem], EvalMasks]:
    """Load a BUSI folder.

    Args:
        root: folder holding ``index`` and the image/mask files it names.
        index: name of the index CSV inside ``root``.
        modality: layout modality.

    Returns:
        ``(items, masks)`` with image ids equal to the image file stems.

    Raises:
        ValueError: missing index or columns, missing/corrupt image or mask (naming the file), mask and image
            shapes that differ, an all-lesion mask, an empty patient id, duplicate image ids, h/w that disagree.
    """
    root = Path(root)
    index_path = root / index
    if not index_path.is_file():
        raise ValueError(f"{index_path}: no such index file")
    with open(index_path, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or [])
        rows = list(reader)
    missing = {"file", "mask"} - columns
    if missing:
        raise ValueError(f"{index_path}: missing columns {sorted(missing)} (have {sorted(columns)})")
    if not rows:
        raise ValueError(f"{index_path}: no rows")
    items: list[ImageItem] = []
    masks: dict[str, SealedMask] = {}
    n_empty = 0
    for n, row in enumerate(rows, start=2):  # line numbers as an editor shows them (header is line 1)
        where = f"{index_path}:{n}"
        img_path, mask_path = root / row["file"], root / row["mask"]
        image_id = Path(row["file"]).stem
        if image_id in masks:
            raise ValueError(f"{where}: duplicate image id {image_id!r}")
        if "patient_id" in columns:
            patient_id = (row.get("patient_id") or "").strip()
            if not patient_id:
                raise ValueError(f"{where}: missing patient id for {img_path}")
        else:
            patient_id = image_id
        image = pil_to_grey(open_image(img_path), str(img_path))
        if "h" in columns and "w" in columns and row.get("h") and row.get("w"):
            if not (row["h"].strip().isdigit() and row["w"].strip().isdigit()):
                raise ValueError(f"{where}: columns h, w must be whole numbers, got {row['h']!r}, {row['w']!r}")
            if image.shape != (int(row["h"]), int(row["w"])):
                raise ValueError(f"{img_path}: shape {image.shape} but {where} says h={row['h']}, w={row['w']}")
        mask = pil_to_mask(open_image(mask_path), str(mask_path))
        empty = check_mask(mask, image.shape, mask_where=str(mask_path), image_where=str(img_path))
        if empty:
            n_empty += 1
            log.warning("%s: empty mask (no lesion pixel)", mask_path)
        labels = {"diagnosis": row["label"]} if row.get("label") else {}
        items.append(
            ImageItem(image=image, image_id=image_id, patient_id=patient_id, modality=modality, spacing_mm=None,
                      source=str(img_path))
        )
        masks[image_id] = SealedMask(mask, source=str(mask_path), labels=labels)
    log.info("%s: %d images, %d with empty masks", root, len(items), n_empty)
    return items, EvalMasks(masks, items)
