"""Common layout -> a Hugging Face dataset: images and masks in separate configs, with a dataset card.

Repository layout written by :func:`write_hub_layout`::

    README.md                 dataset card (YAML: licence, configs "images" and "masks", source, citation)
    images/metadata.jsonl     file_name, image_id, patient_id, modality, spacing_mm, meta   (config "images")
    images/<name>.png
    masks/metadata.jsonl      file_name, image_id, labels (JSON: every image-level label)  (config "masks")
    masks/<name>.png          0/255, evaluation only

Labels (diagnosis, ``dx``...) travel with the masks, in the evaluation-only config, and come back sealed.
The card names the licence by its SPDX id and says what was de-identified and how
(:func:`describe_deidentification`): DICOM headers through covtoken's PS3.15 profile, or - for PNG/JPEG
sources - that there were no headers to de-identify and the pixels were left as they are.

:func:`load_hub_layout` reads both configs back through ``datasets`` (a local folder or a Hub repo, same code)
and joins them on ``image_id`` into items and sealed masks. :func:`check_publishable` refuses any DICOM-derived
item that did not go through the de-identifier: nothing private leaves the machine.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

from .hub import _encode_image, _safe_name, parse_source
from .layout import EvalMasks, ImageItem, SealedMask, unseal, unseal_labels

__all__ = ["check_publishable", "write_hub_layout", "dataset_card", "load_hub_layout", "push_dataset",
           "NotDeidentifiedError", "describe_deidentification", "label_names"]

log = logging.getLogger(__name__)


class NotDeidentifiedError(ValueError):
    """A DICOM-derived item has not been through covtoken's de-identifier."""


def check_publishable(items: list[ImageItem]) -> None:
    """Refuse DICOM-derived items that were not de-identified (``meta["dicom"]`` without ``meta["deidentified"]``)."""
    for it in items:
        if it.meta.get("dicom") and it.meta.get("deidentified") is not True:
            raise NotDeidentifiedError(f"{it.source or it.image_id}: DICOM-derived item has not been de-identified "
                                       "(run the materialize job with --deidentify); nothing was written")


def label_names(masks: Mapping[str, SealedMask]) -> list[str]:
    """Sorted names of every image-level label sealed with ``masks``."""
    return sorted({k for m in masks.values() for k in unseal_labels(m)})


def describe_deidentification(items: list[ImageItem], *, date_shift_days: int | None = None) -> str:
    """What was de-identified, and how, for the dataset card (from the items' own metadata)."""
    dicom = [it for it in items if it.meta.get("dicom")]
    suffixes = sorted({Path(it.source).suffix.lower() or "(no suffix)" for it in items
                       if not it.meta.get("dicom") and it.source and Path(it.source).is_file()})
    parts = []
    if dicom:
        dates = (f"dates shifted by {date_shift_days} days (intervals kept)" if date_shift_days is not None
                 else "dates removed")
        parts.append(f"{len(dicom)} DICOM-derived image(s): headers de-identified with covtoken's DICOM PS3.15 "
                     "Annex E Basic Profile implementation (covtoken.data.deid): identifying attributes removed or "
                     "emptied, patient name/id replaced by keyed pseudonyms, UIDs remapped with a keyed HMAC, "
                     f"{dates}, private tags removed; every file checked afterwards. Pixel data are unchanged: "
                     "burned-in text is not removed.")
    rest = len(items) - len(dicom)
    if rest:
        kind = ", ".join(suffixes) if suffixes else "non-DICOM"
        parts.append(f"{rest} image(s) from {kind} files: these carry no DICOM header, so covtoken de-identified "
                     "nothing in them; pixels were exported as they are (they may hold burned-in text such as "
                     "calipers or annotations from the source), and local file paths were not written. Identifiers "
                     "are the source's own image and patient ids.")
    return " ".join(parts)


def dataset_card(*, name: str, provenance: Mapping[str, Any], n_images: int, n_patients: int, licence: str,
                 citation: str, kit_commit: str, deidentification: str | None = None,
                 label_columns: list[str] | None = None) -> str:
    """README.md with YAML metadata declaring the two configs.

    Args:
        licence: the SPDX id (written lower-case as the Hub's ``license:`` tag, and as is in the text).
        deidentification: what was de-identified and how (:func:`describe_deidentification`).
        label_columns: the image-level labels stored in the ``masks`` config.
    """
    yaml = "\n".join([
        "---",
        f"license: {licence.lower()}",
        f"pretty_name: {json.dumps(name)}",
        "tags: [medical-imaging, covtoken]",
        "configs:",
        "- config_name: images",
        "  default: true",
        "  data_files:",
        "  - split: train",
        "    path: images/**",
        "- config_name: masks",
        "  data_files:",
        "  - split: train",
        "    path: masks/**",
        "---",
    ])
    prov = json.dumps(dict(provenance), indent=2, sort_keys=True, allow_nan=False)
    return f"""{yaml}
# {name} (covtoken common layout)

{n_images} images of {n_patients} patients in covtoken's common layout: grey or RGB images in [0, 1] with a
patient id per image, and one lesion mask per image.

- **`images`** (default config): what label-free code may read — pixels, image id, patient id, modality, spacing.
- **`masks`**: lesion masks, **evaluation only**, with every image-level label in the JSON column `labels`
  ({", ".join(f"`{c}`" for c in label_columns) if label_columns else "none in the source"}). Never fit anything
  on them; split by `patient_id`, never by image.

## Source and licence

Licence (SPDX): {licence}. Cite: {citation}.

## De-identification

{deidentification or "Not stated by the materializing job."}

Source provenance (revision = digest of the files read, or the source's commit):

```json
{prov}
```

Materialized by covtoken at commit `{kit_commit}`.
"""


