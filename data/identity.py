"""What each catalog dataset is, checked against what was loaded; the content digest; registered samples.

A catalog entry declares its identity (:class:`DatasetIdentity`: modality, channels, naming pattern, count range).
:func:`check_identity` refuses loaded content that does not match, naming the first offending file, so colour
dermoscopy given as ``--dataset busi`` stops with an error instead of becoming a "BUSI" record.
:func:`content_digest` is a sha256 over the sorted (relative path, file sha256) pairs of the images read (pixel
bytes for images that do not come from one file each), so two runs on "the same" data can be compared.
:data:`REGISTERED_SAMPLES` lists the small real-data samples the project knows by content digest
(``../shared/realdata``); :func:`is_registered_sample` is what the evidence tier is derived from.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import DatasetIdentityError
from .imageio import colour_fraction
from .layout import ImageItem

__all__ = ["DatasetIdentity", "IDENTITIES", "REGISTERED_SAMPLES", "check_identity", "content_digest",
           "is_registered_sample", "registered_sample"]

#: a colour image has at least this fraction of coloured pixels; a grey one at most this fraction
COLOUR_MIN_FRACTION = 0.10


@dataclass(frozen=True)
class DatasetIdentity:
    """What a dataset is.

    Attributes:
        modality: the layout modality every item must carry (``US``, ``CT``, ``dermoscopy``...).
        channels: ``grey`` (2-D items) or ``colour`` (RGB items with colour content).
        image_id_pattern: regular expression every image id must match in full (None: any).
        patient_id_pattern: regular expression every patient id must match in full (None: any).
        count: inclusive range of the number of images.
    """

    modality: str
    channels: str
    image_id_pattern: str | None = None
    patient_id_pattern: str | None = None
    count: tuple[int, int] = (1, 10_000_000)

    def describe(self) -> dict[str, Any]:
        return {"modality": self.modality, "channels": self.channels, "image_id_pattern": self.image_id_pattern,
                "patient_id_pattern": self.patient_id_pattern, "count_range": list(self.count)}


IDENTITIES: dict[str, DatasetIdentity] = {
    # 780 images in the published set (437 benign, 210 malignant, 133 normal); ids as in the class folders
    "busi": DatasetIdentity("US", "grey", r"(benign|malignant|normal)[ _]?\(?\d+\)?", None, (1, 780)),
    "lidc": DatasetIdentity("CT", "grey", None, r"LIDC-IDRI-\d{4}", (1, 250_000)),
    "lidc-xml": DatasetIdentity("CT", "grey", None, None, (1, 250_000)),  # patient ids: the DICOM PatientID
    # de-identified copies carry keyed pseudonyms (covtoken.data.deid)
    "lung-pet-ct-dx": DatasetIdentity("CT", "grey", None, r"Lung_Dx-[A-G]\d{4}|anon-[0-9a-f]{16}", (1, 260_000)),
    # HAM10000 (10015) plus the ISIC 2018 task 3 validation and test images
    "ham10000": DatasetIdentity("dermoscopy", "colour", r"ISIC_\d{7}", None, (1, 11_720)),
    "kits23": DatasetIdentity("CT", "grey"),
    "msd-liver": DatasetIdentity("CT", "grey"),
    "msd-pancreas": DatasetIdentity("CT", "grey"),
}

#: Small real-data samples known by content digest: catalog name -> sample name -> content digest.
REGISTERED_SAMPLES: dict[str, dict[str, str]] = {
    # ../shared/realdata/busi (60 images) and ../shared/realdata/lidc_idri (71 slices, 5 patients)
    "busi": {"busi-sample": "sha256:a008079f24faae7a75f3f9c215c2e0a07f81d009c2a0c33f975e8699d7ad05b0"},
    "lidc": {"lidc-sample": "sha256:d0b365cc8020ed8cdb4c4415073dea871b73aa7cc07fc52013129bb0e2c48d7d"},
}


def _where(item: ImageItem) -> str:
    return item.source or item.image_id


def check_identity(name: str, items: Sequence[ImageItem], identity: DatasetIdentity) -> None:
    """Refuse content that is not what dataset ``name`` is.

    Raises:
        DatasetIdentityError: naming the first offending file (or the count), what was found and what was expected.
    """
    lo, hi = identity.count
    if not lo <= len(items) <= hi:
        raise DatasetIdentityError(f"dataset {name!r}: {len(items)} images, but {name} has between {lo} and {hi}; "
                                   "is --data-root the right folder?")
    img_re = re.compile(identity.image_id_pattern) if identity.image_id_pattern else None
    pat_re = re.compile(identity.patient_id_pattern) if identity.patient_id_pattern else None
    for it in items:
        if it.modality != identity.modality:
            raise DatasetIdentityError(f"{_where(it)}: modality {it.modality!r}, but {name} is {identity.modality}")
        if img_re and not img_re.fullmatch(it.image_id):
            raise DatasetIdentityError(f"{_where(it)}: image id {it.image_id!r} does not match {name}'s naming "
                                       f"pattern {identity.image_id_pattern!r}; not {name}? use --dataset folder")
        if pat_re and not pat_re.fullmatch(it.patient_id):
            raise DatasetIdentityError(f"{_where(it)}: patient id {it.patient_id!r} does not match {name}'s pattern "
                                       f"{identity.patient_id_pattern!r}; not {name}? use --dataset folder")
        frac = colour_fraction(it.image)
        if identity.channels == "grey" and (it.image.ndim != 2 and frac > COLOUR_MIN_FRACTION):
            raise DatasetIdentityError(f"{_where(it)}: colour image ({frac:.0%} of pixels coloured), but {name} "
                                       "is greyscale")
        if identity.channels == "colour" and frac < COLOUR_MIN_FRACTION:
            raise DatasetIdentityError(f"{_where(it)}: greyscale content (only {frac:.1%} of pixels coloured), but "
                                       f"{name} is colour {identity.modality}")


def content_digest(items: Sequence[ImageItem], root: str | Path | None = None) -> tuple[str, str]:
    """sha256 over the sorted (relative path, file sha256) pairs of the images.

    Items whose ``source`` is not a file of their own (rows of an archive, generated phantoms) contribute
    (image id, sha256 of shape + float32 pixel bytes) instead.

    Args:
        items: the loaded images.
        root: the dataset folder paths are taken relative to (None: the file name only).

    Returns:
        ``(digest, basis)`` with basis ``files``, ``pixels`` or ``files+pixels``.
    """
    entries: list[tuple[str, str]] = []
    kinds = set()
    base = Path(root).resolve() if root is not None else None
    for it in items:
        p = Path(it.source) if it.source else None
        if p is not None and p.is_file():
            rp = p.resolve()
            try:
                rel = rp.relative_to(base).as_posix() if base else rp.name
            except ValueError:
                rel = rp.name
            entries.append((rel, hashlib.sha256(rp.read_bytes()).hexdigest()))
            kinds.add("files")
        else:
            a = np.ascontiguousarray(it.image, dtype=np.float32)
            h = hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()
            entries.append((f"id:{it.image_id}", h))
            kinds.add("pixels")
    h = hashlib.sha256()
    for rel, fh in sorted(entries):
        h.update(rel.encode() + b"\0" + fh.encode() + b"\n")
    return "sha256:" + h.hexdigest(), "+".join(sorted(kinds))


def registered_sample(name: str, digest: str | None) -> str | None:
    """The registered sample dataset ``name`` with content ``digest`` is, or None."""
    for sample, known in REGISTERED_SAMPLES.get(name, {}).items():
        if digest is not None and digest == known:
            return sample
    return None


def is_registered_sample(dataset: str | Mapping[str, Any], digest: str | None = None) -> bool:
    """True when the data is one of the registered small real-data samples (evidence tier ``sample``).

    Args:
        dataset: a catalog name (with ``digest``), or a record's dataset provenance (its ``catalog_name`` and
            ``content_digest`` are used; a claimed ``registered_sample`` field is not trusted).
        digest: the content digest when ``dataset`` is a name.
    """
    if isinstance(dataset, Mapping):
        return registered_sample(str(dataset.get("catalog_name", "")), dataset.get("content_digest")) is not None
    return registered_sample(dataset, digest) is not None
