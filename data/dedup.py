"""Near-duplicate images grouped into one split unit, with their patients.

Public datasets often hold the same scan twice (re-exports, crops, the same woman imaged twice, frames of one
sweep) under different file names. If such images land in different splits, test "generalisation" is partly
memorisation. Before splitting, :func:`group_near_duplicates` hashes every image with a perceptual hash from the
maintained ``imagehash`` library (pHash: DCT of a 32x32 grey thumbnail, ``hash_size**2`` bits), links every pair
whose Hamming distance is at most ``max_hamming``, and takes connected components over images *and* patients
(union-find): every patient that shares a near-duplicate with another lands in the same split unit.

The grouping reads pixels only, never labels: splits stay bit-identical when labels are permuted. Labels are read
afterwards, only to flag groups whose images carry different labels (label conflicts), which the record reports.
:func:`validate_groups` refuses a split in which a group straddles two splits.

For an eye-free check of false positives, every linked pair also gets the Pearson correlation of its 32x32 grey
thumbnails; the report carries its minimum and quartiles.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from .layout import ImageItem
from .splits import SplitLeakError

__all__ = ["NearDuplicateParams", "NearDuplicateReport", "DEFAULT_NEAR_DUPLICATE", "image_hashes",
           "near_duplicate_pairs", "group_near_duplicates", "validate_groups", "thumbnail_correlation"]

#: The default, pre-registered in the lock entries' ``near_duplicate`` parameter.
DEFAULT_NEAR_DUPLICATE: Mapping[str, Any] = {"method": "phash", "hash_size": 8, "max_hamming": 6}
_METHODS = ("phash",)
_THUMB = 32


@dataclass(frozen=True)
class NearDuplicateParams:
    """How near-duplicates are found: ``method`` (``phash``), ``hash_size`` (bits = hash_size**2), ``max_hamming``."""

    method: str = "phash"
    hash_size: int = 8
    max_hamming: int = 6

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any] | None, *, where: str = "near_duplicate") -> "NearDuplicateParams":
        """Parse a locked ``near_duplicate`` parameter (None = the default); unknown keys and bad values raise."""
        spec = dict(DEFAULT_NEAR_DUPLICATE if spec is None else spec)
        unknown = sorted(set(spec) - {"method", "hash_size", "max_hamming"})
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; valid: method, hash_size, max_hamming")
        p = cls(**{**DEFAULT_NEAR_DUPLICATE, **spec})
        if p.method not in _METHODS:
            raise ValueError(f"{where}: unknown method {p.method!r}; choose one of {list(_METHODS)}")
        if not isinstance(p.hash_size, int) or isinstance(p.hash_size, bool) or not 4 <= p.hash_size <= 32:
            raise ValueError(f"{where}: hash_size must be an integer in [4, 32], got {p.hash_size!r}")
        if (not isinstance(p.max_hamming, int) or isinstance(p.max_hamming, bool)
                or not 0 <= p.max_hamming < p.hash_size ** 2 // 2):
            raise ValueError(f"{where}: max_hamming must be an integer in [0, {p.hash_size ** 2 // 2}), "
                             f"got {p.max_hamming!r}")
        return p

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "hash_size": self.hash_size, "max_hamming": self.max_hamming}


@dataclass(frozen=True)
class NearDuplicateReport:
    """Groups found and what they do to the split units.

    Attributes:
        params: the parameters used.
        groups: image-id groups (connected components of size >= 2), sorted.
        unit_of: patient id -> split-unit id (a patient in no group is its own unit).
        pairs: ``(image_a, image_b, hamming, thumbnail_correlation)`` of every linked pair.
        label_conflicts: indices into ``groups`` of groups whose images carry different labels.
    """

    params: NearDuplicateParams
    groups: list[list[str]]
    unit_of: dict[str, str]
    pairs: list[tuple[str, str, int, float]] = field(default_factory=list)
    label_conflicts: list[int] = field(default_factory=list)

    def provenance(self) -> dict[str, Any]:
        """The ``near_duplicates`` block of a record's dataset provenance."""
        corr = np.array([p[3] for p in self.pairs], dtype=float)
        units = set(self.unit_of.values())
        merged = sum(1 for u in units if list(self.unit_of.values()).count(u) > 1)
        return {
            **self.params.to_dict(),
            "library": "imagehash",
            "n_groups": len(self.groups),
            "n_images_in_groups": sum(len(g) for g in self.groups),
            "n_linked_pairs": len(self.pairs),
            "n_label_conflicts": len(self.label_conflicts),
            "label_conflict_groups": [self.groups[i] for i in self.label_conflicts],
            "n_patients": len(self.unit_of),
            "n_split_units": len(units),
            "n_units_merging_patients": merged,
            "pair_thumbnail_correlation": None if corr.size == 0 else {
                "min": round(float(corr.min()), 4), "q25": round(float(np.quantile(corr, 0.25)), 4),
                "median": round(float(np.median(corr)), 4)},
            "groups": self.groups,
        }