def write_hub_layout(items: list[ImageItem], masks: EvalMasks, out_dir: str | Path, *, card: str) -> Path:
    """Write the two configs and the card into the new folder ``out_dir`` (nothing partial on failure)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ValueError(f"{out_dir}: exists; write to a new folder")
    check_publishable(items)
    EvalMasks(masks, items)
    if len({it.image_id for it in items}) != len(items):
        raise ValueError(f"{out_dir}: duplicate image ids")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        with open(tmp / "images" / "metadata.jsonl", "w") as fi, open(tmp / "masks" / "metadata.jsonl", "w") as fm:
            for i, it in enumerate(items):
                name = _safe_name(i, it.image_id)
                _encode_image(it).save(tmp / "images" / f"{name}.png")
                Image.fromarray(unseal(masks[it.image_id]).astype(np.uint8) * 255).save(tmp / "masks" / f"{name}.png")
                fi.write(json.dumps({"file_name": f"{name}.png", "image_id": it.image_id, "patient_id": it.patient_id,
                                     "modality": it.modality,
                                     "spacing_mm": None if it.spacing_mm is None else [float(v) for v in it.spacing_mm],
                                     "meta": json.dumps(dict(it.meta), allow_nan=False, sort_keys=True)},
                                    allow_nan=False) + "\n")
                labels = {k: v for k, v in unseal_labels(masks[it.image_id]).items()}
                fm.write(json.dumps({"file_name": f"{name}.png", "image_id": it.image_id,
                                     "labels": json.dumps(labels, allow_nan=False, sort_keys=True)},
                                    allow_nan=False) + "\n")
        (tmp / "README.md").write_text(card, encoding="utf-8")
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d items to %s", len(items), out_dir)
    return out_dir


def load_hub_layout(source: str, *, revision: str | None = None, cache_dir: str | Path | None = None
                    ) -> tuple[list[ImageItem], EvalMasks]:
    """Read the ``images`` and ``masks`` configs of a local folder or Hub dataset and join them on ``image_id``."""
    import datasets

    src = parse_source(source, revision=revision)
    kw: dict[str, Any] = {"split": "train"}
    if src.revision:
        kw["revision"] = src.revision
    with tempfile.TemporaryDirectory(prefix="covtoken-ds-cache-") as tmp_cache:
        # A local folder gets a throw-away cache: `datasets` keys local image folders loosely and would hand
        # back rows that point into an older folder of the same layout.
        kw["cache_dir"] = str(cache_dir) if cache_dir is not None else (tmp_cache if src.is_local else None)
        if kw["cache_dir"] is None:
            del kw["cache_dir"]
        imgs = datasets.load_dataset(src.path, "images", **kw)
        msks = datasets.load_dataset(src.path, "masks", **kw)
        return _join(source, imgs, msks)


def _join(source: str, imgs: Any, msks: Any) -> tuple[list[ImageItem], EvalMasks]:
    by_id = {row["image_id"]: row["image"] for row in msks}
    labels_of = {row["image_id"]: json.loads(row.get("labels") or "{}") for row in msks}
    items, sealed = [], {}
    for row in imgs:
        iid = row["image_id"]
        where = f"{source}[images]/{iid}"
        raw = np.asarray(row["image"])
        arr = raw.astype(np.float32) / (255.0 if raw.dtype.itemsize == 1 else 65535.0)  # 8-bit or 16-bit PNG
        if iid not in by_id:
            raise ValueError(f"{where}: no row in the masks config")
        mask = np.asarray(by_id.pop(iid)) > 0
        if mask.ndim == 3:
            mask = mask[..., 0]
        spacing = row.get("spacing_mm")
        items.append(ImageItem(image=arr, image_id=iid, patient_id=row["patient_id"], modality=row["modality"],
                               spacing_mm=None if spacing is None else tuple(spacing), source=where,
                               meta=json.loads(row["meta"]) if row.get("meta") else {}))
        sealed[iid] = SealedMask(mask, source=f"{source}[masks]/{iid}", labels=labels_of.get(iid))
    if by_id:
        raise ValueError(f"{source}[masks]: rows without an image: {sorted(by_id)[:3]}")
    return items, EvalMasks(sealed, items)


def push_dataset(folder: str | Path, repo_id: str, *, private: bool = True, message: str) -> str:
    """Create (or reuse) the dataset repo and upload ``folder``; returns the commit sha."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset", commit_message=message)
    return info.oid
