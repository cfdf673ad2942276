"""G2 cross-modality: the embedded run is audited, the gate can fail, the label-free stage ignores masks."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT
from covtoken.audit import audit_folder
from covtoken.backbone.frozen import load_backbone
from covtoken.data.catalog import load_dataset
from covtoken.data.splits import split_patients
from covtoken.eval.localisation import SplitScores, paired_auroc_metrics
from covtoken.lock import ThresholdLock, judge
from g1_helpers import copy_lock, load_job
from test_label_leak import with_masks

MODS = ("lung_ct", "kidney_ct", "breast_us")


@pytest.fixture(scope="module")
def g2_record(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("g2")
    lock = copy_lock(base / "cfg")
    job = load_job("g2_cross_modality")
    assert job.main(["--smoke", "--results", str(base / "r"), "--work-dir", str(base / "w"), "--lock", str(lock)]) == 0
    (record,) = list((base / "r").glob("g2-*.json"))
    return record, lock


def test_embedded_record_is_complete_and_audited(g2_record):
    record, lock = g2_record
    rec = json.loads(record.read_text())
    assert rec["lock"]["entry"] == "G2/embedded"
    assert {c["metric"] for c in rec["criteria"]} == {f"{k}_{m}" for m in MODS
                                                      for k in ("auroc_density", "delta_density_saliency")}
    for m in MODS:
        d, s, g = (rec["metrics"][f"{k}_{m}"] for k in ("auroc_density", "auroc_saliency", "delta_density_saliency"))
        assert g["value"] == pytest.approx(d["value"] - s["value"], abs=1e-12)
        assert d["n"]["patients"] == rec["provenance"]["dataset"]["n_patients"][f"{m}/test"]
    rep = audit_folder(record.parent, lock_path=lock, allow_unproven_prereg=True, allow_dirty=True)
    assert rep.ok, rep.all_problems()


def test_g2_fails_when_saliency_is_better_on_one_modality():
    entry = ThresholdLock.load(REPO_ROOT / "configs" / "thresholds.lock.json").entry("G2/real")
    rng = np.random.default_rng(0)
    metrics = {}
    for k, m in enumerate(MODS):
        y = (rng.random(3000) < 0.1).astype(np.int8)
        pats = np.repeat([f"p{i}" for i in range(30)], 100)
        strong, weak = 2.5 * y + rng.standard_normal(y.size), 0.2 * y + rng.standard_normal(y.size)
        dens, sal = (weak, strong) if m == "breast_us" else (strong, weak)
        t = SplitScores({"density": dens, "saliency": sal}, y, pats, np.arange(y.size).astype(str))
        metrics.update(paired_auroc_metrics(t, arms={f"auroc_density_{m}": "density", f"auroc_saliency_{m}": "saliency"},
                                            diffs={f"delta_density_saliency_{m}": (f"auroc_density_{m}", f"auroc_saliency_{m}")},
                                            n_boot=300, ci_level=0.95, seed=k))
    decision, judged, _ = judge(entry.criteria, metrics)
    assert decision == "fail"
    assert {c["id"] for c in judged if c["outcome"] == "not_met"} == {"C_breast_us_level", "C_breast_us_beats_saliency"}


def test_g2_label_free_stage_ignores_masks(tmp_path):
    job = load_job("g2_cross_modality")
    data = load_dataset("phantom-kidney", seed=2, n_patients=8, per_patient=2)
    splits = split_patients([i.patient_id for i in data.items], fractions={"train": 0.5, "test": 0.5}, seed=0)
    params = {"block": 2, "final_norm": False, "max_fit_tokens": 5000}
    cfg, bb = replace(job.G2Config(), batch_size=8), load_backbone("tiny-vit")

    def run(d, name):
        _, rows, scores, extras = job.label_free_stage(d, bb, splits, params, cfg, tmp_path / name)
        return scores, extras

    ref = run(data, "orig")
    for how in ("permuted", "zeroed"):
        out = run(with_masks(data, how), how)
        for k in ref[0]:
            assert np.array_equal(out[0][k], ref[0][k]), f"{k} changed with {how} masks"
        assert out[1] == ref[1]
