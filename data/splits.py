"""Patient-level splits (never image- or slice-level) and the validator that proves it.

:func:`split_patients` assigns whole patients to splits deterministically from a seed;
:func:`validate_splits` fails when a patient (or a lesion) appears in two splits; :class:`SplitManifest`
is what a gate record stores (seed, fractions, membership and its digest).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .layout import ImageItem

__all__ = ["split_patients", "validate_splits", "SplitManifest", "SplitLeakError", "patient_digests"]


class SplitLeakError(ValueError):
    """A patient or lesion crosses two splits."""


def split_patients(patient_ids: Iterable[str], *, fractions: Mapping[str, float], seed: int,
                   strata: Mapping[str, str] | None = None) -> dict[str, frozenset[str]]:
    """Assign every patient to exactly one split.

    Args:
        patient_ids: patient id of every image (repeats are fine).
        fractions: split name -> fraction; must sum to 1 (order is kept: earlier splits get rounding first).
        seed: permutation seed.
        strata: optional patient -> stratum label; each stratum is split with the same fractions.

    Returns:
        split name -> frozenset of patient ids. Every split with a positive fraction gets at least one patient.
    """
    pids = sorted(set(patient_ids))
    if not pids:
        raise ValueError("no patients to split")
    total = sum(fractions.values())
    if any(f < 0 for f in fractions.values()) or abs(total - 1.0) > 1e-9:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {dict(fractions)}")
    names = list(fractions)
    needed = sum(1 for f in fractions.values() if f > 0)
    if len(pids) < needed:
        raise ValueError(f"{len(pids)} patient(s) cannot fill {needed} non-empty splits")
    groups: dict[str, list[str]] = {}
    for p in pids:
        groups.setdefault(strata[p] if strata else "", []).append(p)
    rng = np.random.default_rng(seed)
    out: dict[str, set[str]] = {n: set() for n in names}
    for key in sorted(groups):
        members = list(groups[key])
        rng.shuffle(members)
        cuts = np.floor(np.cumsum([fractions[n] for n in names]) * len(members) + 0.5).astype(int)
        start = 0
        for n, stop in zip(names, cuts):
            out[n].update(members[start:stop])
            start = stop
    # Guarantee non-empty splits: move one patient from the largest split where needed.
    for n in names:
        if fractions[n] > 0 and not out[n]:
            donor = max(names, key=lambda m: len(out[m]))
            moved = sorted(out[donor])[0]
            out[donor].discard(moved)
            out[n].add(moved)
    return {n: frozenset(v) for n, v in out.items()}


def validate_splits(splits: Mapping[str, Iterable[str]], items: Sequence[ImageItem] | None = None,
                    lesion_ids: Mapping[str, str] | None = None) -> None:
    """Fail when a patient, or a lesion, is in two splits.

    Args:
        splits: split name -> patient ids.
        items: optional images; every item's patient must be in exactly one split.
        lesion_ids: optional image id -> lesion id; a lesion's images must all be in one split.

    Raises:
        SplitLeakError: naming the id and both splits.
    """
    owner: dict[str, str] = {}
    for name, members in splits.items():
        for p in members:
            if p in owner:
                raise SplitLeakError(f"patient {p!r} is in split {owner[p]!r} and in split {name!r}")
            owner[p] = name
    if items is not None:
        for it in items:
            if it.patient_id not in owner:
                raise SplitLeakError(f"{it.source or it.image_id}: patient {it.patient_id!r} is in no split")
        if lesion_ids:
            lesion_split: dict[str, str] = {}
            for it in items:
                lid = lesion_ids.get(it.image_id)
                if lid is None:
                    continue
                split = owner[it.patient_id]
                if lesion_split.setdefault(lid, split) != split:
                    raise SplitLeakError(f"lesion {lid!r} is in split {lesion_split[lid]!r} and in split {split!r}")


def patient_digests(source: Mapping[str, Any], membership: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    """Per split, the sorted digests of its patients' identities, so two records can be checked for shared patients.

    A patient's identity is the dataset id and the patient id; for a generated dataset (revision
    ``generator-seed-<n>``) also the revision, since the same id names a different synthetic patient under another
    seed. Each digest is the first 16 hex digits of sha256 over that identity.

    Args:
        source: the dataset's provenance (``id``, ``revision``).
        membership: split name -> patient ids.
    """
    rev = str(source.get("revision") or "")
    scope = f"{source.get('id')}|{rev if rev.startswith('generator-seed-') else ''}|"
    return {name: sorted(hashlib.sha256((scope + str(p)).encode()).hexdigest()[:16] for p in members)
            for name, members in membership.items()}


@dataclass(frozen=True)
class SplitManifest:
    """Seed, fractions and membership of a split, with a digest of the membership."""

    seed: int
    fractions: Mapping[str, float]
    membership: Mapping[str, frozenset[str]]

    def to_dict(self) -> dict:
        members = {k: sorted(v) for k, v in self.membership.items()}
        digest = hashlib.sha256(json.dumps(members, sort_keys=True).encode()).hexdigest()
        return {"unit": "patient", "seed": self.seed, "fractions": dict(self.fractions),
                "n_patients": {k: len(v) for k, v in members.items()}, "membership": members,
                "membership_sha256": digest}

    def dataset_provenance(self, source: Mapping[str, Any], *, roles: Mapping[str, Any], calibration: bool,
                           **extra: Any) -> dict:
        """The ``provenance.dataset`` block of a gate record: the source's id/revision plus this split.

        Args:
            source: the dataset's own provenance (``LoadedDataset.provenance``).
            roles: what each split is for, e.g. ``{"fit": "train", "select": "val", "judge": "test"}``.
            calibration: a calibration run (its patients come from the calibration seed) or an evaluation run.
            extra: further gate-specific fields.
        """
        d = self.to_dict()
        return {**source, "splits": {"unit": "patient", "membership_sha256": d["membership_sha256"], **roles,
                                     "fractions": dict(self.fractions),
                                     "role": "calibration" if calibration else "evaluation",
                                     "patient_digests": patient_digests(source, self.membership)},
                "n_patients": d["n_patients"], "split_seed": self.seed, **extra}
