"""BUSI breast ultrasound (Al-Dhabyani et al., Data in Brief 28:104863, 2020) to the common layout.

Two folder layouts are read:

* **index layout** (as in ``../shared/realdata/busi``): ``index.csv`` with at least the columns ``file`` and
  ``mask`` (paths relative to the folder), optionally ``label`` (benign/malignant/normal, sealed with the mask as
  label ``diagnosis``), ``h``/``w`` (checked) and ``patient_id``. A ``normal`` row may leave ``mask`` empty: the
  image is lesion-free. The table may carry a byte-order mark (saved from Excel).
* **original layout** (the published archive, ``Dataset_BUSI_with_GT``): class folders ``benign/``,
  ``malignant/``, ``normal/`` holding ``<class> (N).png`` with ``<class> (N)_mask.png`` and, for images with
  several lesions, ``<class> (N)_mask_1.png``, ``_mask_2.png``...; all masks of one image are merged as a union.
  Image ids become ``<class>_<N>``, as in the index layout.

BUSI publishes no patient identifiers, so without a ``patient_id`` column each image is its own patient (patient
id = image id). BUSI is known to hold several images of the same woman; the gate jobs' near-duplicate grouping
(:mod:`covtoken.data.dedup`) merges the ones it finds into one split unit.

Images become grey float32 in [0, 1] (8-bit / 255; RGB files with identical channels keep one channel, grey ones
with a few coloured annotation marks go through luma). An image whose content is in colour (more than 10% of its
pixels coloured, e.g. dermoscopy) is refused: BUSI is greyscale ultrasound. A mask covering the whole image is an
error; every error names the file, and in the index layout the table row.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from .csvio import read_table, row_error
from .errors import DataError, DatasetIdentityError
from .imageio import check_mask, colour_fraction, open_image, pil_to_grey, pil_to_mask
from .layout import EvalMasks, ImageItem, SealedMask

__all__ = ["load_busi", "load_busi_original", "BUSI_CLASSES"]

log = logging.getLogger(__name__)
BUSI_CLASSES = ("benign", "malignant", "normal")
#: more coloured pixels than this and the image is not greyscale ultrasound
MAX_COLOUR_FRACTION = 0.10
_ORIGINAL_IMAGE = re.compile(r"(benign|malignant|normal) \((\d+)\)\.png")
_ORIGINAL_MASK = re.compile(r"(benign|malignant|normal) \((\d+)\)_mask(?:_(\d+))?\.png")


def _grey_ultrasound(path: Path) -> np.ndarray:
    """Open ``path`` as a grey ultrasound image; refuse colour content."""
    img = open_image(path)
    if img.mode not in ("L", "I;16", "I;16B", "I;16L", "I;16N", "I", "1", "LA"):
        frac = colour_fraction(np.asarray(img.convert("RGB")))
        if frac > MAX_COLOUR_FRACTION:
            raise DatasetIdentityError(
                f"{path}: {frac:.0%} of pixels are coloured (channel spread > 16/255), but BUSI is greyscale "
                "ultrasound: a colour photograph or dermoscopy? use --dataset ham10000 or a folder dataset")
    return pil_to_grey(img, str(path))


def _item(image_id: str, patient_id: str, img_path: Path, modality: str) -> ImageItem:
    return ImageItem(image=_grey_ultrasound(img_path), image_id=image_id, patient_id=patient_id, modality=modality,
                     spacing_mm=None, source=str(img_path))


def load_busi(root: str | Path, *, index: str = "index.csv", modality: str = "US") -> tuple[list[ImageItem], EvalMasks]:
    """Load a BUSI folder in the index layout, or in the original class-folder layout when it has no index.

    Args:
        root: folder holding ``index`` and the image/mask files it names, or the class folders.
        index: name of the index CSV inside ``root``.
        modality: layout modality.

    Returns:
        ``(items, masks)`` with image ids equal to the image file stems (``<class>_<N>`` in the original layout).

    Raises:
        DataError: missing index or columns, missing/corrupt image or mask, mask and image shapes that differ, an
            all-lesion mask, an empty patient id, duplicate image ids, h/w that disagree, an empty mask cell
            outside a ``normal`` row - naming the table and line; DatasetIdentityError: colour content.
    """
    root = Path(root)
    index_path = root / index
    if not index_path.is_file():
        if any((root / c).is_dir() for c in BUSI_CLASSES) or (root / "Dataset_BUSI_with_GT").is_dir():
            return load_busi_original(root, modality=modality)
        raise DataError(f"{index_path}: no such index file, and {root} has no BUSI class folders "
                        f"({', '.join(c + '/' for c in BUSI_CLASSES)})")
    table = read_table(index_path, required=("file", "mask"))
    items: list[ImageItem] = []
    masks: dict[str, SealedMask] = {}
    n_empty = 0
    for line, row in table.rows:
        where = table.where(line)
        try:
            if not row["file"]:
                raise DataError("empty 'file' cell")
            img_path = root / row["file"]
            image_id = Path(row["file"]).stem
            if image_id in masks:
                raise DataError(f"duplicate image id {image_id!r}")
            if "patient_id" in table.columns:
                patient_id = row.get("patient_id", "")
                if not patient_id:
                    raise DataError(f"missing patient id for {img_path}")
            else:
                patient_id = image_id
            item = _item(image_id, patient_id, img_path, modality)
            if row.get("h") and row.get("w") and item.image.shape != (int(row["h"]), int(row["w"])):
                raise DataError(f"{img_path}: shape {item.image.shape} but the row says h={row['h']}, w={row['w']}")
            label = row.get("label", "")
            if row["mask"]:
                mask_path = root / row["mask"]
                mask = pil_to_mask(open_image(mask_path), str(mask_path))
                mask_src = str(mask_path)
            elif label.lower() == "normal":
                mask, mask_src = np.zeros(item.hw, dtype=bool), f"{where} (normal: no lesion)"
            else:
                raise DataError(f"empty 'mask' cell for {img_path} (only a 'normal' row may have no mask; "
                                f"label is {label!r})")
            if check_mask(mask, item.image.shape, mask_where=mask_src, image_where=str(img_path)):
                n_empty += 1
                log.warning("%s: empty mask (no lesion pixel)", mask_src)
        except ValueError as exc:
            raise row_error(table, line, exc) from None
        items.append(item)
        masks[image_id] = SealedMask(mask, source=mask_src, labels={"diagnosis": label} if label else {})
    log.info("%s: %d images, %d lesion-free (empty mask)", root, len(items), n_empty)
    return items, EvalMasks(masks, items)


def load_busi_original(root: str | Path, *, modality: str = "US") -> tuple[list[ImageItem], EvalMasks]:
    """Read BUSI's published layout: ``<class>/<class> (N).png`` with ``(N)_mask.png`` and ``(N)_mask_K.png``.

    Every mask file of one image is merged as a union; the class folder is the ``diagnosis`` label.

    Raises:
        DataError: an image without any mask, a mask without its image, an unexpected ``.png`` name, masks of
            another shape (naming the files).
    """
    root = Path(root)
    if (root / "Dataset_BUSI_with_GT").is_dir() and not any((root / c).is_dir() for c in BUSI_CLASSES):
        root = root / "Dataset_BUSI_with_GT"
    items: list[ImageItem] = []
    masks: dict[str, SealedMask] = {}
    n_empty = n_multi = 0
    for cls in BUSI_CLASSES:
        folder = root / cls
        if not folder.is_dir():
            continue
        images: dict[str, Path] = {}
        mask_files: dict[str, list[Path]] = {}
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() != ".png":
                continue
            m_img, m_mask = _ORIGINAL_IMAGE.fullmatch(f.name), _ORIGINAL_MASK.fullmatch(f.name)
            if m_mask and m_mask.group(1) == cls:
                mask_files.setdefault(f"{cls}_{int(m_mask.group(2))}", []).append(f)
            elif m_img and m_img.group(1) == cls:
                images[f"{cls}_{int(m_img.group(2))}"] = f
            else:
                raise DataError(f"{f}: not a BUSI file name (expected '{cls} (N).png' or '{cls} (N)_mask[_K].png')")
        orphans = sorted(set(mask_files) - set(images))
        if orphans:
            raise DataError(f"{mask_files[orphans[0]][0]}: mask without its image {orphans[0]!r}")
        for image_id in sorted(images, key=lambda k: int(k.rsplit("_", 1)[1])):
            img_path = images[image_id]
            item = _item(image_id, image_id, img_path, modality)
            files = mask_files.get(image_id)
            if not files:
                raise DataError(f"{img_path}: no mask file ('{img_path.stem}_mask.png')")
            union = np.zeros(item.hw, dtype=bool)
            for mf in files:
                m = pil_to_mask(open_image(mf), str(mf))
                if m.shape != item.hw:
                    raise DataError(f"{mf}: mask shape {m.shape} does not match {img_path} shape {item.hw}")
                union |= m
            n_multi += len(files) > 1
            if check_mask(union, item.image.shape, mask_where=" + ".join(str(f) for f in files),
                          image_where=str(img_path)):
                n_empty += 1
            items.append(item)
            masks[image_id] = SealedMask(union, source=" + ".join(str(f) for f in files), labels={"diagnosis": cls})
    if not items:
        raise DataError(f"{root}: no BUSI images in {', '.join(c + '/' for c in BUSI_CLASSES)}")
    log.info("%s (original layout): %d images, %d with several masks merged, %d lesion-free", root, len(items),
             n_multi, n_empty)
    return items, EvalMasks(masks, items)
