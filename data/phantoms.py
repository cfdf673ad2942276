"""Synthetic phantoms for the embedded default: generated from a seed, with patients and sealed masks.

Three modalities, each ``(list[ImageItem], EvalMasks)``:

* :func:`ct_phantoms` - axial chest-CT-like slices in HU, windowed with the lung window: body ellipse,
  two lungs with vessels, Gaussian noise; solid nodules of several sizes, from sub-token (diameter < one
  16-pixel patch) to several tokens, in some slices; others are lesion-free.
* :func:`ct_volume_phantoms` - chest-CT-like *volumes*: contiguous axial slices of one patient share the body,
  lungs, vessels (3-D tubes) and nodules (3-D ellipsoids spanning slices); about half the patients have no
  nodule, so a volume-level label is balanced. Slices carry ``meta["slice_index"]``.
* :func:`kidney_phantoms` - axial abdominal-CT-like slices (abdominal window): fat, muscle wall, liver,
  spine, two kidneys with cortex and medulla; renal tumours (solid, slightly hypodense, 4-16 px radius).
* :func:`us_phantoms` - B-mode-ultrasound-like images: layered tissue, multiplicative Rayleigh speckle,
  depth attenuation; hypoechoic (dark) masses with irregular borders and posterior shadowing.
* :func:`derm_phantoms` - dermoscopy-like RGB: skin tone with texture and hair strands; pigmented lesions
  with irregular borders and colour variegation. Items carry ``lesion_id`` and ``site`` metadata; the
  diagnosis ``dx`` is sealed with the mask (a label: evaluation only).

Each patient has several images; patient-level appearance (body size, skin tone, gain) varies so that
patients are genuine clusters. The same seed always gives the same arrays.
"""
from __future__ import annotations

import numpy as np

from .layout import EvalMasks, ImageItem, SealedMask

__all__ = ["ct_phantoms", "ct_volume_phantoms", "kidney_phantoms", "us_phantoms", "derm_phantoms", "PHANTOM_NODULE_RADII_PX"]

