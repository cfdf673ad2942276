"""G5 end to end: the embedded run writes a record the audit accepts, and the gate fails when its claim is false.

The claim is false when the router does not find small lesions (a router that prefers background tokens) or when
the keep fraction leaves too little saving; both are judged under the locked criteria and must come out ``fail``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT
from covtoken.arch.flops import block_macs, keep_count
from covtoken.arch.routed_depth import GaussianRouter, RoutedDepth, top_keep
from covtoken.arch.routing_eval import routing_metrics
from covtoken.audit import audit_folder
from covtoken.backbone.frozen import load_backbone
from covtoken.lock import ThresholdLock, judge
from covtoken.subspace import GaussianDensity
from g1_helpers import copy_lock, run_job_smoke


@pytest.fixture(scope="module")
def g5_run(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("g5")
    lock = copy_lock(base / "lock")
    return run_job_smoke("g5_routed_depth", base / "results", base / "work", lock), lock


def test_smoke_record_passes_the_audit_and_is_consistent(g5_run):
    record, lock = g5_run
    rep = audit_folder(record.parent, lock_path=lock, allow_unproven_prereg=True, allow_dirty=True)
    assert rep.ok, rep.all_problems()
    rec = json.loads(record.read_text())
    entry = ThresholdLock.load(lock).entry("G5/embedded")
    assert rec["decision"] == judge(entry.criteria, rec["metrics"])[0]
    P, m = entry.parameters, rec["metrics"]
    # the MACs ratio recomputed by hand for the tiny ViT (64 patches + CLS, d = 64, 6 blocks, 16x16 RGB patches)
    d, n, k = 64, 65, keep_count(64, P["keep_fraction"]) + 1
    embed = 64 * 3 * 16 * 16 * d
    l0 = P["exit_after"] + 1
    full = embed + 6 * block_macs(n, d)
    routed = embed + l0 * block_macs(n, d) + (6 - l0) * block_macs(k, d) + 64 * d * d
    assert m["flops_ratio"]["value"] == pytest.approx(full / routed, rel=1e-12)
    assert m["macs_count_mismatch"]["value"] == 0.0
    arts = {Path(a["path"]).name: record.parent / a["path"] for a in rec["artefacts"]}
    curve = json.loads(arts["curve.json"].read_text())
    assert {p["exit_after"] for p in curve["points"]} == set(range(5))
    op = [p for p in curve["points"] if p["exit_after"] == P["exit_after"] and p["keep_fraction"] == P["keep_fraction"]]
    assert len(op) == 1 and op[0]["flops_ratio"] == pytest.approx(m["flops_ratio"]["value"])
    if m["router_agreement"]["value"] == 1.0:  # same keep sets from the bank and from the routed forward
        assert op[0]["small_lesion_sensitivity"] == pytest.approx(m["small_lesion_sensitivity"]["value"])
    # more tokens kept at the same exit block never loses a lesion
    at_k = sorted((p for p in curve["points"] if p["exit_after"] == P["exit_after"]), key=lambda p: p["keep_fraction"])
    sens = [p["small_lesion_sensitivity"] for p in at_k]
    assert sens == sorted(sens) and [p["flops_ratio"] for p in at_k] == sorted((p["flops_ratio"] for p in at_k),
                                                                                reverse=True)
    macs = json.loads(arts["macs.json"].read_text())
    assert macs["routed_counted"] == macs["routed_analytic"] and macs["timing"]["speedup"] > 0
    assert m["small_lesion_sensitivity"]["n"]["patients"] == rec["provenance"]["dataset"]["n_patients"]["test"]


def constructed(rd: RoutedDepth, *, router: str, seed: int = 0):
    """20 patients x 4 images of 64 tokens; each image has 1-2 small lesions on 1-2 tokens."""
    rng = np.random.default_rng(seed)
    n_img, n = 80, rd.n_patches
    patients = np.repeat([f"p{i:02d}" for i in range(20)], 4)
    lesions, areas = [], []
    scores = rng.normal(size=(n_img, n))
    for i in range(n_img):
        per = [rng.choice(n, size=rng.integers(1, 3), replace=False) for _ in range(rng.integers(1, 3))]
        lesions.append(per)
        areas.append([float(rng.uniform(0.1, 1.0)) for _ in per])
        for toks in per:
            scores[i, toks] += 4.0 if router == "membership" else -4.0
    kept = top_keep(scores, rd.n_keep)
    counts = rng.multinomial(20, np.ones(20) / 20, size=500)
    macs = {"batch": 2, "full_analytic": rd.full_macs(2), "routed_analytic": rd.routed_macs(2),
            "full_counted": rd.full_macs(2), "routed_counted": rd.routed_macs(2)}
    return routing_metrics(rd=rd, kept=kept, bank_kept=kept, scores={rd.exit_after: scores}, lesions=lesions,
                           areas=areas, patients=patients, patient_order=sorted(set(patients)), counts=counts,
                           macs=macs, timing={"speedup": 1.0, "batch": 2, "repeats": 1},
                           P={"small_lesion_max_area_tokens": 1.0, "curve_keep_fractions": [0.3], "ci_level": 0.95},
                           device="cpu")


@pytest.mark.parametrize("entry_name", ["embedded", "real"])
def test_g5_fails_when_the_claim_is_false(entry_name):
    lock = ThresholdLock.load(REPO_ROOT / "configs" / "thresholds.lock.json")
    entry = lock.entry(f"G5/{entry_name}")
    model = load_backbone("tiny-vit").model
    router = GaussianRouter(GaussianDensity().fit(np.random.default_rng(0).standard_normal((300, 64))))
    op = RoutedDepth(model, exit_after=1, keep=0.3, router=router)
    good = constructed(op, router="membership")
    decision, crit, _ = judge(entry.criteria, good.metrics)
    assert decision == "pass", crit
    blind = constructed(op, router="background")
    decision, crit, _ = judge(entry.criteria, blind.metrics)
    out = {c["id"]: c["outcome"] for c in crit}
    assert decision == "fail" and out["C2_small_lesion_sensitivity"] == "not_met" and out["C3_beats_random"] == "not_met"
    wide = constructed(RoutedDepth(model, exit_after=1, keep=0.6, router=router), router="membership")
    decision, crit, _ = judge(entry.criteria, wide.metrics)
    assert decision == "fail" and {c["id"]: c["outcome"] for c in crit}["C1_flops"] == "not_met"
    assert wide.metrics["small_lesion_sensitivity"]["value"] >= good.metrics["small_lesion_sensitivity"]["value"]
