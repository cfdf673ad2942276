"""The record writer and the threshold lock: strict JSON, atomic no-overwrite, digests, decision rule."""
from __future__ import annotations

import copy
import json
import math

import pytest

from covtoken.lock import (LockError, ThresholdLock, criterion_outcome, judge, lock_entry, propose_thresholds,
                           entry_digest)
from covtoken.record import (RecordError, dumps_strict, loads_strict, new_run_id, validate_record,
                             write_json_atomic)

CRITERIA = [
    {"id": "C1", "metric": "auc", "comparator": ">=", "threshold": 0.8, "judged_on": "point", "calibration_rule": "floor_ci_low"},
    {"id": "C2", "metric": "delta", "comparator": ">", "threshold": 0.0, "judged_on": "ci_low", "calibration_rule": "fixed"},
]


def metrics(auc: float | None, delta: float, lo: float, hi: float) -> dict:
    return {"auc": {"value": auc, "ci": [0.7, 0.9], "ci_method": "m", "n": {"patients": 3}},
            "delta": {"value": delta, "ci": [lo, hi], "ci_method": "m", "n": {"patients": 3}}}


@pytest.mark.parametrize("auc,delta,lo,hi,decision,outcomes", [
    (0.85, 0.10, 0.05, 0.15, "pass", ["met", "met"]),
    (0.75, 0.10, 0.05, 0.15, "fail", ["not_met", "met"]),
    (0.85, 0.05, -0.01, 0.10, "inconclusive", ["met", "not_established"]),
    (0.85, -0.05, -0.10, 0.01, "fail", ["met", "not_met"]),
    (None, 0.10, 0.05, 0.15, "inconclusive", ["not_computable", "met"]),
    (0.80, 0.10, 0.0, 0.15, "inconclusive", ["met", "not_established"]),  # >= at the bound; > 0 not at 0
])
def test_decision_rule(auc, delta, lo, hi, decision, outcomes):
    got, judged, reason = judge(CRITERIA, metrics(auc, delta, lo, hi))
    assert got == decision
    assert [c["outcome"] for c in judged] == outcomes
    assert judged[1]["observed"] == lo and judged[1]["point"] == delta
    assert "C1" in reason and "C2" in reason


def test_missing_metric_is_not_computable_never_met():
    c = criterion_outcome(CRITERIA[0], {})
    assert c["outcome"] == "not_computable" and c["observed"] is None


def _doc() -> dict:
    return lock_entry({}, gate_id="G9", claim="A claim long enough to be one.", name="embedded",
                      criteria=copy.deepcopy(CRITERIA), parameters={"n_boot": 10}, calibration={"split": "cal"})


def test_lock_roundtrip_and_tamper_detection(tmp_path):
    doc = _doc()
    lock = ThresholdLock(doc)
    e = lock.entry("G9/embedded")
    assert e.criteria[0]["threshold"] == 0.8 and e.digest.startswith("sha256:")
    # Editing one threshold without re-locking: the entry digest no longer matches, naming the field.
    bad = copy.deepcopy(doc)
    bad["gates"]["G9"]["entries"]["embedded"]["criteria"][0]["threshold"] = 0.5
    with pytest.raises(LockError, match=r"gates/G9/entries/embedded/digest"):
        ThresholdLock(bad)
    # Recomputing the entry digest but not the file digest is caught by the file digest.
    entry = bad["gates"]["G9"]["entries"]["embedded"]
    entry["digest"] = entry_digest("G9", bad["gates"]["G9"]["claim"], "embedded", entry)
    with pytest.raises(LockError, match=r"field digest"):
        ThresholdLock(bad)
    # Changing the claim invalidates the entry too.
    bad2 = copy.deepcopy(doc)
    bad2["gates"]["G9"]["claim"] = "Another claim, also long enough."
    with pytest.raises(LockError, match="digest"):
        ThresholdLock(bad2)


def test_lock_refuses_to_replace_without_supersede():
    doc = _doc()
    with pytest.raises(LockError, match="already locked"):
        lock_entry(doc, gate_id="G9", claim="A claim long enough to be one.", name="embedded",
                   criteria=copy.deepcopy(CRITERIA), parameters={}, calibration={})
    new = lock_entry(doc, gate_id="G9", claim="A claim long enough to be one.", name="embedded",
                     criteria=copy.deepcopy(CRITERIA), parameters={}, calibration={}, supersede=True)
    assert new["gates"]["G9"]["entries"]["embedded"]["supersedes"] == [doc["gates"]["G9"]["entries"]["embedded"]["digest"]]


def test_lock_rejects_bad_criteria():
    bad = copy.deepcopy(CRITERIA)
    bad[0]["comparator"] = "=="
    with pytest.raises(LockError, match="comparator"):
        lock_entry({}, gate_id="G9", claim="A claim long enough to be one.", name="x", criteria=bad,
                   parameters={}, calibration={})
    bad = copy.deepcopy(CRITERIA)
    bad[0]["threshold"] = math.nan
    with pytest.raises(LockError, match="threshold"):
        lock_entry({}, gate_id="G9", claim="A claim long enough to be one.", name="x", criteria=bad,
                   parameters={}, calibration={})


