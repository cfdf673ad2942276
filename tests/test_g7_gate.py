"""G7 end to end: the decision follows the data under the locked criteria (fail where the claim is false, pass where
it holds, inverted scores caught), and the embedded --smoke run writes a record the audit accepts, with loadable
probe checkpoints and a model card."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REPO_ROOT
from covtoken.arch.probe_io import CheckpointError, load_probe, render_model_card
from covtoken.audit import audit_folder
from covtoken.eval.change import BASELINES, build_pairs, evaluate_g7
from covtoken.lock import ThresholdLock, judge
from covtoken.record import read_record
from g1_helpers import copy_lock, load_job
from test_change_pairs import synthetic_split


@pytest.fixture(scope="module")
def criteria():
    return ThresholdLock.load(REPO_ROOT / "configs" / "thresholds.lock.json").entry("G7/embedded").criteria


def split_pairs(seed: int, n: int = 60):
    rng = np.random.default_rng(seed)
    lids = [f"S{seed}L{i:02d}" for i in range(n)]
    lesions, masks = synthetic_split({l: str(rng.choice(["nv", "mel"])) for l in lids},
                                     {l: str(rng.choice(["back", "face"])) for l in lids})
    return build_pairs(lesions, masks, seed=seed)


def scores_for(pairs, rng, probe_signal: float, baseline_signal: float) -> dict[str, np.ndarray]:
    y = pairs.label.astype(float)
    out = {f"{h}/seed{s}": probe_signal * y + rng.normal(size=y.size) for h in ("linear-adam", "mlp-adam")
           for s in range(3)}
    out["ssim_distance"] = baseline_signal * y + rng.normal(size=y.size)
    out["pixel_l2"] = rng.normal(size=y.size)
    out["raw_cosine"] = 0.2 * y + rng.normal(size=y.size)
    return out


def decide(criteria, probe_signal: float, baseline_signal: float):
    rng = np.random.default_rng(0)
    val, test = split_pairs(1), split_pairs(2)
    heads = {h: [f"{h}/seed{s}" for s in range(3)] for h in ("linear-adam", "mlp-adam")}
    res = evaluate_g7(val=val, test=test, val_scores=scores_for(val, rng, probe_signal, baseline_signal),
                      test_scores=scores_for(test, rng, probe_signal, baseline_signal), heads=heads, n_boot=300,
                      ci_level=0.95, seed=0)
    decision, judged, _ = judge(criteria, res.metrics)
    return decision, {c["id"]: c["outcome"] for c in judged}, res


def test_gate_fails_when_a_baseline_beats_the_probe(criteria):
    decision, outcomes, res = decide(criteria, probe_signal=1.0, baseline_signal=5.0)
    assert res.selection["baseline"]["chosen"] == "ssim_distance"
    assert outcomes["C2_probe_beats_baseline"] == "not_met" and decision == "fail"
    m = res.metrics["delta_probe_baseline_auroc"]
    assert m["ci"][1] < 0 and m["value"] == pytest.approx(res.metrics["probe_auroc"]["value"]
                                                          - res.metrics["baseline_auroc"]["value"])


def test_gate_passes_when_the_probe_generalises(criteria):
    decision, outcomes, res = decide(criteria, probe_signal=5.0, baseline_signal=0.5)
    assert decision == "pass", outcomes
    sweep = res.metrics["probe_auroc_seed_sweep"]
    assert "t-based" in sweep["ci_method"] and sweep["ci"][0] < sweep["value"] < sweep["ci"][1]


def test_an_inverted_probe_is_reported_not_flipped(criteria):
    decision, outcomes, res = decide(criteria, probe_signal=-3.0, baseline_signal=0.5)
    assert res.metrics["probe_auroc"]["value"] < 0.2 and outcomes["C3_probe_not_inverted"] == "not_met"
    assert decision == "fail" and all(v for k, v in res.selection["inverted_on_test"].items() if "/seed" in k)


def test_baseline_is_chosen_on_validation_not_test(criteria):
    rng = np.random.default_rng(3)
    val, test = split_pairs(1), split_pairs(2)
    vs, ts = scores_for(val, rng, 1.0, 5.0), scores_for(test, rng, 1.0, 1.0)
    ts["pixel_l2"] = 10.0 * test.label + rng.normal(size=test.label.size)  # best on test only
    heads = {"linear-adam": ["linear-adam/seed0", "linear-adam/seed1", "linear-adam/seed2"]}
    res = evaluate_g7(val=val, test=test, val_scores=vs, test_scores=ts, heads=heads, n_boot=100, ci_level=0.95,
                      seed=0)
    assert res.selection["baseline"]["chosen"] == "ssim_distance"
    assert res.metrics["pixel_l2_auroc"]["value"] > res.metrics["baseline_auroc"]["value"]
    assert set(BASELINES) <= {r["arm"] for r in res.table}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("g7")
    lock = copy_lock(base / "lock")
    results = base / "results"
    job = load_job("g7_dermajepa_probe")
    rc = job.main(["--smoke", "--results", str(results), "--lock", str(lock), "--threads", "1"])
    assert rc == 0
    records = sorted(results.glob("*.json"))
    assert len(records) == 1
    return records[0], lock


def test_smoke_record_is_audited_and_complete(smoke_run):
    record_path, lock = smoke_run
    report = audit_folder(record_path.parent, lock_path=lock, allow_unproven_prereg=True, allow_dirty=True)
    assert report.ok, report.all_problems()
    rec = read_record(record_path)
    assert rec["gate_id"] == "G7" and rec["lock"]["entry"] == "G7/embedded"
    for name in ("probe_auroc", "baseline_auroc", "delta_probe_baseline_auroc", "probe_eer", "probe_auprc",
                 "probe_fpr_at_tpr80", "probe_auroc_seed_sweep"):
        m = rec["metrics"][name]
        assert m["ci"][0] <= m["value"] <= m["ci"][1], name
    assert "lesion-clustered" in rec["metrics"]["probe_auroc"]["ci_method"]
    assert rec["metrics"]["probe_auroc"]["n"]["lesions"] > 20
    assert rec["provenance"]["dataset"]["nuisance"] == {"train_families": ["geometry", "lighting"],
                                                         "held_out_family": "colour", "seed": 0}
    training = json.loads((record_path.parent / next(a["path"] for a in rec["artefacts"]
                                                     if a["path"].endswith("training.json"))).read_text())
    assert all(t["n_changing_pairs"] == 0 for ts in training.values() for t in ts)


def test_smoke_checkpoints_and_model_card(smoke_run):
    record_path, _ = smoke_run
    rec = read_record(record_path)
    ckpts = [a["path"] for a in rec["artefacts"] if a["path"].endswith(".safetensors")]
    assert len(ckpts) == 5
    ck = load_probe(record_path.parent / ckpts[0], expected_model_id="tiny-vit", expected_dim=64)
    assert ck.metadata["run_id"] == rec["run_id"]
    with pytest.raises(CheckpointError, match="input_embedding_model_id"):
        load_probe(record_path.parent / ckpts[0], expected_model_id="redlessone/DermLIP_ViT-B-16", expected_dim=64)
    card = (record_path.parent / "model_cards" / f"{rec['run_id']}.md").read_text()
    assert card == render_model_card(rec, checkpoint=ckpts[0], selection=json.loads(
        (record_path.parent / next(a["path"] for a in rec["artefacts"] if a["path"].endswith("selection.json")))
        .read_text()))
    assert f"**{rec['decision']}**" in card and "pretraining-data overlap" in card and "phantoms" in card
    with pytest.raises(ValueError, match="not an artefact"):
        render_model_card(rec, checkpoint="artefacts/x/none.safetensors")