#: Nodule radii (pixels at 128 px); radius 3-5 is at most one 16x16 token.
PHANTOM_NODULE_RADII_PX = (3.0, 4.5, 6.0, 9.0, 13.0)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _blob(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, rng: np.random.Generator,
          irregular: float) -> np.ndarray:
    """A filled blob with a radially perturbed border (irregular = relative amplitude)."""
    ang = np.arctan2(yy - cy, xx - cx)
    harmonics = sum(rng.uniform(-irregular, irregular) * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
                    for k in (2, 3, 5))
    rad = r * (1.0 + harmonics)
    return np.hypot(yy - cy, xx - cx) <= rad


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1] from an upsampled coarse grid."""
    coarse = rng.standard_normal((size // scale + 2, size // scale + 2)).astype(np.float32)
    from scipy.ndimage import zoom

    fine = zoom(coarse, scale, order=3)[:size, :size]
    return fine / (np.abs(fine).max() + 1e-6)


def ct_phantoms(*, n_patients: int, slices_per_patient: int = 4, size: int = 128, seed: int = 0,
                lesion_fraction: float = 0.75) -> tuple[list[ImageItem], EvalMasks]:
    """Chest-CT-like slices (lung window applied, values in [0, 1]).

    Args:
        n_patients: number of patients (ids ``ct-p000``...).
        slices_per_patient: slices per patient.
        size: image side in pixels.
        seed: generator seed; patients are generated from independent child seeds.
        lesion_fraction: probability that a slice contains nodules.
    """
    items, masks = [], {}
    yy, xx = _grid(size)
    c = size / 2
    for p, child in enumerate(np.random.SeedSequence(seed).spawn(n_patients)):
        rng = np.random.default_rng(child)
        pid = f"ct-p{p:03d}"
        body_a, body_b = rng.uniform(0.40, 0.47) * size, rng.uniform(0.30, 0.38) * size
        for s in range(slices_per_patient):
            hu = np.full((size, size), -1000.0, dtype=np.float32)
            body = ((yy - c) / body_b) ** 2 + ((xx - c) / body_a) ** 2 <= 1.0
            hu[body] = 40.0 + 15.0 * _smooth_noise(rng, size, 16)[body]
            lungs = np.zeros((size, size), dtype=bool)
            centres = []
            for side in (-1, 1):
                ly, lx = c + rng.uniform(-3, 3), c + side * body_a * rng.uniform(0.45, 0.52)
                ra, rb = body_a * rng.uniform(0.33, 0.38), body_b * rng.uniform(0.62, 0.72)
                lungs |= ((yy - ly) / rb) ** 2 + ((xx - lx) / ra) ** 2 <= 1.0
                centres.append((ly, lx, ra, rb))
            hu[lungs] = -850.0 + 40.0 * _smooth_noise(rng, size, 8)[lungs]
            for _ in range(rng.integers(4, 9)):  # vessels: thin bright curves inside the lungs
                ly, lx, ra, rb = centres[rng.integers(2)]
                t = np.linspace(0, 1, 60)
                y0, x0 = ly + rng.uniform(-rb, rb) * 0.6, lx + rng.uniform(-ra, ra) * 0.6
                ang = rng.uniform(0, 2 * np.pi)
                for ti in t:
                    py = int(round(y0 + np.sin(ang + 0.8 * ti) * 25 * ti))
                    px = int(round(x0 + np.cos(ang + 0.8 * ti) * 25 * ti))
                    if 0 <= py < size and 0 <= px < size and lungs[py, px]:
                        hu[py, px] = -300.0
            mask = np.zeros((size, size), dtype=bool)
            if rng.random() < lesion_fraction:
                for _ in range(rng.integers(1, 4)):
                    r = float(rng.choice(PHANTOM_NODULE_RADII_PX)) * rng.uniform(0.9, 1.1)
                    inside = np.argwhere(lungs)
                    cy, cx = inside[rng.integers(len(inside))]
                    nod = _blob(yy, xx, float(cy), float(cx), r, rng, irregular=0.12) & body
                    mask |= nod
                    hu[nod] = 20.0 + 20.0 * rng.standard_normal(int(nod.sum()))
            hu += rng.normal(0.0, 25.0, size=hu.shape).astype(np.float32)
            img = np.clip((hu - (-600.0)) / 1500.0 + 0.5, 0.0, 1.0).astype(np.float32)
            iid = f"{pid}-s{s:02d}"
            items.append(ImageItem(image=img, image_id=iid, patient_id=pid, modality="CT",
                                   spacing_mm=(0.7, 0.7), source=f"phantom-ct(seed={seed})/{iid}",
                                   meta={"window": "lung (-600, 1500)"}))
            masks[iid] = SealedMask(mask, source=f"phantom-ct(seed={seed})/{iid}/mask")
    return items, EvalMasks(masks, items)


def _smooth_noise_3d(rng: np.random.Generator, shape: tuple[int, int, int], scale: tuple[int, int, int]) -> np.ndarray:
    """Low-frequency 3-D noise in [-1, 1] from an upsampled coarse grid."""
    from scipy.ndimage import zoom

    coarse = rng.standard_normal(tuple(n // s + 2 for n, s in zip(shape, scale))).astype(np.float32)
    fine = zoom(coarse, scale, order=1)[:shape[0], :shape[1], :shape[2]]
    return fine / (np.abs(fine).max() + 1e-6)


def _segment_distance(zz: np.ndarray, yy: np.ndarray, xx: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of every voxel to the segment ``a``-``b`` (voxel coordinates ``(z, y, x)``)."""
    p = np.stack([zz, yy, xx], -1) - a
    ab = b - a
    t = np.clip((p @ ab) / float(ab @ ab + 1e-9), 0.0, 1.0)
    return np.linalg.norm(p - t[..., None] * ab, axis=-1)


