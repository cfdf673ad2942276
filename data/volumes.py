"""Folder layouts of the NIfTI CT datasets: KiTS23 and the Medical Segmentation Decathlon (liver, pancreas).

* KiTS23: ``<root>/case_XXXXX/imaging.nii.gz`` + ``segmentation.nii.gz`` (1 kidney, 2 tumour, 3 cyst).
* MSD Task03 Liver / Task07 Pancreas: ``<root>/imagesTr/<name>.nii.gz`` + ``<root>/labelsTr/<name>.nii.gz``
  (1 organ, 2 tumour).

Each case is one patient. Axial slices are taken every ``slice_every`` slices (a label-free choice: never by
where the tumour is), reoriented to canonical and windowed for the organ; tumour labels become the sealed mask.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .layout import EvalMasks, ImageItem
from .nifti import TUMOUR_LABELS, load_volume, select_slices, volume_items

__all__ = ["load_kits23", "load_msd_liver", "load_msd_pancreas"]

log = logging.getLogger(__name__)


def _cases(pairs: list[tuple[str, Path, Path]], *, labels: str, preset: str, slice_every: int
           ) -> tuple[list[ImageItem], EvalMasks]:
    if not pairs:
        raise ValueError("no cases found")
    items: list[ImageItem] = []
    masks: dict = {}
    for pid, img, seg in pairs:
        if not seg.is_file():
            raise ValueError(f"{img}: no segmentation at {seg}")
        vol = load_volume(img, seg, tumour_labels=TUMOUR_LABELS[labels])
        it, m = volume_items(vol, patient_id=pid, slices=select_slices(vol, every=slice_every), preset=preset)
        items += it
        masks.update(m)
    return items, EvalMasks(masks, items)


def load_kits23(root: str | Path, *, slice_every: int = 4, with_cysts: bool = False) -> tuple[list[ImageItem], EvalMasks]:
    """KiTS23 cases under ``root`` (``case_*/imaging.nii.gz``)."""
    root = Path(root)
    cases = sorted(d for d in root.glob("case_*") if d.is_dir())
    for d in cases:  # a case missing either file is an error, never a silently dropped patient
        missing = [f for f in ("imaging.nii.gz", "segmentation.nii.gz") if not (d / f).is_file()]
        if missing and len(missing) < 2:
            raise FileNotFoundError(f"{d / missing[0]}: KiTS23 case {d.name} has "
                                    f"{'a segmentation' if missing[0] == 'imaging.nii.gz' else 'an image'} but no "
                                    f"{missing[0]}")
    pairs = [(d.name, d / "imaging.nii.gz", d / "segmentation.nii.gz") for d in cases
             if (d / "imaging.nii.gz").is_file()]
    if not pairs:
        raise ValueError(f"{root}: no case_*/imaging.nii.gz")
    return _cases(pairs, labels="kits23_with_cyst" if with_cysts else "kits23", preset="kidney",
                  slice_every=slice_every)


def _msd(root: str | Path, *, labels: str, preset: str, slice_every: int) -> tuple[list[ImageItem], EvalMasks]:
    root = Path(root)
    imgs = sorted(p for p in (root / "imagesTr").glob("*.nii.gz") if not p.name.startswith("."))
    if not imgs:
        raise ValueError(f"{root}: no imagesTr/*.nii.gz")
    pairs = [(p.name.removesuffix(".nii.gz"), p, root / "labelsTr" / p.name) for p in imgs]
    return _cases(pairs, labels=labels, preset=preset, slice_every=slice_every)


def load_msd_liver(root: str | Path, *, slice_every: int = 4) -> tuple[list[ImageItem], EvalMasks]:
    """MSD Task03 Liver (``imagesTr``/``labelsTr``)."""
    return _msd(root, labels="msd_liver", preset="liver", slice_every=slice_every)


def load_msd_pancreas(root: str | Path, *, slice_every: int = 4) -> tuple[list[ImageItem], EvalMasks]:
    """MSD Task07 Pancreas (``imagesTr``/``labelsTr``)."""
    return _msd(root, labels="msd_pancreas", preset="pancreas", slice_every=slice_every)
