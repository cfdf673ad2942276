"""SUMMARY.md / NEGATIVE_RESULT.md separate the tiers, show the binding criterion and the best baseline, group reruns."""
from __future__ import annotations

from types import SimpleNamespace

from covtoken.lock import judge
from covtoken.summary import binding_criterion, render_negative, render_summary

G1_CRITERIA = [
    {"id": "C1_mid_level", "metric": "mid_auroc", "comparator": ">=", "threshold": 0.8, "judged_on": "point"},
    {"id": "C2_mid_beats_final", "metric": "delta_mid_final_auroc", "comparator": ">", "threshold": 0.0,
     "judged_on": "ci_low", "min_effect": 0.02, "min_effect_reason": "AUROC gains below 0.02 are negligible"},
]


def record(run_id: str, *, tier: str, entry: str, mid: float, delta: tuple[float, float, float],
           dataset: str = "busi", revision: str = "sha256:aa") -> dict:
    def m(v, ci=None):
        return {"value": v, "ci": ci, "ci_method": "m" if ci else None, "n": {"patients": 20}}

    metrics = {"mid_auroc": m(mid, [mid - 0.05, mid + 0.05]), "final_auroc": m(0.7),
               "intensity_baseline_auroc": m(0.93), "delta_mid_final_auroc": m(delta[0], [delta[1], delta[2]])}
    decision, criteria, reason = judge(G1_CRITERIA, metrics)
    return {"run_id": run_id, "gate_id": "G1", "claim": "A long claim: mid-layer subspaces localise lesions. " * 4,
            "decision": decision, "decision_reason": reason, "evidence": tier, "criteria": criteria,
            "metrics": metrics, "lock": {"entry": entry}, "notes": ["a note"],
            "provenance": {"dataset": {"id": dataset, "revision": revision, "n_patients": {"train": 30, "test": 20}},
                           "backbone": {"name": "tiny-vit"}, "code": {"dirty": False}}}


def report(*records: dict):
    return SimpleNamespace(records=[SimpleNamespace(record=r, prereg=("pre-registered", "")) for r in records])


def test_tiers_are_separated_and_marked_in_every_row():
    a = record("g1-20260101t000000-aaaaaa", tier="flow-check", entry="G1/sample", mid=0.85, delta=(0.003, 0.001, 0.005))
    b = record("g1-20260101t000001-bbbbbb", tier="real", entry="G1/real", mid=0.9, delta=(0.06, 0.03, 0.09),
               dataset="lidc-idri")
    text = render_summary(report(a, b))
    real_part, rest = text.split("## Sample runs")
    assert "g1-20260101t000001-bbbbbb" in real_part and "g1-20260101t000000-aaaaaa" not in real_part
    flow_rows = [ln for ln in rest.split("## Flow checks")[1].splitlines() if ln.startswith("| G1")]
    assert len(flow_rows) == 1 and "flow-check (not evidence)" in flow_rows[0]
    assert "Only `real` records are evidence" in text
    only_flow = render_summary(report(a))
    assert "No real-tier record yet" in only_flow


def test_binding_criterion_and_best_baseline_are_shown():
    a = record("g1-20260101t000000-aaaaaa", tier="flow-check", entry="G1/sample", mid=0.85, delta=(0.003, 0.001, 0.005))
    assert a["decision"] == "fail" and binding_criterion(a)["id"] == "C2_mid_beats_final"
    row = [ln for ln in render_summary(report(a)).splitlines() if ln.startswith("| G1")][0]
    assert "C2_mid_beats_final: ci_low 0.001; needs > 0.020 incl. min. effect: not met" in row
    assert "0.850 vs intensity_baseline_auroc 0.930 (**baseline better**)" in row
    assert "Mid-layer label-free subspace" in row and "A long claim" not in row  # title, not the full claim
    ok = record("g1-20260101t000002-cccccc", tier="real", entry="G1/real", mid=0.95, delta=(0.2, 0.15, 0.25))
    assert ok["decision"] == "pass"
    # a pass: the criterion closest to its bar binds (C1: 0.95 - 0.80 = 0.15; C2: 0.15 - 0.02 = 0.13)
    assert binding_criterion(ok)["id"] == "C2_mid_beats_final"
    ok2 = record("g1-20260101t000003-dddddd", tier="real", entry="G1/real", mid=0.81, delta=(0.2, 0.15, 0.25))
    assert binding_criterion(ok2)["id"] == "C1_mid_level"


def test_reruns_of_one_gate_entry_and_dataset_share_a_row():
    runs = [record(f"g1-20260101t00000{i}-aaaaa{i}", tier="flow-check", entry="G1/sample", mid=0.85,
                   delta=(0.1, 0.05 * i - 0.04, 0.2)) for i in range(3)]
    other = record("g1-20260101t000009-ffffff", tier="flow-check", entry="G1/sample", mid=0.85,
                   delta=(0.1, 0.05, 0.2), revision="sha256:bb")
    rows = [ln for ln in render_summary(report(*runs, other)).splitlines() if ln.startswith("| G1")]
    assert len(rows) == 2
    assert "3 runs (latest shown)" in rows[0] and all(r["run_id"] in rows[0] for r in runs)


def test_negative_result_lists_only_real_failures_as_falsified():
    flow = record("g1-20260101t000000-aaaaaa", tier="flow-check", entry="G1/sample", mid=0.85,
                  delta=(0.003, 0.001, 0.005))
    text = render_negative(report(flow))
    falsified = text.split("## Falsified claims (tier `real`)")[1].split("##")[0]
    assert "None." in falsified and "g1-20260101t000000-aaaaaa" not in falsified
    assert "## Failed flow checks" in text and "Claim tested (flow-check (not evidence))" in text
    real = record("g1-20260101t000001-bbbbbb", tier="real", entry="G1/real", mid=0.85, delta=(0.003, 0.001, 0.005))
    text = render_negative(report(flow, real))
    assert "Falsified claim: A long claim" in text.split("## Failed sample runs")[0]
