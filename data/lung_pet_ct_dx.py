"""Lung-PET-CT-Dx (TCIA) DICOM series with bounding-box annotations, to the common layout.

Expected folder: ``index.csv`` (columns ``patient``, ``dicom``, ``box_mask``) with the DICOM files and the
filled-box mask PNGs it names (as in ``../shared/realdata/lung_pet_ct_dx``). Slices are read in HU through
:mod:`covtoken.data.dicom` (rescale slope/intercept, series sorted by position) and windowed with the lung
preset. The boxes are coarse lesion masks (a box covers more than the tumour); they are sealed like any mask.

Every item records whether its DICOM file was de-identified by :mod:`covtoken.data.deid`
(``meta["deidentified"]``), which the materialize job requires before anything leaves the machine.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import pydicom

from .deid import is_deidentified
from .dicom import read_series, slices_to_items
from .imageio import open_image, pil_to_mask
from .layout import EvalMasks, ImageItem, SealedMask

__all__ = ["load_lung_pet_ct_dx"]

log = logging.getLogger(__name__)


def load_lung_pet_ct_dx(root: str | Path, *, preset: str = "lung") -> tuple[list[ImageItem], EvalMasks]:
    """Read the series and box masks listed in ``root/index.csv``.

    Raises:
        ValueError: naming the file, for a missing column or file, an unreadable DICOM or PNG, or a box mask
            whose shape differs from its slice.
    """
    root = Path(root)
    index = root / "index.csv"
    try:
        rows = list(csv.DictReader(open(index, newline="", encoding="utf-8-sig")))
    except FileNotFoundError:
        raise ValueError(f"{index}: missing") from None
    if not rows:
        raise ValueError(f"{index}: no rows")
    missing = {"patient", "dicom", "box_mask"} - set(rows[0])
    if missing:
        raise ValueError(f"{index}: missing columns {sorted(missing)}")
    by_file = {(root / r["dicom"]).resolve(): r for r in rows}
    slices = read_series([root / r["dicom"] for r in rows])
    items_out: list[ImageItem] = []
    masks: dict[str, SealedMask] = {}
    for s in slices:
        row = by_file[Path(s.path).resolve()]
        (item,) = slices_to_items([s], preset=preset, patient_id=row["patient"] or None)
        header = pydicom.dcmread(s.path, stop_before_pixels=True)
        item = ImageItem(image=item.image, image_id=item.image_id, patient_id=item.patient_id, modality=item.modality,
                         spacing_mm=item.spacing_mm, source=item.source,
                         meta={**item.meta, "dicom": True, "deidentified": is_deidentified(header)})
        mask_path = root / row["box_mask"]
        mask = pil_to_mask(open_image(mask_path), str(mask_path))
        if mask.shape != item.hw:
            raise ValueError(f"{mask_path}: box mask shape {mask.shape} does not match {s.path} shape {item.hw}")
        items_out.append(item)
        masks[item.image_id] = SealedMask(mask, source=str(mask_path), labels={"annotation": "bounding box"})
    log.info("%s: %d slices of %d patient(s)", root, len(items_out), len({i.patient_id for i in items_out}))
    return items_out, EvalMasks(masks, items_out)


def deidentified_copy(root: str | Path, dest: str | Path, *, key: bytes, date_shift_days: int | None = None) -> Path:
    """Copy the folder with every DICOM file through the de-identifier and a minimal index.

    The new ``index.csv`` keeps only the pseudonymous patient id and the relative paths (the source index
    carries UIDs and dated source paths, which never leave). Box masks are copied unchanged.

    Args:
        root: source folder (``index.csv``, DICOM files, box masks).
        dest: new folder (refused if it exists).
        key: secret key of the de-identifier (UID remapping, pseudonyms).
        date_shift_days: shift every date by this many days; None removes dates.
    """
    from .deid import deidentify_file, pseudonym

    root, dest = Path(root), Path(dest)
    if dest.exists():
        raise ValueError(f"{dest}: exists; de-identify into a new folder")
    rows = list(csv.DictReader(open(root / "index.csv", newline="", encoding="utf-8-sig")))
    tmp = dest.with_name(f".{dest.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    out_rows = []
    try:
        for r in rows:
            pid = pseudonym(r["patient"], key)[1]
            dcm_rel, box_rel = f"{pid}/dicom/{Path(r['dicom']).name}", f"{pid}/box_masks/{Path(r['box_mask']).name}"
            (tmp / dcm_rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / box_rel).parent.mkdir(parents=True, exist_ok=True)
            deidentify_file(root / r["dicom"], tmp / dcm_rel, key=key, date_shift_days=date_shift_days)
            (tmp / box_rel).write_bytes((root / r["box_mask"]).read_bytes())
            out_rows.append({"patient": pid, "dicom": dcm_rel, "box_mask": box_rel})
        with open(tmp / "index.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["patient", "dicom", "box_mask"])
            w.writeheader()
            w.writerows(out_rows)
        tmp.rename(dest)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
