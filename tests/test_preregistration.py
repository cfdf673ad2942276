"""The committed lock pre-registers minimum effects and data protocol: a negligible gain is never a pass."""
from __future__ import annotations

import copy

import pytest

from conftest import REPO_ROOT
from covtoken.evidence import entry_tier
from covtoken.lock import LockError, ThresholdLock, carry_thresholds, gate_template, judge, lock_entry

LOCK = ThresholdLock.load(REPO_ROOT / "configs" / "thresholds.lock.json")
GAIN_WORDS = ("beats", "noninferior", "gain", "misses_fewer")
#: gates whose entries existed before issue 10 and were superseded by it (later gates are locked fresh)
BEFORE_ISSUE_10 = {"G1", "G2", "G3", "G4", "G5", "G6", "G7"}
#: the entries those gates had then (``embedded-trained``, issue 12, is locked fresh)
ENTRIES_BEFORE_ISSUE_10 = {"embedded", "real", "sample"}


def entries():
    for gid in LOCK.gate_ids():
        for name in sorted(LOCK.doc["gates"][gid]["entries"]):
            yield LOCK.entry(f"{gid}/{name}")


@pytest.mark.parametrize("entry", [e for e in entries() if entry_tier(e.key) in ("real", "sample")], ids=lambda e: e.key)
def test_every_comparison_of_real_and_sample_entries_has_a_minimum_effect(entry):
    comparisons = [c for c in entry.criteria if any(w in c["id"] for w in GAIN_WORDS)
                   or c["metric"].startswith("delta_") or "gain" in c["metric"]]
    assert comparisons or entry.gate_id == "G4", f"{entry.key}: no comparison found"  # G4 compares with bands only
    for c in comparisons:
        if c["id"] == "C2_difference_size":  # G3's C2 is itself the effect size (point >= 0.07)
            continue
        assert c.get("min_effect", 0) > 0, (entry.key, c["id"])
        assert len(c["min_effect_reason"]) > 40
    assert entry.parameters["min_patients_per_judged_split"] == (20 if entry_tier(entry.key) == "real" else 10)
    assert entry.parameters["near_duplicate"] == {"method": "phash", "hash_size": 8, "max_hamming": 6}
    if entry.gate_id in BEFORE_ISSUE_10:
        assert entry.calibration["superseded_because"].startswith("issue 10")


@pytest.mark.parametrize("entry", list(entries()), ids=lambda e: e.key)
def test_every_entry_fixes_the_minimum_patients(entry):
    assert entry.parameters["min_patients_per_judged_split"] == (20 if entry_tier(entry.key) == "real" else 10)


@pytest.mark.parametrize("key", ["G1/real", "G1/sample"])
def test_a_negligible_gain_is_not_a_pass(key):
    """The issue's case: a mid-vs-final gain of 0.003 whose CI excludes 0 decided PASS before minimum effects."""
    metrics = {"mid_auroc": {"value": 0.85, "ci": [0.8, 0.9], "ci_method": "m", "n": {"patients": 30}},
               "delta_mid_final_auroc": {"value": 0.003, "ci": [0.0012, 0.005], "ci_method": "m",
                                         "n": {"patients": 30}}}
    decision, judged, reason = judge(LOCK.entry(key).criteria, metrics)
    assert decision != "pass" and judged[1]["outcome"] == "not_met"
    assert "needs > 0.020" in reason
    stripped = [{k: v for k, v in c.items() if k not in ("min_effect", "min_effect_reason", "effect_kind")}
                for c in LOCK.entry(key).criteria]
    assert judge(stripped, metrics)[0] == "pass"  # the minimum effect is what decides here


def test_g1_mid_layer_rule_is_structured_in_real_and_sample():
    from covtoken.eval.localisation import mid_layer_blocks

    for key in ("G1/real", "G1/sample"):
        assert mid_layer_blocks(LOCK.entry(key).parameters["mid_blocks"], 6) == [1, 2, 3, 4]


def test_g7_held_out_family_and_degenerate_proxy_rule():
    for key in ("G7/real", "G7/embedded"):
        e = LOCK.entry(key)
        assert e.parameters["held_out_family"] == "geometry"
        (v1,) = [c for c in e.criteria if c.get("role") == "validity"]
        assert (v1["metric"], v1["comparator"], v1["threshold"], v1["judged_on"]) == ("baseline_auroc", "<", 0.99,
                                                                                      "point")


def test_superseded_entries_keep_their_history():
    for e in (e for e in entries() if e.gate_id in BEFORE_ISSUE_10 and e.name in ENTRIES_BEFORE_ISSUE_10):
        raw = LOCK.doc["gates"][e.gate_id]["entries"][e.name]
        assert raw.get("supersedes"), e.key
        assert e.digest not in raw["supersedes"]


def test_templates_have_a_short_title():
    for gid in LOCK.gate_ids():
        title = gate_template(gid, root=REPO_ROOT / "configs" / "gates")["title"]
        assert 10 < len(title) <= 90 and "\n" not in title


def test_carrying_thresholds_keeps_locked_values_and_refuses_new_calibrated_criteria():
    crit = [{"id": "C1", "metric": "auc", "comparator": ">=", "threshold": 0.5, "judged_on": "point",
             "calibration_rule": "floor_ci_low"}]
    doc = lock_entry({}, gate_id="G9", claim="A claim long enough to be one.", name="embedded",
                     criteria=[{**crit[0], "threshold": 0.76}], parameters={}, calibration={})
    locked = ThresholdLock(doc).entry("G9/embedded")
    assert carry_thresholds(copy.deepcopy(crit), locked)[0]["threshold"] == 0.76
    with pytest.raises(LockError, match="needs calibration"):
        carry_thresholds([{**crit[0], "id": "C_new"}], locked)
    with pytest.raises(LockError, match="needs calibration"):
        carry_thresholds([{**crit[0], "comparator": ">"}], locked)
