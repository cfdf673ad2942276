"""The common layout from a Hugging Face ``datasets`` source, and an imagefolder writer for the round trip.

One code path reads a local folder, a Hub dataset id (``org/name``) or an ``hf://datasets/org/name[@rev]/sub``
path: the source is split into ``(path, revision, data_dir)`` and handed to :func:`datasets.load_dataset`
(``datasets`` does not accept ``data_dir="hf://..."``; see the reference notes, section 11). An existing local
directory wins over a repo id of the same name.

Folder layout (what :func:`write_imagefolder` writes and :func:`load_items` expects)::

    out/metadata.jsonl   {"file_name": "images/000000_x.png", "mask_file_name": "masks/000000_x.png",
                          "patient_id": ..., "image_id": ..., "modality": ..., "spacing_mm": [r, c] | null,
                          "meta": "<json>"}
    out/images/*.png     grey: 16-bit PNG of round(x * 65535); RGB: 8-bit PNG
    out/masks/*.png      8-bit 0/255

Images must already be in [0, 1] (window CT first); HU cannot be stored in PNG and is refused. Local source
paths are not written (they can name people or sites); loaded items point at their dataset row instead.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import unquote

import numpy as np
from PIL import Image

from covtoken.data.imageio import check_mask, pil_to_grey, pil_to_mask, pil_to_rgb
from covtoken.data.layout import EvalMasks, ImageItem, SealedMask, unseal

__all__ = ["HubSource", "parse_source", "load_items", "rows_to_items", "write_imagefolder"]

log = logging.getLogger(__name__)

_HF_RE = re.compile(
    r"^hf://datasets/(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>refs/pr/\d+|refs/convert/[\w.-]+|[^/]+))?(?:/(?P<sub>.*))?$"
)
_REPO_RE = re.compile(r"^[\w][\w.-]*/[\w.-]+$")
_RGB_MODALITIES = frozenset({"dermoscopy"})


@dataclass(frozen=True)
class HubSource:
    """Where :func:`load_items` reads from.

    Attributes:
        path: absolute local directory, or a Hub dataset repo id.
        revision: branch, tag or commit on the Hub (None: default branch, or local).
        data_dir: subfolder inside the repo or directory (None: its root).
        is_local: ``path`` is a local directory.
    """

    path: str
    revision: str | None
    data_dir: str | None
    is_local: bool


def _merge(name: str, from_source: str | None, given: str | None, source: str) -> str | None:
    if from_source and given and from_source != given:
        raise ValueError(f"{source}: {name} {from_source!r} in the path conflicts with {name}={given!r}")
    return from_source or given


def parse_source(source: str, *, revision: str | None = None, data_dir: str | None = None) -> HubSource:
    """Split a dataset source into path, revision and subfolder.

    Args:
        source: a local directory, ``org/name``, or ``hf://datasets/org/name[@rev][/sub/dir]`` (the revision
            may be URL-encoded, e.g. ``refs%2Fpr%2F3``).
        revision: revision, if not given in ``source``.
        data_dir: subfolder, if not given in ``source``.

    Returns:
        The parsed :class:`HubSource`.

    Raises:
        ValueError: malformed ``hf://`` path, missing local directory, conflicting revision/data_dir, or a
            string that is none of the accepted forms.
    """
    source = str(source).strip()
    if not source:
        raise ValueError("empty dataset source")
    local = Path(source).expanduser()
    if local.is_dir():
        if revision:
            raise ValueError(f"{source}: a local directory has no revision (got revision={revision!r})")
        return HubSource(str(local.resolve()), None, data_dir, True)
    if source.startswith("hf://"):
        m = _HF_RE.match(source)
        if not m:
            raise ValueError(f"{source}: expected hf://datasets/org/name[@revision][/subfolder]")
        rev = unquote(m.group("rev")) if m.group("rev") else None
        sub = (m.group("sub") or "").strip("/") or None
        rev, sub = _merge("revision", rev, revision, source), _merge("data_dir", sub, data_dir, source)
        return HubSource(m.group("repo"), rev, sub, False)
    if source.startswith((".", "/", "~")) or not _REPO_RE.match(source):
        raise ValueError(f"{source}: no such local directory, and not an org/name repo id or hf://datasets/ path")
    return HubSource(source, revision, data_dir, False)


def load_items(
    source: str,
    *,
    split: str = "train",
    revision: str | None = None,
    data_dir: str | None = None,
    cache_dir: str | Path | None = None,
    modality: str | None = None,
) -> tuple[list[ImageItem], EvalMasks]:
    """Load one split of a local folder or Hub dataset into the common layout.

    Args:
        source: see :func:`parse_source`.
        split: split name (``train`` for a flat folder).
        revision: Hub revision (pin a commit sha for repeatable runs).
        data_dir: subfolder.
        cache_dir: ``datasets`` cache; default is the user cache.
        modality: fallback when rows carry no ``modality`` column.

    Returns:
        ``(items, masks)``.

    Raises:
        ValueError: malformed source or rows (see :func:`rows_to_items`).
    """
    import datasets  # heavy import, only when loading

    src = parse_source(source, revision=revision, data_dir=data_dir)
    kwargs: dict[str, Any] = {"split": split}
    if src.revision:
        kwargs["revision"] = src.revision
    if src.data_dir:
        kwargs["data_dir"] = src.data_dir
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    log.info("load_dataset(%r, %s)", src.path, kwargs)
    ds = datasets.load_dataset(src.path, **kwargs)
    where = f"{source}[{split}]" + (f"@{src.revision}" if src.revision else "")
    return rows_to_items(ds, where=where, modality=modality)


def rows_to_items(
    rows: Iterable[Mapping[str, Any]], *, where: str, modality: str | None = None
) -> tuple[list[ImageItem], EvalMasks]:
    """Convert decoded dataset rows (``image`` and ``mask`` PIL images plus metadata) to the layout.

    Args:
        rows: e.g. a :class:`datasets.Dataset`.
        where: prefix for error messages (``"<source>[<split>]"``).
        modality: fallback when a row has no ``modality``.

    Returns:
        ``(items, masks)``.

    Raises:
        ValueError: naming the row: missing image/mask/patient id, duplicate image id, shape mismatch,
            non-binary or all-lesion mask, bad ``meta`` JSON.
    """
    items: list[ImageItem] = []
    masks: dict[str, SealedMask] = {}
    for i, row in enumerate(rows):
        at = f"{where}[{i}]"
        if row.get("image") is None or row.get("mask") is None:
            raise ValueError(f"{at}: row needs 'image' and 'mask' (metadata file_name and mask_file_name)")
        patient_id = str(row.get("patient_id") or "").strip()
        if not patient_id:
            raise ValueError(f"{at}: missing patient id")
        image_id = str(row.get("image_id") or "").strip() or f"{where}/{i}"
        if image_id in masks:
            raise ValueError(f"{at}: duplicate image id {image_id!r}")
        mod = str(row.get("modality") or modality or "")
        if not mod:
            raise ValueError(f"{at}: no modality column and no modality given")
        image = pil_to_rgb(row["image"], at) if mod in _RGB_MODALITIES else pil_to_grey(row["image"], at)
        mask = pil_to_mask(row["mask"], f"{at} mask")
        check_mask(mask, image.shape, mask_where=f"{at} mask", image_where=at)
        spacing = row.get("spacing_mm")
        try:
            meta = json.loads(row["meta"]) if row.get("meta") else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"{at}: meta is not valid JSON: {exc}") from exc
        items.append(
            ImageItem(
                image=image, image_id=image_id, patient_id=patient_id, modality=mod,
                spacing_mm=None if spacing is None else (float(spacing[0]), float(spacing[1])),
                source=at, meta=meta,
            )
        )
        masks[image_id] = SealedMask(mask, source=f"{at} mask")
    if not items:
        raise ValueError(f"{where}: no rows")
    return items, EvalMasks(masks, items)


def _mask_pixels(mask: SealedMask) -> np.ndarray:
    # Export reads a sealed mask (the data layer may): the pixels go straight to a PNG and come back sealed.
    return unseal(mask)


def _safe_name(i: int, image_id: str) -> str:
    return f"{i:06d}_" + re.sub(r"[^A-Za-z0-9._-]+", "_", image_id)[:80]


def _encode_image(item: ImageItem) -> Image.Image:
    img = item.image
    if img.min() < 0.0 or img.max() > 1.0:
        raise ValueError(
            f"{item.source or item.image_id}: image values {float(img.min()):.4g}..{float(img.max()):.4g} are "
            "outside [0, 1]; window CT (covtoken.data.dicom.apply_preset) before writing"
        )
    if img.ndim == 3:
        return Image.fromarray(np.rint(img * 255.0).astype(np.uint8), mode="RGB")
    return Image.fromarray(np.rint(img * 65535.0).astype(np.uint16))


def write_imagefolder(items: list[ImageItem], masks: EvalMasks, out_dir: str | Path) -> Path:
    """Write items and masks as an imagefolder that :func:`load_items` (and ``load_dataset``) reads back.

    Everything is checked before anything is written; files go to a temporary sibling folder renamed into
    place at the end, so a failure leaves nothing behind.

    Args:
        items: images in [0, 1] (grey or RGB).
        masks: one sealed mask per item.
        out_dir: new folder; refused if it exists.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: existing ``out_dir``, no items, duplicate ids, missing mask, values outside [0, 1],
            shape mismatch, non-JSON meta.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ValueError(f"{out_dir}: exists; write to a new folder")
    if not items:
        raise ValueError(f"{out_dir}: no items to write")
    EvalMasks(masks, items)  # every item has a mask of its shape
    ids = [it.image_id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{out_dir}: duplicate image ids")
    encoded, rows = [], []
    for i, it in enumerate(items):
        name = _safe_name(i, it.image_id)
        try:
            meta = json.dumps(dict(it.meta), allow_nan=False, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{it.source or it.image_id}: meta is not JSON-serialisable: {exc}") from exc
        mask_png = Image.fromarray(_mask_pixels(masks[it.image_id]).astype(np.uint8) * 255)
        encoded.append((name, _encode_image(it), mask_png))
        rows.append({
            "file_name": f"images/{name}.png", "mask_file_name": f"masks/{name}.png", "patient_id": it.patient_id,
            "image_id": it.image_id, "modality": it.modality,
            "spacing_mm": None if it.spacing_mm is None else [float(v) for v in it.spacing_mm],
            "meta": meta,
        })
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for name, img, mask in encoded:
            img.save(tmp / "images" / f"{name}.png")
            mask.save(tmp / "masks" / f"{name}.png")
        with open(tmp / "metadata.jsonl", "w") as fh:
            for row in rows:
                fh.write(json.dumps(row, allow_nan=False) + "\n")
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d items to %s", len(items), out_dir)
    return out_dir
