"""Calibration patients are provably disjoint from judged patients: patient digests in both kinds of run, the
refusals of `thresholds calibrate`, and the audit's check (the end-to-end leaks are in tests/mutations/leaks/)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from covtoken.calibration_check import calibration_overlaps, record_patients
from covtoken.data.splits import SplitManifest, patient_digests
from covtoken.lock import LockError, read_calibration_input
from covtoken.runner import JobConfig, apply_smoke

PROV = {"id": "phantom-ct", "revision": "generator-seed-1000"}


def test_patient_digests_tell_generated_patients_apart_but_not_real_ones():
    a = patient_digests(PROV, {"train": ["ct-p000"]})
    b = patient_digests({**PROV, "revision": "generator-seed-0"}, {"test": ["ct-p000"]})
    assert set(a["train"]).isdisjoint(b["test"])  # the same id under another generator seed: another patient
    real1 = patient_digests({"id": "lidc-idri", "revision": "sha256:1"}, {"train": ["LIDC-0001"]})
    real2 = patient_digests({"id": "lidc-idri", "revision": "sha256:2"}, {"test": ["LIDC-0001"]})
    assert real1["train"] == real2["test"]  # a real patient stays the same patient across dataset revisions
    prov = SplitManifest(0, {"train": 0.5, "test": 0.5}, {"train": frozenset({"p1"}), "test": frozenset({"p2"})}
                         ).dataset_provenance(PROV, roles={"fit": "train"}, calibration=True)
    assert set(prov["splits"]["patient_digests"]) == {"train", "test"}


def _cal(tmp_path, **changes):
    doc = {"kind": "covtoken.calibration_run", "entry": "G1/embedded", "run_id": "g1-cal", "metrics": {},
           "code": {"commit": "0" * 40}, "config": {"calibration": True, "seed": 0},
           "dataset": {**PROV, "splits": {"role": "calibration",
                                          "patient_digests": patient_digests(PROV, {"train": ["p1"]})}}}
    doc.update(changes)
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(doc))
    return path


def test_calibrate_accepts_a_genuine_calibration_run(tmp_path):
    doc, entry = read_calibration_input(_cal(tmp_path), "G1/embedded")
    assert entry["patient_digests"] == patient_digests(PROV, {"train": ["p1"]})["train"]


@pytest.mark.parametrize("changes, field_name", [
    ({"record_type": "covtoken.gate_record"}, "judged gate record"),
    ({"config": {"calibration": False, "seed": 0}}, "config/calibration"),
    ({"dataset": {**PROV, "splits": {"role": "evaluation"}}}, "dataset/splits/role"),
    ({"dataset": {**PROV, "splits": {"role": "calibration"}}}, "patient_digests"),
    ({"dataset": {**PROV, "revision": "generator-seed-0", "splits": {
        "role": "calibration", "patient_digests": {"train": ["ab"]}}}}, "dataset/revision"),
    ({"entry": "G3/embedded"}, "not a calibration run of G1/embedded"),
])
def test_calibrate_refuses(tmp_path, changes, field_name):
    with pytest.raises(LockError, match=field_name):
        read_calibration_input(_cal(tmp_path, **changes), "G1/embedded")


@dataclass
class _Entry:
    calibration: dict = field(default_factory=dict)


class _Lock:
    def __init__(self, inputs):  # noqa: ANN001
        self._e = _Entry({"inputs": inputs})

    def entry(self, key):  # noqa: ANN001, ANN201
        return self._e


def _record(patients):  # noqa: ANN001, ANN202
    return {"lock": {"entry": "G1/embedded"},
            "provenance": {"dataset": {"splits": {"patient_digests": {"test": sorted(patients)}}}}}


def test_overlap_check_fails_on_shared_patients_and_on_missing_digests():
    lock = _Lock([{"file": "cal.json", "run_id": "c", "patient_digests": ["aa", "bb"]}])
    assert calibration_overlaps(lock, [("r.json", _record({"cc"}))]) == []
    shared = calibration_overlaps(lock, [("r.json", _record({"bb", "cc"}))])
    assert len(shared) == 1 and "1 patient(s)" in shared[0] and "cal.json" in shared[0]
    assert "patient_digests is missing" in calibration_overlaps(lock, [("r.json", {"lock": {"entry": "x"}})])[0]
    legacy = _Lock([{"file": "old.json", "run_id": "c"}])
    assert "unproven" in calibration_overlaps(legacy, [("r.json", _record({"cc"}))])[0]
    assert calibration_overlaps(_Lock([]), [("r.json", _record({"cc"}))]) == []  # fixed thresholds: nothing to share
    assert record_patients({"provenance": {"dataset": {"splits": {"per_modality": {
        "us": {"patient_digests": {"test": ["x"]}}}}}}}) == {"x"}


def test_smoke_never_overrides_an_explicit_flag_silently():
    smoke = {"backbone": "tiny-vit", "device": "cpu"}
    cfg = JobConfig(backbone="vit-huge", device="cuda", smoke=True)
    out = apply_smoke(cfg, smoke, explicit={"backbone", "smoke"})
    assert out.backbone == "vit-huge" and out.device == "cpu"  # explicit kept, the rest from --smoke
    assert apply_smoke(JobConfig(backbone="x"), smoke, explicit=set()).backbone == "x"  # no --smoke: untouched
