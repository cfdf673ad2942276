"""The ``embedded-trained`` entries: a flow-check entry calibrated on one backbone (``parameters.backbone``) is the
default for that backbone, judges it only, and refuses the phantoms the backbone was pretrained on (job and audit)."""
from __future__ import annotations

import copy

import pytest

from conftest import REPO_ROOT
from covtoken.audit import RecordAudit, _check_lock
from covtoken.evidence import EvidenceError
from covtoken.lock import ThresholdLock, gate_template, lock_entry, write_lock
from covtoken.runner import Run, backbone_entry, check_entry_backbone, load_gate_dataset
from g1_helpers import load_job

GATES = ("G1", "G2", "G3", "G4", "G5", "G6")


def _lock_with_trained(tmp_path, gate="G1"):
    """A lock holding the template's embedded and embedded-trained entries of ``gate`` (thresholds as templated)."""
    tpl = gate_template(gate, root=REPO_ROOT / "configs" / "gates")
    doc: dict = {}
    for name in ("embedded", "embedded-trained"):
        e = tpl["entries"][name]
        doc = lock_entry(doc, gate_id=gate, claim=tpl["claim"], name=name, criteria=e["criteria"],
                         parameters=e["parameters"], calibration=e["calibration"])
    path = tmp_path / "lock.json"
    write_lock(doc, path)
    return path


@pytest.mark.parametrize("gate", GATES)
def test_templates_pin_the_trained_backbone_and_its_pretraining_seed(gate):
    tpl = gate_template(gate, root=REPO_ROOT / "configs" / "gates")
    emb, trained = tpl["entries"]["embedded"], tpl["entries"]["embedded-trained"]
    assert trained["parameters"]["backbone"] == "tiny-vit-lejepa"
    assert trained["parameters"]["backbone_pretraining_seeds"] == [0]
    # the same protocol as the random-init entry apart from the backbone pin: the comparison is of backbones only
    rest = {k: v for k, v in trained["parameters"].items() if k not in ("backbone", "backbone_pretraining_seeds")}
    assert rest == emb["parameters"]
    assert [(c["id"], c["metric"], c["comparator"], c["judged_on"], c["calibration_rule"]) for c in trained["criteria"]] \
        == [(c["id"], c["metric"], c["comparator"], c["judged_on"], c["calibration_rule"]) for c in emb["criteria"]]
    assert backbone_entry(gate, "tiny-vit-lejepa", lock_path=REPO_ROOT / "none.json", calibration=True) \
        == "embedded-trained"
    assert backbone_entry(gate, "tiny-vit", lock_path=REPO_ROOT / "none.json", calibration=True) is None


def _g1_cfg(tmp_path, lock, **kw):
    job = load_job("g1_lesion_subspace")
    base = dict(smoke=True, dataset="phantom-ct", results=str(tmp_path / "res"), lock=str(lock),
                work_dir=str(tmp_path / "work"))
    return job.G1Config(**{**base, **kw})


def test_the_trained_backbone_is_judged_under_its_own_entry_by_default(tmp_path):
    lock = _lock_with_trained(tmp_path)
    run = Run.for_gate("G1", _g1_cfg(tmp_path, lock, backbone="tiny-vit-lejepa", seed=1), command=["t"])
    assert run.entry_key == "G1/embedded-trained"
    run = Run.for_gate("G1", _g1_cfg(tmp_path, lock, backbone="tiny-vit", seed=1), command=["t"])
    assert run.entry_key == "G1/embedded"


def test_another_backbone_is_refused_under_the_trained_entry(tmp_path):
    lock = _lock_with_trained(tmp_path)
    with pytest.raises(EvidenceError, match="calibrated on backbone tiny-vit-lejepa"):
        Run.for_gate("G1", _g1_cfg(tmp_path, lock, backbone="tiny-vit", lock_entry="G1/embedded-trained"),
                     command=["t"])
    assert not (tmp_path / "res").exists()  # refused before anything was staged or ledgered
    check_entry_backbone("G1/embedded", {}, "tiny-vit")  # an entry without a pin takes any backbone


def test_the_pretraining_phantoms_are_refused_and_calibration_patients_are_not(tmp_path):
    P = ThresholdLock.load(_lock_with_trained(tmp_path)).entry("G1/embedded-trained").parameters
    P = {**P, "dataset_options": {**P["dataset_options"], "n_patients": 40, "per_patient": 1, "size": 32}}
    with pytest.raises(EvidenceError, match="generator seed 0 drew the phantoms"):
        load_gate_dataset(_g1_cfg(tmp_path, "x", seed=0), P, dataset="phantom-ct")
    cal = load_gate_dataset(_g1_cfg(tmp_path, "x", seed=0, calibration=True), P, dataset="phantom-ct")
    assert cal.provenance["revision"] == "generator-seed-1000"
    seen = copy.deepcopy(P)
    seen["backbone_pretraining_seeds"] = [1000]  # the guard follows the generator seed actually drawn
    with pytest.raises(EvidenceError, match="generator seed 1000"):
        load_gate_dataset(_g1_cfg(tmp_path, "x", seed=0, calibration=True), seen, dataset="phantom-ct")


def _record(lock, *, backbone, seed):
    e = lock.entry("G1/embedded-trained")
    return {"gate_id": "G1", "claim": e.claim, "decision": "pass", "criteria": [], "metrics": {},
            "lock": {"entry": e.key, "entry_digest": e.digest},
            "provenance": {"parameters": dict(e.parameters), "backbone": {"name": backbone}, "seed": seed,
                           "backend": {}}}


@pytest.mark.parametrize("backbone,seed,field", [("tiny-vit", 1, "provenance/backbone/name"),
                                                 ("tiny-vit-lejepa", 0, "provenance/seed")])
def test_audit_fails_a_trained_entry_record_of_another_backbone_or_the_seen_seed(tmp_path, backbone, seed, field):
    lock = ThresholdLock.load(_lock_with_trained(tmp_path))
    ra = RecordAudit(path=tmp_path / "r.json", record=_record(lock, backbone=backbone, seed=seed))
    _check_lock(ra, lock)
    assert any(f"field {field}:" in p for p in ra.problems), ra.problems
    ok = RecordAudit(path=tmp_path / "r.json", record=_record(lock, backbone="tiny-vit-lejepa", seed=1))
    _check_lock(ok, lock)
    assert not [p for p in ok.problems if "backbone" in p or "seed" in p], ok.problems
