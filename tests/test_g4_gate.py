"""G4 end to end: the embedded run writes a record the audit accepts, and the gate fails when its claim is false.

The claim is false for a certificate that is not exact: heavy score ties make it loose (coverage above the band),
and calibrating on slices while testing patients makes it violate the band. Both are judged under the locked
criteria and must come out ``fail``; a valid certificate on the same kind of data must pass.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT
from covtoken.arch.conformal import RetentionData, evaluate_certificate
from covtoken.audit import audit_folder
from covtoken.lock import ThresholdLock, judge
from g1_helpers import copy_lock, run_job_smoke


@pytest.fixture(scope="module")
def g4_run(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("g4")
    lock = copy_lock(base / "lock")
    return run_job_smoke("g4_conformal_retention", base / "results", base / "work", lock), lock


def test_smoke_record_passes_the_audit_and_is_consistent(g4_run):
    record, lock = g4_run
    rep = audit_folder(record.parent, lock_path=lock, allow_unproven_prereg=True, allow_dirty=True)
    assert rep.ok, rep.all_problems()
    rec = json.loads(record.read_text())
    entry = ThresholdLock.load(lock).entry("G4/embedded")
    decision, _, _ = judge(entry.criteria, rec["metrics"])
    assert rec["decision"] == decision and rec["lock"]["entry"] == "G4/embedded"
    P = entry.parameters
    m = rec["metrics"]
    details = json.loads((record.parent / rec["artefacts"][0]["path"]).read_text())
    n, alpha = details["n_cal"], P["alpha"]
    # the record's bands are the theory's, for the calibration patients actually used
    assert details["bands"]["crc"] == pytest.approx([1 - alpha, 1 - alpha + 2 / (n + 1)])
    assert details["bands"]["allkept"] == pytest.approx([1 - alpha, 1 - alpha + 1 / (n + 1)])
    splits = np.array(details["splits"]["crc_coverage"])
    assert splits.size == P["n_splits"] == m["crc_split_mean_coverage"]["n"]["resamples"]
    assert m["crc_split_mean_coverage"]["value"] == pytest.approx(splits.mean())
    assert m["crc_coverage_excess"]["value"] == pytest.approx(splits.mean() - details["bands"]["crc"][1])
    inside = np.mean((splits >= 1 - alpha) & (splits <= details["bands"]["crc"][1]))
    assert m["crc_frac_splits_in_band"]["value"] == pytest.approx(inside)
    # the price: risk control keeps fewer tokens than keeping every lesion token of a patient
    assert m["crc_kept_fraction"]["value"] < m["allkept_kept_fraction"]["value"]
    assert m["crc_test_token_coverage"]["n"]["patients"] == details["n_test"]
    assert rec["provenance"]["dataset"]["splits"]["calibrate"] == "calib"
    assert set(details["flags"].values()) <= {"within band", "loose certificate", "violation"}


def simulate_patients(rng: np.random.Generator, n: int, *, decimals: int | None = None,
                      images: int = 1) -> RetentionData:
    """Patients with 1-6 lesion tokens spread over ``images`` images, and 40 background tokens each."""
    sizes = rng.integers(1, 7, size=n)
    unit = np.repeat(np.arange(n), sizes)
    s = rng.normal(1.0, 1.0, unit.size) + rng.normal(0.0, 0.5, n)[unit]
    if decimals is not None:
        s = np.round(s, decimals)
    group = unit * images + rng.integers(0, images, unit.size)
    bg_unit = np.repeat(np.arange(n), 40)
    bg = rng.normal(-3.0, 1.0, bg_unit.size)
    return RetentionData(s, unit, group, np.concatenate([s, bg]), np.concatenate([unit, bg_unit]), np.arange(n))


def judged(data: RetentionData, entry, **kw) -> tuple[str, dict]:
    n = data.n_units
    counts = np.random.default_rng(0).multinomial(n // 2, np.ones(n // 2) / (n // 2), size=200)
    res = evaluate_certificate(data, cal_units=np.arange(n // 2), test_units=np.arange(n // 2, n), counts=counts,
                               alpha=entry.parameters["alpha"], n_splits=300, seed=1, ci_level=0.95, **kw)
    decision, criteria, _ = judge(entry.criteria, res.metrics)
    return decision, {c["id"]: c["outcome"] for c in criteria}


@pytest.mark.parametrize("entry_name", ["embedded", "real"])
def test_g4_fails_when_the_certificate_is_not_exact(entry_name):
    entry = ThresholdLock.load(REPO_ROOT / "configs" / "thresholds.lock.json").entry(f"G4/{entry_name}")
    valid, outcomes = judged(simulate_patients(np.random.default_rng(1), 300, images=3), entry)
    assert valid == "pass", outcomes
    tied, outcomes = judged(simulate_patients(np.random.default_rng(2), 300, decimals=0), entry)
    assert tied == "fail" and outcomes["C4_allkept_not_loose"] == "not_met", outcomes
    sliced, outcomes = judged(simulate_patients(np.random.default_rng(1), 300, images=3), entry, calibrate_on="group")
    assert sliced == "fail" and outcomes["C3_allkept_no_violation"] == "not_met", outcomes
