"""A generic folder adapter for data the catalog does not know (``--dataset folder --data-root DIR``).

Layout::

    DIR/dataset.json    {"name": "...", "licence": "CC-BY-4.0", "modality": "US", "channels": "grey",
                         "citation": "..."}      name, licence and modality are required; channels grey|colour
    DIR/index.csv       optional: file[, mask][, patient_id][, any label columns...]  (UTF-8, BOM allowed)
    DIR/images/...      image files (PNG/JPEG/TIFF/BMP)
    DIR/masks/...       0/255 masks

With ``index.csv``, every row names its image (``file``) and mask (``mask``, relative paths); an empty ``mask`` cell
means a lesion-free image; ``patient_id`` defaults to the image stem; every other column is an image-level label,
sealed with the mask (evaluation only). Without it, every image under ``images/`` is read and its masks are
``masks/<stem>_mask.png``, ``masks/<stem>_mask_1.png``, ... (several masks of one image are merged as a union) or
``masks/<stem>.png``; an image without any mask is an error unless ``dataset.json`` says
``"missing_mask": "lesion-free"``.

The user-given name and licence go into the record's provenance; the content is checked against the declared
modality and channels like a catalog dataset's.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from .csvio import read_table, row_error
from .errors import DataError
from .identity import DatasetIdentity, check_identity
from .imageio import check_mask, open_image, pil_to_grey, pil_to_mask, pil_to_rgb
from .layout import EvalMasks, ImageItem, SealedMask

__all__ = ["load_folder", "read_folder_info", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
_INFO_KEYS = {"name", "licence", "modality", "channels", "citation", "missing_mask", "note"}
_RESERVED = {"file", "mask", "patient_id"}


def read_folder_info(root: Path) -> dict[str, Any]:
    """Read and check ``dataset.json``.

    Raises:
        DataError: missing file, invalid JSON, unknown keys, missing name/licence/modality, bad channels.
    """
    path = root / "dataset.json"
    if not path.is_file():
        raise DataError(f"{path}: missing; a folder dataset needs dataset.json with at least "
                        '{"name": ..., "licence": ..., "modality": ...}')
    try:
        info = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(info, dict):
        raise DataError(f"{path}: must be a JSON object")
    unknown = sorted(set(info) - _INFO_KEYS)
    if unknown:
        raise DataError(f"{path}: unknown keys {unknown}; valid: {sorted(_INFO_KEYS)}")
    for key in ("name", "licence", "modality"):
        if not isinstance(info.get(key), str) or not info[key].strip():
            raise DataError(f"{path}: {key!r} is required (a non-empty string)")
    info.setdefault("channels", "grey")
    if info["channels"] not in ("grey", "colour"):
        raise DataError(f"{path}: channels must be 'grey' or 'colour', got {info['channels']!r}")
    if info.get("missing_mask", "error") not in ("error", "lesion-free"):
        raise DataError(f"{path}: missing_mask must be 'error' or 'lesion-free', got {info['missing_mask']!r}")
    return info


def _image(path: Path, channels: str) -> np.ndarray:
    img = open_image(path)
    return pil_to_rgb(img, str(path)) if channels == "colour" else pil_to_grey(img, str(path))


def _union(files: list[Path], hw: tuple[int, int], image_path: Path) -> np.ndarray:
    out = np.zeros(hw, dtype=bool)
    for f in files:
        m = pil_to_mask(open_image(f), str(f))
        if m.shape != hw:
            raise DataError(f"{f}: mask shape {m.shape} does not match image {image_path} shape {hw}")
        out |= m
    return out


def load_folder(root: str | Path) -> tuple[list[ImageItem], EvalMasks, dict[str, Any]]:
    """Read a generic folder dataset.

    Returns:
        ``(items, masks, info)`` with ``info`` the checked ``dataset.json``.

    Raises:
        DataError: naming the file (and the table line) of the first problem; DatasetIdentityError: content that
            does not match the declared modality/channels.
    """
    root = Path(root)
    info = read_folder_info(root)
    channels, modality = info["channels"], info["modality"]
    items: list[ImageItem] = []
    masks: dict[str, SealedMask] = {}
    if (root / "index.csv").is_file():
        table = read_table(root / "index.csv", required=("file",))
        label_cols = [c for c in table.columns if c not in _RESERVED]
        for line, row in table.rows:
            try:
                if not row["file"]:
                    raise DataError("empty 'file' cell")
                img_path = root / row["file"]
                iid = Path(row["file"]).stem
                if iid in masks:
                    raise DataError(f"duplicate image id {iid!r}")
                pid = row.get("patient_id", "") or iid
                if "patient_id" in table.columns and not row.get("patient_id"):
                    raise DataError(f"empty patient_id for {img_path}")
                image = _image(img_path, channels)
                cell = row.get("mask", "")
                if cell:
                    mask = _union([root / p.strip() for p in cell.split(";")], image.shape[:2], img_path)
                    src = str(root / cell)
                else:
                    mask, src = np.zeros(image.shape[:2], dtype=bool), f"{table.where(line)} (no mask: lesion-free)"
                check_mask(mask, image.shape, mask_where=src, image_where=str(img_path))
                items.append(ImageItem(image=image, image_id=iid, patient_id=pid, modality=modality,
                                       source=str(img_path)))
            except ValueError as exc:
                raise row_error(table, line, exc) from None
            masks[iid] = SealedMask(mask, source=src, labels={c: row[c] for c in label_cols if row.get(c)})
    else:
        img_dir = root / "images"
        if not img_dir.is_dir():
            raise DataError(f"{root}: neither index.csv nor an images/ folder")
        files = sorted(p for p in img_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{img_dir}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        mask_dir = root / "masks"
        for img_path in files:
            iid = img_path.stem
            if iid in masks:
                raise DataError(f"{img_path}: duplicate image id {iid!r} (same file stem in two folders)")
            image = _image(img_path, channels)
            found = sorted(p for p in mask_dir.glob(f"{glob_escape(iid)}_mask*.png")
                           if re.fullmatch(re.escape(iid) + r"_mask(_\d+)?\.png", p.name)) if mask_dir.is_dir() else []
            if not found and (mask_dir / f"{iid}.png").is_file():
                found = [mask_dir / f"{iid}.png"]
            if found:
                mask, src = _union(found, image.shape[:2], img_path), " + ".join(str(f) for f in found)
            elif info.get("missing_mask") == "lesion-free":
                mask, src = np.zeros(image.shape[:2], dtype=bool), f"{img_path} (no mask: lesion-free)"
            else:
                raise DataError(f"{img_path}: no mask ({mask_dir}/{iid}_mask.png); if images without a mask are "
                                'lesion-free, say "missing_mask": "lesion-free" in dataset.json')
            check_mask(mask, image.shape, mask_where=src, image_where=str(img_path))
            items.append(ImageItem(image=image, image_id=iid, patient_id=iid, modality=modality,
                                   source=str(img_path)))
            masks[iid] = SealedMask(mask, source=src)
    check_identity(info["name"], items, DatasetIdentity(modality, channels))
    return items, EvalMasks(masks, items), info


def glob_escape(text: str) -> str:
    """``text`` with glob metacharacters escaped (``[``, ``*``, ``?``)."""
    return re.sub(r"([\[\]*?])", r"[\1]", text)
