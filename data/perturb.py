"""Perturbed copies of a dataset's sealed masks and labels, for the label-leak test.

The data layer is the one place (besides evaluation) that may open masks, so the perturbations the leak test
applies to the labels of later roles live here. Nothing in a job calls this.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from .layout import EvalMasks, SealedMask, unseal, unseal_labels

__all__ = ["PERTURBATIONS", "perturb_labels"]

#: ``permuted``: masks and labels move between the chosen images; ``flipped``: each mask turned 180 degrees and the
#: labels permuted; ``zeroed``: empty masks, every image given the labels of the first one.
PERTURBATIONS = ("permuted", "flipped", "zeroed")


def perturb_labels(masks: EvalMasks, image_ids: Iterable[str], how: str, *, seed: int = 0) -> EvalMasks:
    """A copy of ``masks`` whose masks and labels are perturbed on ``image_ids`` (the others are untouched).

    Args:
        masks: the dataset's sealed masks.
        image_ids: images whose labels are perturbed (e.g. every image of a later role's patients).
        how: one of :data:`PERTURBATIONS`.
        seed: permutation seed; the permutation moves every image when there are two or more.

    Raises:
        ValueError: unknown ``how``, or an image id without a mask.
    """
    ids = sorted(set(image_ids))
    missing = [i for i in ids if i not in masks]
    if missing:
        raise ValueError(f"no mask for image(s) {missing[:5]}")
    if how not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {how!r}; choose one of {', '.join(PERTURBATIONS)}")
    out = dict(masks)
    n = len(ids)
    # a cyclic shift of a random order: no image keeps its own mask (for n >= 2)
    order = np.random.default_rng(seed).permutation(n)
    donor = {ids[order[k]]: ids[order[(k + 1) % n]] for k in range(n)}
    for iid in ids:
        src = masks[donor[iid]]
        arr, labels = unseal(masks[iid]), unseal_labels(src)
        if how == "permuted" and unseal(src).shape == arr.shape:
            out[iid] = src
        elif how == "permuted":  # masks of another shape cannot move; move the labels and flip the mask
            out[iid] = SealedMask(arr[::-1, ::-1], source=f"permuted/{iid}", labels=labels)
        elif how == "flipped":
            out[iid] = SealedMask(arr[::-1, ::-1], source=f"flipped/{iid}", labels=labels)
        else:
            out[iid] = SealedMask(np.zeros(arr.shape, bool), source=f"zeroed/{iid}",
                                  labels=unseal_labels(masks[ids[0]]))
    return EvalMasks(out)