def ct_volume_phantoms(*, n_patients: int, slices_per_patient: int = 16, size: int = 64, seed: int = 0,
                       lesion_fraction: float = 0.5, slice_thickness_mm: float = 2.5) -> tuple[list[ImageItem], EvalMasks]:
    """Chest-CT-like volumes, one per patient, as contiguous axial slices (lung window, values in [0, 1]).

    Unlike :func:`ct_phantoms`, whose slices are drawn independently, the slices of one patient here are cuts through
    one 3-D body: lungs are ellipsoids, vessels are tubes crossing slices, and a nodule is an ellipsoid that spans
    the slices its through-plane radius reaches (in-plane radii from :data:`PHANTOM_NODULE_RADII_PX`, scaled to
    ``size``). With probability ``lesion_fraction`` a patient has 1-3 nodules, otherwise none, so the volume-level
    label ("the volume holds a nodule") is balanced. Ids: patient ``ct3-pNNN``, slice ``<patient>-sNN`` with
    ``meta["slice_index"]``.
    """
    items, masks = [], {}
    d, px = int(slices_per_patient), 0.7 * 128 / size  # in-plane spacing: the 2-D phantom's field of view
    zz, yy, xx = np.mgrid[0:d, 0:size, 0:size].astype(np.float32)
    c, cz = size / 2, (d - 1) / 2
    for p, child in enumerate(np.random.SeedSequence([seed, 3]).spawn(n_patients)):
        rng = np.random.default_rng(child)
        pid = f"ct3-p{p:03d}"
        body_a, body_b = rng.uniform(0.40, 0.47) * size, rng.uniform(0.30, 0.38) * size
        hu = np.full((d, size, size), -1000.0, dtype=np.float32)
        body = ((yy - c) / body_b) ** 2 + ((xx - c) / body_a) ** 2 <= 1.0
        hu[body] = (40.0 + 15.0 * _smooth_noise_3d(rng, hu.shape, (4, 8, 8)))[body]
        lungs = np.zeros(hu.shape, dtype=bool)
        rz = d * rng.uniform(0.55, 0.75)
        for side in (-1, 1):
            ly, lx = c + rng.uniform(-2, 2), c + side * body_a * rng.uniform(0.45, 0.52)
            ra, rb = body_a * rng.uniform(0.33, 0.38), body_b * rng.uniform(0.62, 0.72)
            lungs |= ((yy - ly) / rb) ** 2 + ((xx - lx) / ra) ** 2 + ((zz - cz - rng.uniform(-1, 1)) / rz) ** 2 <= 1.0
        hu[lungs] = (-850.0 + 40.0 * _smooth_noise_3d(rng, hu.shape, (2, 4, 4)))[lungs]
        inside = np.argwhere(lungs).astype(np.float32)
        for _ in range(rng.integers(4, 9)):  # vessels: bright tubes between two points inside the lungs
            a, b = inside[rng.integers(len(inside))], inside[rng.integers(len(inside))]
            hu[(_segment_distance(zz, yy, xx, a, b) <= rng.uniform(0.6, 1.1)) & lungs] = -300.0
        mask = np.zeros(hu.shape, dtype=bool)
        if rng.random() < lesion_fraction:
            for _ in range(rng.integers(1, 4)):
                r = float(rng.choice(PHANTOM_NODULE_RADII_PX)) * size / 128 * rng.uniform(0.9, 1.1)
                cz_, cy, cx = inside[rng.integers(len(inside))]
                r_z = max(0.6, r * px / slice_thickness_mm)
                nod = (((zz - cz_) / r_z) ** 2 + ((yy - cy) / r) ** 2 + ((xx - cx) / r) ** 2 <= 1.0) & body
                mask |= nod
                hu[nod] = 20.0 + 20.0 * rng.standard_normal(int(nod.sum()))
        hu += rng.normal(0.0, 25.0, size=hu.shape).astype(np.float32)
        vol = np.clip((hu - (-600.0)) / 1500.0 + 0.5, 0.0, 1.0).astype(np.float32)
        for s in range(d):
            iid = f"{pid}-s{s:02d}"
            items.append(ImageItem(image=vol[s], image_id=iid, patient_id=pid, modality="CT",
                                   spacing_mm=(px, px), source=f"phantom-ct3d(seed={seed})/{iid}",
                                   meta={"window": "lung (-600, 1500)", "slice_index": s,
                                         "slice_thickness_mm": slice_thickness_mm}))
            masks[iid] = SealedMask(mask[s], source=f"phantom-ct3d(seed={seed})/{iid}/mask")
    return items, EvalMasks(masks, items)