def _grey_uint8(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` or ``(H, W, 3)`` float image -> ``(H, W)`` uint8 with its own min-max (CT in HU, [0, 1]...)."""
    a = np.asarray(image, dtype=np.float64)
    if a.ndim == 3:
        a = a @ np.array([0.299, 0.587, 0.114])
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.round((a - lo) / (hi - lo) * 255.0).astype(np.uint8)


def image_hashes(items: Sequence[ImageItem], *, hash_size: int = 8) -> np.ndarray:
    """Perceptual hashes (``imagehash.phash``) of every item.

    Returns:
        ``(n, hash_size**2)`` bool.
    """
    import imagehash

    out = np.zeros((len(items), hash_size * hash_size), dtype=bool)
    for i, it in enumerate(items):
        out[i] = imagehash.phash(Image.fromarray(_grey_uint8(it.image), mode="L"), hash_size=hash_size).hash.ravel()
    return out


def _thumbnails(items: Sequence[ImageItem]) -> np.ndarray:
    """``(n, 32*32)`` zero-mean unit-norm grey thumbnails (for the correlation of linked pairs)."""
    th = np.stack([np.asarray(Image.fromarray(_grey_uint8(it.image), mode="L").resize(
        (_THUMB, _THUMB), Image.Resampling.BILINEAR), dtype=np.float64).ravel() for it in items])
    th -= th.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(th, axis=1, keepdims=True)
    return th / np.where(norm > 0, norm, 1.0)


def thumbnail_correlation(a: ImageItem, b: ImageItem) -> float:
    """Pearson correlation of two images' 32x32 grey thumbnails."""
    t = _thumbnails([a, b])
    return float(t[0] @ t[1])


def near_duplicate_pairs(hashes: np.ndarray, *, max_hamming: int, chunk: int = 1024) -> list[tuple[int, int, int]]:
    """Every pair ``(i, j, distance)`` with ``i < j`` whose Hamming distance is at most ``max_hamming``.

    Args:
        hashes: ``(n, bits)`` bool.
        max_hamming: inclusive threshold.
        chunk: rows compared at once (memory ``chunk * n`` int).
    """
    h = hashes.astype(np.float32)  # 0/1 dot products are exact in float32 (< 2**24) and use BLAS
    n, bits = h.shape
    ones = h.sum(1)
    out: list[tuple[int, int, int]] = []
    for start in range(0, n, chunk):
        block = h[start:start + chunk]
        # Hamming = bits that differ = |a| + |b| - 2 a.b on 0/1 vectors
        d = np.rint(ones[start:start + chunk, None] + ones[None, :] - 2 * (block @ h.T)).astype(np.int32)
        for r, c in zip(*np.nonzero(d <= max_hamming)):
            i = start + int(r)
            if i < int(c):
                out.append((i, int(c), int(d[r, c])))
    return out


class _UnionFind:
    def __init__(self, keys: Iterable[str]) -> None:
        self.parent = {k: k for k in keys}

    def find(self, k: str) -> str:
        root = k
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[k] != root:
            self.parent[k], k = root, self.parent[k]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def group_near_duplicates(items: Sequence[ImageItem], params: NearDuplicateParams | None = None, *,
                          labels: Mapping[str, Any] | None = None) -> NearDuplicateReport:
    """Group near-duplicate images and merge their patients into split units.

    Args:
        items: the images (pixels and patient ids only are read).
        params: the locked parameters (default :data:`DEFAULT_NEAR_DUPLICATE`).
        labels: optional image id -> label, read only to flag label conflicts (never to group).

    Returns:
        The report; ``unit_of`` maps every patient to its unit id: the patient id itself, or, for patients
        joined by a near-duplicate, their sorted ids joined with ``+``.
    """
    params = params or NearDuplicateParams()
    ids = [it.image_id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError("near-duplicate grouping needs unique image ids")
    pairs = near_duplicate_pairs(image_hashes(items, hash_size=params.hash_size), max_hamming=params.max_hamming)
    img_uf = _UnionFind(ids)
    pat_uf = _UnionFind(it.patient_id for it in items)
    for i, j, _ in pairs:
        img_uf.union(ids[i], ids[j])
        pat_uf.union(items[i].patient_id, items[j].patient_id)
    comps: dict[str, list[str]] = {}
    for k in ids:
        comps.setdefault(img_uf.find(k), []).append(k)
    groups = sorted(sorted(g) for g in comps.values() if len(g) > 1)
    members: dict[str, list[str]] = {}
    for p in pat_uf.parent:
        members.setdefault(pat_uf.find(p), []).append(p)
    unit_of = {p: "+".join(sorted(ms)) for ms in members.values() for p in ms}
    thumbs = _thumbnails([items[k] for k in sorted({x for i, j, _ in pairs for x in (i, j)})]) if pairs else None
    pos = {k: n for n, k in enumerate(sorted({x for i, j, _ in pairs for x in (i, j)}))}
    linked = [(ids[i], ids[j], d, round(float(thumbs[pos[i]] @ thumbs[pos[j]]), 4)) for i, j, d in pairs]
    conflicts: list[int] = []
    if labels is not None:
        for n, g in enumerate(groups):
            if len({str(labels.get(k)) for k in g}) > 1:
                conflicts.append(n)
    return NearDuplicateReport(params, groups, unit_of, linked, conflicts)


def validate_groups(splits: Mapping[str, Iterable[str]], items: Sequence[ImageItem],
                    groups: Sequence[Sequence[str]]) -> None:
    """Refuse a split in which a near-duplicate group has images in two splits.

    Args:
        splits: split name -> patient ids (of ``items``).
        items: the images.
        groups: near-duplicate image-id groups.

    Raises:
        SplitLeakError: naming both images and both splits.
    """
    owner = {p: name for name, ps in splits.items() for p in ps}
    patient = {it.image_id: it.patient_id for it in items}
    for g in groups:
        first = g[0]
        s0 = owner.get(patient[first])
        for k in g[1:]:
            s = owner.get(patient[k])
            if s != s0:
                raise SplitLeakError(f"near-duplicate images {first!r} (split {s0!r}) and {k!r} (split {s!r}) "
                                     "straddle two splits; they must be one split unit")