def test_propose_thresholds_uses_calibration_ci_and_keeps_fixed():
    runs = [metrics(0.9, 0.1, 0.05, 0.2), metrics(0.9, 0.1, 0.05, 0.2)]
    runs[0]["auc"]["ci"] = [0.8345, 0.95]
    runs[1]["auc"]["ci"] = [0.8123, 0.95]
    out = propose_thresholds(CRITERIA, runs)
    assert out[0]["threshold"] == 0.81  # floor of the smallest lower bound
    assert out[1]["threshold"] == 0.0
    with pytest.raises(LockError, match="no calibration"):
        propose_thresholds(CRITERIA, [])


def test_strict_json_rejects_nan_and_duplicates(tmp_path):
    with pytest.raises(ValueError):
        dumps_strict({"x": float("nan")})
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "a.json", {"x": float("inf")})
    assert not (tmp_path / "a.json").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(RecordError, match="not strict JSON"):
        loads_strict('{"x": NaN}', source="f.json")
    with pytest.raises(RecordError, match="duplicate key"):
        loads_strict('{"x": 1, "x": 2}', source="f.json")


def test_atomic_write_never_overwrites(tmp_path):
    p = write_json_atomic(tmp_path / "r.json", {"a": 1})
    with pytest.raises(FileExistsError):
        write_json_atomic(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["r.json"]  # no temp file left behind


def test_run_ids_are_unique_and_valid():
    ids = {new_run_id("G1") for _ in range(50)}
    assert len(ids) == 50 and all(i.startswith("g1-") for i in ids)


def test_schema_rejects_malformed_record():
    with pytest.raises(RecordError, match="<root>"):
        validate_record({"record_type": "covtoken.gate_record"}, source="x.json")


GAIN = {"id": "C2", "metric": "delta", "comparator": ">", "threshold": 0.0, "judged_on": "ci_low",
        "calibration_rule": "fixed", "min_effect": 0.02,
        "min_effect_reason": "AUROC differences below 0.02 are not worth reporting (reader-study convention)"}


@pytest.mark.parametrize("delta,lo,hi,outcome", [
    (0.003, 0.0012, 0.005, "not_met"),      # a negligible gain whose CI excludes 0 is not a pass
    (0.0006, -0.001, 0.002, "not_met"),
    (0.05, 0.01, 0.09, "not_established"),   # worth reporting, not established above the bar
    (0.05, 0.021, 0.09, "met"),
])
def test_minimum_effect_moves_the_bar(delta, lo, hi, outcome):
    decision, (_, c), reason = judge([CRITERIA[0], GAIN], metrics(0.85, delta, lo, hi))
    assert c["outcome"] == outcome and c["bar"] == pytest.approx(0.02) and c["min_effect"] == 0.02
    assert decision == {"met": "pass", "not_met": "fail", "not_established": "inconclusive"}[outcome]
    assert "needs > 0.020 (null 0.000 + minimum effect 0.020)" in reason
    # without the minimum effect the same 0.003 gain passed: the field is what changes the decision
    assert judge([CRITERIA[0], CRITERIA[1]], metrics(0.85, 0.003, 0.0012, 0.005))[0] == "pass"


def test_decision_reason_reads_as_observed_and_needed():
    nonin = {"id": "C1_recall_noninferior", "metric": "delta", "comparator": ">", "threshold": -0.1,
             "judged_on": "ci_low"}
    _, _, reason = judge([nonin], metrics(0.85, -0.2, -0.3158, 0.01))
    assert reason == "C1_recall_noninferior: ci_low -0.316; needs > -0.100: not met"
    _, _, reason = judge([CRITERIA[1]], metrics(0.85, 0.05, -0.0003, 0.1))
    assert reason == "C2: ci_low -0.0003; needs > 0.000: not established (point 0.050 meets it)"
    _, _, reason = judge([CRITERIA[0]], {})
    assert reason == "C1: point n/a; needs >= 0.800: not computable"


def test_validity_criterion_makes_the_decision_inconclusive():
    validity = {"id": "V1", "metric": "auc", "comparator": "<", "threshold": 0.99, "judged_on": "point",
                "role": "validity"}
    fail_claim = dict(CRITERIA[1])
    m = metrics(0.995, -0.05, -0.10, 0.01)
    decision, judged, reason = judge([fail_claim, validity], m)
    assert decision == "inconclusive" and judged[1]["outcome"] == "not_met"
    assert reason.startswith("validity V1: point 0.995; needs < 0.990: not met: the measurement cannot decide")
    assert judge([fail_claim, validity], metrics(0.9, -0.05, -0.10, 0.01))[0] == "fail"  # valid proxy: fail stands


def test_lock_checks_effect_fields():
    base = dict(GAIN)
    for bad, match in [({"min_effect": -0.01}, "min_effect"), ({"min_effect_reason": ""}, "min_effect_reason"),
                       ({"effect_kind": "other"}, "effect_kind"), ({"role": "x"}, "role"),
                       ({"effect_kind": "non_inferiority"}, "margin")]:
        with pytest.raises(LockError, match=match):
            lock_entry({}, gate_id="G9", claim="A claim long enough to be one.", name="real",
                       criteria=[{**base, **bad}], parameters={}, calibration={})
    ok = {**base, "threshold": -0.1, "min_effect": 0.1, "effect_kind": "non_inferiority"}
    doc = lock_entry({}, gate_id="G9", claim="A claim long enough to be one.", name="real", criteria=[ok],
                     parameters={}, calibration={})
    assert ThresholdLock(doc).entry("G9/real").criteria[0]["effect_kind"] == "non_inferiority"