def kidney_phantoms(*, n_patients: int, slices_per_patient: int = 4, size: int = 128, seed: int = 0,
                    lesion_fraction: float = 0.8) -> tuple[list[ImageItem], EvalMasks]:
    """Abdominal-CT-like slices through the kidneys (abdominal window 40/400 applied, values in [0, 1])."""
    items, masks = [], {}
    yy, xx = _grid(size)
    c = size / 2
    for p, child in enumerate(np.random.SeedSequence(seed).spawn(n_patients)):
        rng = np.random.default_rng(child)
        pid = f"kid-p{p:03d}"
        body_a, body_b = rng.uniform(0.42, 0.47) * size, rng.uniform(0.33, 0.38) * size
        for s in range(slices_per_patient):
            hu = np.full((size, size), -1000.0, dtype=np.float32)
            body = ((yy - c) / body_b) ** 2 + ((xx - c) / body_a) ** 2 <= 1.0
            inner = ((yy - c) / (body_b - 6)) ** 2 + ((xx - c) / (body_a - 6)) ** 2 <= 1.0
            hu[body] = -100.0  # subcutaneous fat
            hu[inner] = 45.0 + 10.0 * _smooth_noise(rng, size, 16)[inner]  # muscle and bowel
            liver = ((yy - c + 10) / (body_b * 0.6)) ** 2 + ((xx - c + body_a * 0.35) / (body_a * 0.45)) ** 2 <= 1.0
            hu[liver & inner] = 60.0
            spine = np.hypot(yy - (c + body_b * 0.55), xx - c) <= size * 0.06
            hu[spine] = 700.0
            mask = np.zeros((size, size), dtype=bool)
            for side in (-1, 1):
                ky, kx = c + body_b * 0.35 + rng.uniform(-3, 3), c + side * body_a * rng.uniform(0.38, 0.46)
                ka, kb = size * rng.uniform(0.07, 0.09), size * rng.uniform(0.10, 0.12)
                kidney = ((yy - ky) / kb) ** 2 + ((xx - kx) / ka) ** 2 <= 1.0
                medulla = ((yy - ky) / (kb * 0.55)) ** 2 + ((xx - kx) / (ka * 0.55)) ** 2 <= 1.0
                hu[kidney] = 160.0  # enhancing cortex
                hu[medulla] = 100.0
                if rng.random() < lesion_fraction / 2 + 0.1:
                    inside = np.argwhere(kidney)
                    cy, cx = inside[rng.integers(len(inside))]
                    tum = _blob(yy, xx, float(cy), float(cx), rng.uniform(4.0, 16.0), rng, irregular=0.15) & inner
                    mask |= tum
                    hu[tum] = 70.0 + 15.0 * rng.standard_normal(int(tum.sum()))
            hu += rng.normal(0.0, 12.0, size=hu.shape).astype(np.float32)
            img = np.clip((hu - 40.0) / 400.0 + 0.5, 0.0, 1.0).astype(np.float32)
            iid = f"{pid}-s{s:02d}"
            items.append(ImageItem(image=img, image_id=iid, patient_id=pid, modality="CT", spacing_mm=(0.8, 0.8),
                                   source=f"phantom-kidney(seed={seed})/{iid}", meta={"window": "abdomen (40, 400)"}))
            masks[iid] = SealedMask(mask, source=f"phantom-kidney(seed={seed})/{iid}/mask")
    return items, EvalMasks(masks, items)


