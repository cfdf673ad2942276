"""HAM10000 / ISIC 2018 dermoscopy to the common layout.

Expected folder: ``HAM10000_metadata.csv`` (ISIC 2018 task 3 columns ``lesion_id, image_id, dx, dx_type, age,
sex, localization``), images ``<images_dir>/<image_id>.jpg`` and, where present, ISIC 2018 task 1 masks
``<masks_dir>/<image_id>_segmentation.png`` (0/255).

HAM10000 has no patient identifier; several images show the same lesion. The lesion is therefore the
sampling unit: ``patient_id`` is the ``lesion_id`` (so splits never put one lesion on both sides), and
``meta`` keeps ``lesion_id`` and the body ``site``. The diagnosis (``dx``, ``dx_type``) is a label and is
sealed with the mask. Images without a task-1 mask get no mask entry unless ``require_masks`` is set, in
which case they are an error.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from .imageio import open_image, pil_to_mask, pil_to_rgb
from .layout import EvalMasks, ImageItem, SealedMask

__all__ = ["load_ham10000", "DX_CODES"]

log = logging.getLogger(__name__)
DX_CODES = {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
REQUIRED = ("lesion_id", "image_id", "dx", "localization")


def load_ham10000(root: str | Path, *, metadata: str = "HAM10000_metadata.csv", images_dir: str = "images",
                  masks_dir: str = "masks", require_masks: bool = True) -> tuple[list[ImageItem], EvalMasks]:
    """Read the metadata table, images and task-1 masks.

    Args:
        root: dataset folder.
        metadata: CSV file name inside ``root``.
        images_dir, masks_dir: sub-folders with ``<image_id>.jpg`` and ``<image_id>_segmentation.png``.
        require_masks: every image must have a mask (the layout gives every item one).

    Raises:
        ValueError: naming the file and row, for a missing column, an empty lesion id, an unknown diagnosis
            code, a duplicate image id, a missing or unreadable image or mask, or a mask of another shape.
    """
    root = Path(root)
    table = root / metadata
    try:
        rows = list(csv.DictReader(open(table, newline="", encoding="utf-8-sig")))
    except FileNotFoundError:
        raise ValueError(f"{table}: missing") from None
    if not rows:
        raise ValueError(f"{table}: no rows")
    missing = [c for c in REQUIRED if c not in rows[0]]
    if missing:
        raise ValueError(f"{table}: missing columns {missing}")
    items: list[ImageItem] = []
    masks: dict[str, SealedMask] = {}
    seen: set[str] = set()
    for n, row in enumerate(rows, start=2):
        where = f"{table}: line {n}"
        iid, lid, dx = row["image_id"].strip(), row["lesion_id"].strip(), row["dx"].strip()
        if not iid or not lid:
            raise ValueError(f"{where}: empty image_id or lesion_id")
        if dx not in DX_CODES:
            raise ValueError(f"{where}: unknown dx {dx!r}; expected one of {sorted(DX_CODES)}")
        if iid in seen:
            raise ValueError(f"{where}: duplicate image_id {iid!r}")
        seen.add(iid)
        img_path = root / images_dir / f"{iid}.jpg"
        mask_path = root / masks_dir / f"{iid}_segmentation.png"
        image = pil_to_rgb(open_image(img_path), str(img_path))
        if not mask_path.is_file():
            if require_masks:
                raise ValueError(f"{mask_path}: no task-1 mask for {iid} ({where})")
            continue
        mask = pil_to_mask(open_image(mask_path), str(mask_path))
        if mask.shape != image.shape[:2]:
            raise ValueError(f"{mask_path}: mask shape {mask.shape} does not match {img_path} shape {image.shape[:2]}")
        if mask.all():
            raise ValueError(f"{mask_path}: mask covers the whole image")
        items.append(ImageItem(image=image.astype(np.float32), image_id=iid, patient_id=lid, modality="dermoscopy",
                               source=str(img_path), meta={"lesion_id": lid, "site": row["localization"].strip()}))
        masks[iid] = SealedMask(mask, source=str(mask_path),
                                labels={"dx": dx, "dx_type": row.get("dx_type", "").strip()})
    log.info("%s: %d images of %d lesions", root, len(items), len({i.patient_id for i in items}))
    return items, EvalMasks(masks, items)
