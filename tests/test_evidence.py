"""Evidence tiers are derived from facts: phantoms or unverified weights make a flow check, whatever a flag says."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covtoken.backbone.frozen import load_backbone
from covtoken.backbone.registry import get_spec, pinned_digest_verified
from covtoken.data.catalog import load_dataset
from covtoken.evidence import (EvidenceError, allowed_entry, audit_evidence, check_entry, derive_tier, facts_of,
                               upper_bound_tier)
from g1_helpers import copy_lock, load_job


def busi_folder(root: Path, n: int) -> Path:
    """A folder in the BUSI layout (index.csv, images/, masks/) with ``n`` small grey images, each with a lesion."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for i in range(n):
        img = (rng.random((24, 24)) * 255).astype(np.uint8)
        mask = np.zeros((24, 24), np.uint8)
        mask[8:14, 8:14] = 255
        Image.fromarray(img).save(root / "images" / f"benign_{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"benign_{i}_mask.png")
        rows.append({"file": f"images/benign_{i}.png", "mask": f"masks/benign_{i}_mask.png", "label": "benign"})
    with open(root / "index.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["file", "mask", "label"])
        w.writeheader()
        w.writerows(rows)
    return root


def verified_clip_provenance(**change) -> dict:
    """Backbone provenance as FrozenBackbone writes it for the pinned, digest-checked OpenAI CLIP entry."""
    spec = get_spec("clip-vitb16-openai")
    prov = {**spec.provenance(), "weights_origin": "hub", "resolved_revision": spec.revision,
            "weights_files": {"open_clip_model.safetensors": "sha256:" + spec.weights_sha256}}
    prov.update(change)
    return prov


def dataset_provenance(ds_id: str, n_patients: int) -> dict:
    return {"id": ds_id, "revision": "sha256:" + "0" * 64,
            "n_patients": {"train": n_patients - 2 * (n_patients // 4), "val": n_patients // 4,
                           "test": n_patients // 4}}


def test_tier_rule_each_fact_lowers_the_tier():
    assert derive_tier(phantom_data=False, registered_sample=False, weights_verified=True) == "real"
    assert derive_tier(phantom_data=False, registered_sample=True, weights_verified=True) == "sample"
    assert derive_tier(phantom_data=True, registered_sample=False, weights_verified=True) == "flow-check"
    assert derive_tier(phantom_data=False, registered_sample=False, weights_verified=False) == "flow-check"
    assert derive_tier(phantom_data=False, registered_sample=True, weights_verified=False) == "flow-check"


def test_weights_are_verified_only_when_pinned_and_digest_matches():
    spec = get_spec("clip-vitb16-openai")
    good = dict(origin="hub", resolved_revision=spec.revision,
                files={"w.safetensors": "sha256:" + spec.weights_sha256})
    assert pinned_digest_verified(spec, **good)[0]
    assert pinned_digest_verified(spec, **{**good, "origin": "override:/weights/w.safetensors",
                                           "resolved_revision": None})[0]  # same bytes from a local file
    assert not pinned_digest_verified(spec, **{**good, "resolved_revision": "a" * 40})[0]  # another commit
    assert not pinned_digest_verified(spec, **{**good, "files": {"w.safetensors": "sha256:" + "0" * 64}})[0]
    assert not pinned_digest_verified(spec, **{**good, "files": {}})[0]
    assert not pinned_digest_verified(spec, **{**good, "origin": "unknown"})[0]
    # a Hub entry without a recorded digest can never be verified, whatever the record says
    plain = get_spec("dinov2-base")
    assert not pinned_digest_verified(plain, origin="hub", resolved_revision=plain.revision,
                                      files={"model.safetensors": "sha256:" + "1" * 64})[0]
    tiny = load_backbone("tiny-vit")
    assert tiny.weights_verified is False
    assert tiny.provenance(blocks=[0], final_norm=False)["weights_verified"] is False


def test_random_backbone_on_real_layout_data_is_a_flow_check(tmp_path):
    data = load_dataset("busi", root=busi_folder(tmp_path / "busi", 70))
    ds = {**data.provenance, "n_patients": {"train": 42, "val": 14, "test": 14}}
    tiny = load_backbone("tiny-vit").provenance(blocks=[0], final_norm=False)
    facts = facts_of(backbone=tiny, dataset=ds)
    assert facts.tier == "flow-check" and not facts.phantom_data and not facts.weights_verified
    assert any("pinned, digest-verified" in w for w in facts.why)
    # the same data with verified weights would be real evidence; the same weights on phantoms never are
    assert facts_of(backbone=verified_clip_provenance(), dataset=ds).tier == "real"
    assert facts_of(backbone=verified_clip_provenance(), dataset=dataset_provenance("phantom-ct", 60)).tier \
        == "flow-check"
    # a claimed flag in the record changes nothing: the fact is recomputed from the registry
    forged = {**tiny, "weights_verified": True}
    assert facts_of(backbone=forged, dataset=ds).tier == "flow-check"


def test_registered_sample_is_the_sample_tier():
    assert facts_of(backbone=verified_clip_provenance(), dataset=dataset_provenance("lidc-idri", 5)).tier == "sample"
    assert facts_of(backbone=verified_clip_provenance(), dataset=dataset_provenance("lidc-idri", 400)).tier == "real"


def test_entries_judge_only_their_tiers():
    assert allowed_entry("real", "G1/real") and not allowed_entry("flow-check", "G1/real")
    assert not allowed_entry("sample", "G1/real")
    assert allowed_entry("flow-check", "G1/sample") and allowed_entry("sample", "G1/sample")
    assert not allowed_entry("real", "G1/sample") and not allowed_entry("real", "G1/embedded")
    with pytest.raises(EvidenceError, match="flow-check.*cannot be judged under G7/real"):
        check_entry("flow-check", "G7/real")
    assert upper_bound_tier(datasets=["busi"], backbone="tiny-vit", weights=None, revision=None) == "flow-check"
    assert upper_bound_tier(datasets=["phantom-ct"], backbone="clip-vitb16-openai", weights=None,
                            revision=None) == "flow-check"
    assert upper_bound_tier(datasets=["busi"], backbone="clip-vitb16-openai", weights=None, revision=None) == "real"
    assert upper_bound_tier(datasets=["busi"], backbone="clip-vitb16-openai", weights=None,
                            revision="b" * 40) == "flow-check"


def test_job_refuses_a_flow_check_under_the_real_entry_before_any_work(tmp_path):
    root = busi_folder(tmp_path / "busi", 30)
    lock = copy_lock(tmp_path / "cfg")
    job = load_job("g1_lesion_subspace")
    args = ["--dataset", "busi", "--data-root", str(root), "--results", str(tmp_path / "r"),
            "--work-dir", str(tmp_path / "w"), "--lock", str(lock)]
    with pytest.raises(EvidenceError, match="cannot be judged under G1/real"):
        job.main([*args, "--lock-entry", "G1/real"])
    assert not (tmp_path / "r").exists() and not (tmp_path / "w").exists()  # refused before any work
    with pytest.raises(SystemExit):  # the flag that used to decide the tier is gone
        job.main([*args, "--sample-run"])


def test_default_entry_follows_the_tier(tmp_path):
    from covtoken.runner import Run

    lock = copy_lock(tmp_path / "cfg")
    job = load_job("g1_lesion_subspace")
    cfg = job.G1Config(dataset="busi", data_root=str(tmp_path), results=str(tmp_path / "r"), lock=str(lock))
    assert Run.for_gate("G1", cfg, command=["x"]).entry_key == "G1/sample"
    assert Run.for_gate("G1", job.G1Config(results=str(tmp_path / "r"), lock=str(lock)),
                        command=["x"]).entry_key == "G1/embedded"
    real = job.G1Config(dataset="busi", backbone="clip-vitb16-openai", results=str(tmp_path / "r"), lock=str(lock))
    assert Run.for_gate("G1", real, command=["x"]).entry_key == "G1/real"


def test_audit_recomputes_the_tier():
    ds = {**dataset_provenance("busi", 70), "id": "busi"}
    tiny = load_backbone("tiny-vit").provenance(blocks=[0], final_norm=False)
    rec = {"evidence": "real", "lock": {"entry": "G1/real"}, "provenance": {"backbone": tiny, "dataset": ds}}
    problems = dict(audit_evidence(rec))
    assert "claims 'real', more than its facts allow: 'flow-check'" in problems["evidence"]
    assert "flow-check run judged under G1/real" in problems["lock/entry"]
    ok = {**rec, "evidence": "flow-check", "lock": {"entry": "G1/sample"}}
    assert audit_evidence(ok) == []
    assert audit_evidence({**ok, "evidence": None}) != []
    real = {"evidence": "real", "lock": {"entry": "G1/real"},
            "provenance": {"backbone": verified_clip_provenance(), "dataset": ds}}
    assert audit_evidence(real) == []
