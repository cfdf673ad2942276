"""G3 end to end: the embedded run writes a record the audit accepts, and the gate fails when its claim is false.

Constructed data: small lesions touching one or two of 64 tokens per image, 20 validation and 20 test patients.
A scorer that ranks lesion tokens first meets a scorer that ignores them; the gate must pass when the
membership arm is the informed one and fail when the saliency arm is.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT
from covtoken.audit import audit_folder
from covtoken.eval.lesion_miss import LesionSet
from covtoken.lock import ThresholdLock, judge
from g1_helpers import copy_lock, load_job, run_job_smoke


@pytest.fixture(scope="module")
def g3_run(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("g3")
    lock = copy_lock(base / "lock")
    work = tmp_path_factory.getbasetemp() / "g3-g6-work"  # token bank shared with the G6 smoke test
    return run_job_smoke("g3_membership_vs_saliency", base / "results", work, lock), lock


@pytest.mark.slow
def test_smoke_record_passes_the_audit_and_is_consistent(g3_run):
    record, lock = g3_run
    rep = audit_folder(record.parent, lock_path=lock, allow_unproven_prereg=True, allow_dirty=True)
    assert rep.ok, rep.all_problems()
    rec = json.loads(record.read_text())
    entry = ThresholdLock.load(lock).entry("G3/embedded")
    assert rec["decision"] == judge(entry.criteria, rec["metrics"])[0]
    m, P = rec["metrics"], entry.parameters
    arts = {Path(a["path"]).name: json.loads((record.parent / a["path"]).read_text()) for a in rec["artefacts"]}
    curve = arts["miss_curves.json"]
    assert [row["keep_rate"] for row in curve] == P["keep_rates"]
    for arm in ("membership", "saliency", "random"):  # keep sets are nested: more kept never misses more
        rates = [row[arm] for row in curve]
        assert all(a >= b - 1e-12 for a, b in zip(rates, rates[1:])), (arm, rates)
    d = m["delta_small_miss"]
    assert d["value"] == pytest.approx(m["small_miss_saliency"]["value"] - m["small_miss_membership"]["value"])
    assert d["ci"] == m["delta_small_miss_keep30"]["ci"] and d["ci"][0] <= d["value"] <= d["ci"][1]
    assert "clustered" in d["ci_method"] and "paired" in d["ci_method"]
    assert 2 <= d["n"]["patients"] <= rec["provenance"]["dataset"]["n_patients"]["test"]
    assert d["n"]["lesions"] < m["delta_all_miss"]["n"]["lesions"]  # small lesions are a subset of all lesions
    sel = arts["selection.json"]
    assert sel["membership_arm"] in m["delta_small_miss"]["description"]
    assert sel["saliency_arm"].startswith("cls@") and sel["saliency_arm"] in d["description"]
    assert 0.0 <= arts["saliency_diagnostics.json"]["high_norm_share_of_saliency_kept"] <= 1.0


def _constructed(membership_informed: bool, seed: int = 0, n_pat: int = 20, per: int = 3, n: int = 64):
    """A LabelFree-like object with one informed and one uninformed arm, and the lesions of each split."""
    rng = np.random.default_rng(seed)
    job = load_job("g3_membership_vs_saliency")

    def split(tag: str):
        n_img = n_pat * per
        comps, hot = [], np.zeros((n_img, n))
        for i in range(n_img):
            les = []
            for _ in range(int(rng.integers(1, 3))):
                toks = np.sort(rng.choice(n, int(rng.integers(1, 3)), replace=False))
                hot[i, toks] = 1.0
                les.append({"area_tokens": float(rng.uniform(0.1, 1.0)), "tokens": toks})
            comps.append(les)
        return hot, LesionSet.from_components(comps, [f"{tag}{i // per:02d}" for i in range(n_img)])

    (hot_v, les_v), (hot_t, les_t) = split("v"), split("t")
    hot = np.concatenate([hot_v, hot_t])
    informed = hot + 0.3 * rng.random(hot.shape)
    blind = rng.random(hot.shape)
    mem, sal = (informed, blind) if membership_informed else (blind, informed)
    rows = {"train": np.arange(0), "val": np.arange(len(hot_v)), "test": np.arange(len(hot_v), len(hot))}
    lf = job.LabelFree(bank=None, rows=rows, membership={"A_gauss@1": mem, "B_pca@2": blind},
                       saliency={0: sal, 3: blind}, high_norm={})
    return job, lf, {"val": les_v, "test": les_t}


@pytest.mark.parametrize("membership_informed, want", [(True, "pass"), (False, "fail")])
def test_gate_fails_when_the_claim_is_false(membership_informed, want):
    job, lf, lesions = _constructed(membership_informed)
    lock = ThresholdLock.load(REPO_ROOT / "configs" / "thresholds.lock.json")
    P = lock.entry("G3/embedded").parameters
    metrics, selection, curve = job.evaluate_g3(lf, lesions, P, 64, seed=0)
    # validation picks the informed arm, never the blind one of the same kind
    if membership_informed:
        assert selection["membership_arm"] == "A_gauss@1"
    else:
        assert selection["saliency_arm"] == "cls@0"
    for name in ("G3/embedded", "G3/real"):
        decision, judged, _ = judge(lock.entry(name).criteria, metrics)
        assert decision == want, (name, judged)
    delta = metrics["delta_small_miss"]
    assert (delta["ci"][0] > 0) if membership_informed else (delta["ci"][1] < 0)