def us_phantoms(*, n_patients: int, images_per_patient: int = 3, size: int = 128, seed: int = 0
                ) -> tuple[list[ImageItem], EvalMasks]:
    """Breast-ultrasound-like images with speckle and hypoechoic masses (values in [0, 1])."""
    items, masks = [], {}
    yy, xx = _grid(size)
    for p, child in enumerate(np.random.SeedSequence(seed).spawn(n_patients)):
        rng = np.random.default_rng(child)
        pid = f"us-p{p:03d}"
        gain = rng.uniform(0.8, 1.2)
        for k in range(images_per_patient):
            layers = 0.55 + 0.25 * np.sin(yy / size * rng.uniform(6, 10) + 0.6 * _smooth_noise(rng, size, 32))
            echo = layers * (1.0 + 0.3 * _smooth_noise(rng, size, 16))
            mask = np.zeros((size, size), dtype=bool)
            if rng.random() < 0.85:
                r = rng.uniform(6, 22)
                cy, cx = rng.uniform(0.3, 0.7) * size, rng.uniform(0.25, 0.75) * size
                mass = _blob(yy, xx, cy, cx, r, rng, irregular=0.2)
                mask |= mass
                echo = np.where(mass, 0.12 * echo, echo)
                shadow = (xx > cx - r * 0.7) & (xx < cx + r * 0.7) & (yy > cy + r)
                echo = np.where(shadow & ~mass, echo * rng.uniform(0.6, 1.4), echo)
            speckle = rng.rayleigh(scale=1.0 / np.sqrt(np.pi / 2), size=echo.shape)  # unit-mean speckle
            atten = np.exp(-yy / size * rng.uniform(0.3, 0.8))
            img = np.clip(gain * echo * speckle * atten, 0.0, 1.0).astype(np.float32)
            iid = f"{pid}-i{k:02d}"
            items.append(ImageItem(image=img, image_id=iid, patient_id=pid, modality="US",
                                   source=f"phantom-us(seed={seed})/{iid}"))
            masks[iid] = SealedMask(mask, source=f"phantom-us(seed={seed})/{iid}/mask")
    return items, EvalMasks(masks, items)


_DX = ("nevus", "melanoma", "seborrheic_keratosis")
_SITES = ("back", "trunk", "lower_extremity", "upper_extremity", "face")


def derm_phantoms(*, n_patients: int, lesions_per_patient: int = 2, size: int = 128, seed: int = 0
                  ) -> tuple[list[ImageItem], EvalMasks]:
    """Dermoscopy-like RGB images, one per lesion (``lesion_id``, ``site`` in meta; ``dx`` sealed with the mask)."""
    items, masks = [], {}
    yy, xx = _grid(size)
    for p, child in enumerate(np.random.SeedSequence(seed).spawn(n_patients)):
        rng = np.random.default_rng(child)
        pid = f"derm-p{p:03d}"
        skin = np.array([0.85, 0.65, 0.55]) * rng.uniform(0.75, 1.05)
        for k in range(lesions_per_patient):
            tex = 0.04 * _smooth_noise(rng, size, 8)[..., None]
            img = np.clip(skin[None, None, :] + tex + rng.normal(0, 0.015, (size, size, 3)), 0, 1)
            dx = _DX[int(rng.integers(len(_DX)))]
            r = rng.uniform(12, 34) if dx != "nevus" else rng.uniform(8, 24)
            cy, cx = rng.uniform(0.35, 0.65) * size, rng.uniform(0.35, 0.65) * size
            lesion = _blob(yy, xx, cy, cx, r, rng, irregular=0.25 if dx == "melanoma" else 0.08)
            pigment = np.array([0.35, 0.22, 0.15]) * rng.uniform(0.6, 1.2)
            vari = 0.12 * _smooth_noise(rng, size, 8)[..., None] if dx == "melanoma" else 0.0
            img = np.where(lesion[..., None], np.clip(pigment + vari, 0, 1), img)
            for _ in range(rng.integers(0, 6)):  # hair strands
                x0, slope = rng.uniform(0, size), rng.uniform(-1.5, 1.5)
                line = np.abs(xx - (x0 + slope * (yy - size / 2))) < 0.8
                img = np.where(line[..., None], 0.15, img)
            iid = f"{pid}-l{k:02d}"
            items.append(ImageItem(image=img.astype(np.float32), image_id=iid, patient_id=pid, modality="dermoscopy",
                                   source=f"phantom-derm(seed={seed})/{iid}",
                                   meta={"lesion_id": iid, "site": _SITES[int(rng.integers(len(_SITES)))]}))
            masks[iid] = SealedMask(lesion, source=f"phantom-derm(seed={seed})/{iid}/mask", labels={"dx": dx})
    return items, EvalMasks(masks, items)
