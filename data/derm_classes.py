"""Dermoscopy-like phantoms for lesion classification, whose diagnosis depends on the image AND the metadata.

Each lesion has one of five morphologies drawn in the image (pigment colour, border regularity, size) and a
patient questionnaire in ``meta`` (age, sex, site, and four yes/no/missing answers). The diagnosis (sealed with
the mask, evaluation-only) is fixed by the morphology and the age group: the same picture is ``nevus`` at 35 and
``solar_lentigo`` at 70. Neither the image alone nor the metadata alone can reach full accuracy; a model with
both can. Age is missing for about 10% of lesions (then the diagnosis is ambiguous between two classes), the
yes/no answers are noise (independent of the diagnosis), so a reduced questionnaire (age, sex, site) carries
all the information of the full one. A fifth morphology gives rarer diagnoses the class list folds into
``other``.

Patients are clusters: skin tone, age and sex are per patient, and one patient has several lesions.
"""
from __future__ import annotations

import numpy as np

from .layout import EvalMasks, ImageItem, SealedMask
from .phantoms import _blob, _grid, _smooth_noise

__all__ = ["derm_class_phantoms", "MORPHOLOGY_DX", "OTHER_DX", "AGE_SPLIT"]

#: morphology -> (diagnosis below AGE_SPLIT, diagnosis at or above it)
MORPHOLOGY_DX = {
    "brown_regular": ("nevus", "solar_lentigo"),
    "variegated_irregular": ("dysplastic_nevus", "melanoma"),
    "blue_grey": ("blue_nevus", "bcc"),
    "red_lobular": ("angioma", "pyogenic_granuloma"),
}
#: the fifth morphology's diagnoses (rare; a class list maps them to "other")
OTHER_DX = ("dermatofibroma", "scar", "wart")
AGE_SPLIT = 50.0
_PIGMENT = {"brown_regular": (0.45, 0.30, 0.20), "variegated_irregular": (0.25, 0.15, 0.12),
            "blue_grey": (0.35, 0.42, 0.55), "red_lobular": (0.75, 0.22, 0.25), "other": (0.80, 0.70, 0.62)}
_SITES = ("back", "trunk", "lower_extremity", "upper_extremity", "face")
_YES_NO = ("itch", "bleeding", "family_history", "changed")


def derm_class_phantoms(*, n_patients: int, lesions_per_patient: int = 2, size: int = 64, seed: int = 0,
                        other_fraction: float = 0.12, age_missing: float = 0.1) -> tuple[list[ImageItem], EvalMasks]:
    """Dermoscopy-like RGB images, one per lesion, with a questionnaire in ``meta``; ``dx`` sealed with the mask.

    Args:
        n_patients: patients (ids ``dxc-p000``...).
        lesions_per_patient: images per patient (one lesion each).
        size: image side in pixels.
        seed: generator seed; patients come from independent child seeds.
        other_fraction: probability that a lesion has the fifth ("other") morphology.
        age_missing: probability that a patient's age is missing from the questionnaire.

    Returns:
        items (``meta``: ``lesion_id``, ``site``, ``age`` (float or None), ``sex``, and the yes/no answers
        (``"yes"``/``"no"``/None)), and the sealed masks with ``labels={"dx": ...}``.
    """
    if not 0 <= other_fraction < 1 or not 0 <= age_missing < 1:
        raise ValueError(f"other_fraction and age_missing must lie in [0, 1), got {other_fraction}, {age_missing}")
    items, masks = [], {}
    yy, xx = _grid(size)
    morphs = list(MORPHOLOGY_DX)
    s = size / 64.0
    for p, child in enumerate(np.random.SeedSequence(seed).spawn(n_patients)):
        rng = np.random.default_rng(child)
        pid = f"dxc-p{p:03d}"
        skin = np.array([0.85, 0.65, 0.55]) * rng.uniform(0.75, 1.05)
        age = float(rng.uniform(18, 90))
        sex = ("female", "male")[int(rng.integers(2))]
        age_known = rng.random() >= age_missing
        for k in range(lesions_per_patient):
            tex = 0.04 * _smooth_noise(rng, size, 8)[..., None]
            img = np.clip(skin[None, None, :] + tex + rng.normal(0, 0.015, (size, size, 3)), 0, 1)
            if rng.random() < other_fraction:
                morph, dx = "other", OTHER_DX[int(rng.integers(len(OTHER_DX)))]
            else:
                morph = morphs[int(rng.integers(len(morphs)))]
                dx = MORPHOLOGY_DX[morph][int(age >= AGE_SPLIT)]
            r = (rng.uniform(10, 20) if morph in ("variegated_irregular", "other") else rng.uniform(6, 14)) * s
            cy, cx = rng.uniform(0.35, 0.65) * size, rng.uniform(0.35, 0.65) * size
            lesion = _blob(yy, xx, cy, cx, r, rng, irregular=0.25 if morph == "variegated_irregular" else 0.07)
            pigment = np.array(_PIGMENT[morph]) * rng.uniform(0.85, 1.15)
            vari = 0.15 * _smooth_noise(rng, size, 8)[..., None] if morph == "variegated_irregular" else 0.0
            img = np.where(lesion[..., None], np.clip(pigment + vari, 0, 1), img)
            for _ in range(rng.integers(0, 4)):  # hair strands
                x0, slope = rng.uniform(0, size), rng.uniform(-1.5, 1.5)
                line = np.abs(xx - (x0 + slope * (yy - size / 2))) < 0.6
                img = np.where(line[..., None], 0.15, img)
            iid = f"{pid}-l{k:02d}"
            meta = {"lesion_id": iid, "site": _SITES[int(rng.integers(len(_SITES)))],
                    "age": round(age, 1) if age_known else None, "sex": sex}
            for q in _YES_NO:  # noise answers, independent of the diagnosis; about 10% unanswered
                u = rng.random()
                meta[q] = None if u < 0.1 else ("yes" if u < 0.55 else "no")
            items.append(ImageItem(image=img.astype(np.float32), image_id=iid, patient_id=pid, modality="dermoscopy",
                                   source=f"phantom-derm-classes(seed={seed})/{iid}", meta=meta))
            masks[iid] = SealedMask(lesion, source=f"phantom-derm-classes(seed={seed})/{iid}/mask",
                                    labels={"dx": dx})
    return items, EvalMasks(masks, items)
