"""Calibration patients are never judged patients: the check the audit runs over every record and the lock.

A calibration run stores, per split, digests of its patients' identities (``covtoken.data.splits.patient_digests``)
and ``covtoken thresholds calibrate`` copies them into each input of the proposal, hence into the lock entry. A
judged record stores the same digests for its own splits. :func:`calibration_overlaps` fails when a calibration
input of the entry a record was judged under shares a patient with that record, and fails closed when either side
carries no digests (disjointness that cannot be proven is not assumed).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

__all__ = ["record_patients", "calibration_overlaps"]


def record_patients(record: Mapping[str, Any]) -> set[str] | None:
    """Every patient digest of a judged record (all splits; G2: all modalities); None when it carries none."""
    splits = ((record.get("provenance") or {}).get("dataset") or {}).get("splits") or {}
    groups = [splits.get("patient_digests")] + [m.get("patient_digests")
                                                for m in (splits.get("per_modality") or {}).values()]
    groups = [g for g in groups if isinstance(g, Mapping)]
    if not groups:
        return None
    return {d for g in groups for ds in g.values() for d in ds}


def calibration_overlaps(lock: Any, records: Iterable[tuple[str, Mapping[str, Any]]]) -> list[str]:
    """Problems: a judged record sharing patients with a calibration input of its lock entry, or unprovable.

    Args:
        lock: the :class:`covtoken.lock.ThresholdLock` the records were judged under.
        records: ``(path, record)`` of every judged record.

    Returns:
        one line per problem, naming the record, the entry and the calibration input.
    """
    problems = []
    for path, rec in records:
        key = (rec.get("lock") or {}).get("entry")
        try:
            entry = lock.entry(key)
        except Exception:  # noqa: BLE001 - an unknown entry is the lock check's problem, reported there
            continue
        inputs = list((entry.calibration or {}).get("inputs") or [])
        if not inputs:
            continue  # thresholds fixed a priori: no calibration patients to overlap
        judged = record_patients(rec)
        if judged is None:
            problems.append(f"{path}: field provenance/dataset/splits/patient_digests is missing: its patients cannot "
                            f"be proven disjoint from the calibration runs of {key}")
            continue
        for inp in inputs:
            cal = inp.get("patient_digests")
            if not cal:
                problems.append(f"{path}: calibration input {inp.get('file')} of {key} carries no patient digests: "
                                "disjointness from judged patients is unproven (re-calibrate and supersede the entry)")
                continue
            shared = judged & set(cal)
            if shared:
                problems.append(f"{path}: shares {len(shared)} patient(s) with calibration input {inp.get('file')} "
                                f"(run {inp.get('run_id')}) of {key}: calibration patients were judged")
    return problems
