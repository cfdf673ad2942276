"""Stable pairs for probe training and evaluation: one image and a nuisance-augmented view of it.

A stable pair joins an image (the *context*) with a view of the same image under a synthetic nuisance (the
*target*, :mod:`covtoken.data.nuisance`): the lesion did not change, only the acquisition did. Forming them
needs nothing but the images and a seed, so they are label-free. *Changing* pairs (two different lesions
matched on diagnosis and site) need the sealed diagnosis and are built in :mod:`covtoken.eval.change`, for
evaluation only; nothing here reads a label.

* :func:`lesion_table` reads the lesion id (``meta["lesion_id"]``) and site of every image.
* :func:`plan_views` draws the views: each training image gets ``n_views`` views that cycle through the
  training families; each evaluation lesion gets one view under the held-out family (its representative
  image = smallest image id of the lesion).
* :func:`render_views` makes the pixels; :func:`stable_pairs` lists (context image, target view) pairs.

View keys are ``"<image_id>~<family>~<k>"``; a view depends only on ``(seed, image id, family, k)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from .layout import ImageItem
from .nuisance import FAMILIES, NuisanceParams, augment, check_family, nuisance_rng, sample_nuisance

__all__ = ["LesionTable", "View", "StablePair", "lesion_table", "plan_views", "render_views", "stable_pairs",
           "view_key", "representatives", "train_families"]


@dataclass(frozen=True)
class LesionTable:
    """Per image: lesion id, site and patient (site is acquisition metadata, not a diagnosis).

    Attributes:
        lesion_of: image id -> lesion id.
        site_of: image id -> anatomical site (``"unknown"`` when the item has none).
        patient_of: image id -> patient id.
    """

    lesion_of: Mapping[str, str]
    site_of: Mapping[str, str]
    patient_of: Mapping[str, str]


@dataclass(frozen=True)
class View:
    """A nuisance-augmented view of one image.

    Attributes:
        key: ``"<image_id>~<family>~<k>"``.
        image_id: the source image.
        lesion_id: the source image's lesion.
        params: the drawn nuisance.
        index: ``k``, the view number of this image.
    """

    key: str
    image_id: str
    lesion_id: str
    params: NuisanceParams
    index: int


@dataclass(frozen=True)
class StablePair:
    """Context image and target view of the same image (label-free: the lesion is unchanged)."""

    context: str
    target: str
    lesion_id: str
    family: str


def lesion_table(items: Sequence[ImageItem]) -> LesionTable:
    """Lesion id, site and patient of every image.

    Raises:
        ValueError: an item without ``meta["lesion_id"]``, or a lesion whose images belong to two patients.
    """
    lesion_of, site_of, patient_of, owner = {}, {}, {}, {}
    for it in items:
        lid = it.meta.get("lesion_id")
        if not lid:
            raise ValueError(f"{it.source or it.image_id}: item has no meta['lesion_id']; stable and changing pairs "
                             "are defined per lesion")
        if owner.setdefault(str(lid), it.patient_id) != it.patient_id:
            raise ValueError(f"lesion {lid!r} has images of patient {owner[str(lid)]!r} and of {it.patient_id!r}")
        lesion_of[it.image_id] = str(lid)
        site_of[it.image_id] = str(it.meta.get("site") or "unknown")
        patient_of[it.image_id] = it.patient_id
    return LesionTable(lesion_of, site_of, patient_of)


def representatives(table: LesionTable, patients: Iterable[str]) -> dict[str, str]:
    """Lesion id -> its representative image (smallest image id) for the lesions of ``patients``."""
    members = set(patients)
    reps: dict[str, str] = {}
    for iid in sorted(table.lesion_of):
        if table.patient_of[iid] in members:
            reps.setdefault(table.lesion_of[iid], iid)
    return reps


def view_key(image_id: str, family: str, k: int) -> str:
    return f"{image_id}~{family}~{k}"


def plan_views(table: LesionTable, image_ids: Iterable[str], families: Sequence[str], *, n_views: int,
               seed: int) -> list[View]:
    """Draw ``n_views`` views per image, view ``k`` under ``families[k % len(families)]``.

    Args:
        table: from :func:`lesion_table`.
        image_ids: the images to augment (training images, or evaluation representatives).
        families: nuisance families to cycle through (each must be a key of ``FAMILIES``).
        n_views: views per image (>= 1).
        seed: nuisance seed; view parameters depend only on (seed, image id, family, k).

    Returns:
        views in order of sorted image id, then k.
    """
    fams = [check_family(f) for f in families]
    if not fams:
        raise ValueError("plan_views needs at least one nuisance family")
    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    views = []
    for iid in sorted(set(image_ids)):
        if iid not in table.lesion_of:
            raise KeyError(f"image {iid!r} is not in the lesion table")
        for k in range(n_views):
            fam = fams[k % len(fams)]
            params = sample_nuisance(fam, nuisance_rng(seed, f"{fam}|{iid}|{k}"))
            views.append(View(view_key(iid, fam, k), iid, table.lesion_of[iid], params, k))
    return views


def render_views(images: Mapping[str, np.ndarray], views: Sequence[View], *, seed: int) -> dict[str, np.ndarray]:
    """Pixels of every view: ``{view key: (H, W[, 3]) float32}``.

    The pixels are recomputed from ``(seed, image id, family, k)`` and checked against the drawn parameters,
    so a view and its rendering cannot drift apart.
    """
    out = {}
    for v in views:
        img, params = augment(images[v.image_id], v.params.family, seed=seed, key=f"{v.image_id}|{v.index}")
        if params != v.params:
            raise RuntimeError(f"view {v.key}: parameters drawn for rendering differ from the plan (seed {seed})")
        out[v.key] = img
    return out


def stable_pairs(views: Sequence[View]) -> list[StablePair]:
    """One stable pair per view: (source image, view)."""
    return [StablePair(v.image_id, v.key, v.lesion_id, v.params.family) for v in views]


def train_families(held_out: str) -> list[str]:
    """The two families that are not ``held_out`` (in the order of ``FAMILIES``)."""
    check_family(held_out)
    return [f for f in FAMILIES if f != held_out]
