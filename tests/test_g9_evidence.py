"""G9's evidence tier comes from the same facts and the same function as every other gate's, read from the classifier's
backbone registry: pinned, digest-verified weights on real data may be ``real``; random init, unpinned or other bytes,
or phantoms are flow checks; the audit recomputes it. Weights here are small random models of the real architectures
saved to a local folder; "pinned" means the test records their digest in the registry entry (monkeypatched)."""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch

import covtoken.classifier.backbones as cb
from covtoken.backbone.registry import COMMIT_SHA
from covtoken.classifier.backbones import ClassifierBackboneSpec, build_feature_backbone, get_classifier_spec
from covtoken.evidence import (audit_evidence, facts_of, registry_spec, upper_bound_tier, weights_upper_bound,
                               weights_verified)

OTHER_SHA = "0123456789abcdef0123456789abcdef01234567"


def small_siglip_dir(folder: Path, seed: int = 3) -> Path:
    """A random full SigLIP (text + vision, as google/medsiglip-448 ships it), 28 px, saved with its processor."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(seed)
    cfg = SiglipConfig(vision_config={"image_size": 28, "patch_size": 14, "hidden_size": 32, "intermediate_size": 64,
                                      "num_hidden_layers": 2, "num_attention_heads": 2},
                       text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "vocab_size": 50, "bos_token_id": 0,
                                    "eos_token_id": 1, "pad_token_id": 1})
    SiglipModel(cfg).save_pretrained(folder)
    SiglipImageProcessor(size={"height": 28, "width": 28}).save_pretrained(folder)
    return folder


def small_resnet_dir(folder: Path, seed: int = 5) -> Path:
    """A random timm resnet50 (bottleneck blocks, one per stage, narrow), saved as a timm Hub snapshot at 32 px."""
    import timm
    from timm.models import save_for_hf

    args = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8}
    torch.manual_seed(seed)
    model = timm.create_model("resnet50", pretrained=False, **args)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32)}
    save_for_hf(model, str(folder), model_args=args, safe_serialization=True)
    return folder


def file_sha256(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def pin(monkeypatch: pytest.MonkeyPatch, name: str, folder: Path | None = None, **change: object) -> None:
    """Record in the registry entry ``name`` the digest of ``folder``'s weight file (and any other change)."""
    spec = get_classifier_spec(name)
    if folder is not None:
        change["weights_sha256"] = file_sha256(folder)
    monkeypatch.setitem(cb._REGISTRY, name, dataclasses.replace(spec, **change))


def ham_provenance(n: int = 120) -> dict:
    return {"id": "ham10000", "revision": "sha256:" + "0" * 64,
            "n_patients": {"train": n - 2 * (n // 5), "calib": n // 5, "test": n // 5}}


def g9_block(configured, baseline) -> dict:
    """The backbone block the G9 job writes (report.finish_g9), from built backbones."""
    facts = configured.weights_facts()
    return {**facts, "library": configured.spec.library, "revision": facts["resolved_revision"],
            "arms": {"configured": {"weights": configured.weights_facts()},
                     "full": {"weights": configured.weights_facts()},
                     "baseline": {"weights": baseline.weights_facts()}}}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("g9w")
    return {"siglip": small_siglip_dir(root / "siglip"), "siglip_other": small_siglip_dir(root / "siglip2", seed=4),
            "resnet": small_resnet_dir(root / "resnet")}


# ------------------------------------------------------------------------------------------------ the registry
def test_hub_entries_follow_the_frozen_registrys_rule():
    med, res, cnx = (get_classifier_spec(n) for n in ("medsiglip-448", "resnet50", "convnextv2-tiny"))
    assert COMMIT_SHA.fullmatch(med.revision) and COMMIT_SHA.fullmatch(res.revision)
    assert med.revision_pinned and res.revision_pinned
    assert cnx.revision is None and not cnx.revision_pinned  # no public commit found: runs pass --revision
    assert med.weights_sha256 is None  # no public digest found: MedSigLIP runs are flow checks until one is recorded
    with pytest.raises(ValueError, match="need a pinned revision"):
        ClassifierBackboneSpec(name="x", library="timm", arch="resnet50", hub_id="timm/x")
    with pytest.raises(ValueError, match="revision_pinned=False is only for Hub entries"):
        ClassifierBackboneSpec(name="x", library="timm", arch="resnet50", hub_id="timm/x", revision=OTHER_SHA,
                               revision_pinned=False)
    with pytest.raises(ValueError, match="64 lower-case hex"):
        ClassifierBackboneSpec(name="x", library="timm", arch="resnet50", hub_id="timm/x", revision=OTHER_SHA,
                               weights_sha256="abc")
    assert registry_spec("medsiglip-448", "classifier") is med
    with pytest.raises(KeyError, match="unknown backbone registry"):
        registry_spec("medsiglip-448", "other")


def test_unpinned_entry_names_the_flag_before_any_download():
    with pytest.raises(ValueError, match=r"convnextv2-tiny: no commit .* is pinned .*--revision"):
        build_feature_backbone("convnextv2-tiny")


# ------------------------------------------------------------------------------------------------ the tier
def test_pinned_local_weights_on_real_data_are_eligible_for_real(weights, monkeypatch):
    pin(monkeypatch, "medsiglip-448", weights["siglip"])
    pin(monkeypatch, "resnet50", weights["resnet"])
    med = build_feature_backbone("medsiglip-448", weights=weights["siglip"])
    res = build_feature_backbone("resnet50", weights=weights["resnet"])
    assert med.weights_verified and res.weights_verified, (med.weights_verification, res.weights_verification)
    block = g9_block(med, res)
    facts = facts_of(backbone=block, dataset=ham_provenance())
    assert facts.tier == "real" and facts.why == ()
    # the same weights on phantoms are a flow check; on a registered sample, a sample
    assert facts_of(backbone=block, dataset={"id": "phantom-derm-classes"}).tier == "flow-check"
    import covtoken.evidence as ev

    monkeypatch.setattr(ev, "registered_sample", lambda ds: ds.get("id") == "ham10000")
    assert facts_of(backbone=block, dataset=ham_provenance()).tier == "sample"


def test_random_init_unpinned_or_other_bytes_stay_a_flow_check(weights, monkeypatch):
    ds = ham_provenance()
    pin(monkeypatch, "resnet50", weights["resnet"])
    res = build_feature_backbone("resnet50", weights=weights["resnet"])
    # no digest recorded (the shipped MedSigLIP entry): never verified, whatever the bytes
    med = build_feature_backbone("medsiglip-448", weights=weights["siglip"])
    assert facts_of(backbone=g9_block(med, res), dataset=ds).tier == "flow-check"
    assert "records no sha256" in med.weights_verification[1]
    # a seeded random initialisation (the embedded mini backbones)
    mini = build_feature_backbone("siglip-mini")
    assert not mini.weights_verified and facts_of(backbone=g9_block(mini, res), dataset=ds).tier == "flow-check"
    # other bytes than the recorded digest
    pin(monkeypatch, "medsiglip-448", weights["siglip"])
    other = build_feature_backbone("medsiglip-448", weights=weights["siglip_other"])
    ok, why = other.weights_verification
    assert not ok and "no weight file read has the registry's sha256" in why
    # the Hub at a commit other than the pinned one, or an entry that pins none
    good = build_feature_backbone("medsiglip-448", weights=weights["siglip"])
    assert good.weights_verified
    hub = {**good.weights_facts(), "weights_origin": "hub", "resolved_revision": OTHER_SHA}
    assert not weights_verified(hub)[0]
    assert weights_verified({**hub, "resolved_revision": get_classifier_spec("medsiglip-448").revision})[0]
    pin(monkeypatch, "convnextv2-tiny", weights_sha256="ab" * 32)
    cnx = {"registry": "classifier", "name": "convnextv2-tiny", "hub_id": get_classifier_spec("convnextv2-tiny").hub_id,
           "weights_origin": "hub", "resolved_revision": OTHER_SHA, "weights_files": {"model.safetensors":
                                                                                      "sha256:" + "ab" * 32}}
    assert weights_verified(cnx) == (False, "convnextv2-tiny: the registry pins no revision")
    # a verified configured model against a randomly initialised baseline is no evidence for the comparison
    block = g9_block(good, res)
    block["arms"]["baseline"]["weights"] = build_feature_backbone("resnet50-mini").weights_facts()
    facts = facts_of(backbone=block, dataset=ds)
    assert facts.tier == "flow-check" and any("arm baseline: resnet50-mini" in w for w in facts.why), facts.why
    # a flag or a registry name in the record proves nothing: the facts are recomputed from the named registry
    assert not weights_verified({**mini.weights_facts(), "weights_verified": True})[0]
    assert not weights_verified({**good.weights_facts(), "registry": "frozen"})[0]


def test_audit_recomputes_the_classifier_tier(weights, monkeypatch):
    pin(monkeypatch, "medsiglip-448", weights["siglip"])
    pin(monkeypatch, "resnet50", weights["resnet"])
    block = g9_block(build_feature_backbone("medsiglip-448", weights=weights["siglip"]),
                     build_feature_backbone("resnet50", weights=weights["resnet"]))
    rec = {"evidence": "real", "lock": {"entry": "G9/real"},
           "provenance": {"backbone": block, "dataset": ham_provenance()}}
    assert audit_evidence(rec) == []
    monkeypatch.undo()  # the shipped registry: no digest of MedSigLIP-448 is recorded
    problems = dict(audit_evidence(rec))
    assert "claims 'real', more than its facts allow: 'flow-check'" in problems["evidence"]
    assert "records no sha256" in problems["evidence"]
    assert "flow-check run judged under G9/real" in problems["lock/entry"]


def test_upper_bound_reads_the_classifier_registry(weights, monkeypatch):
    tier, why = weights_upper_bound(backbone="medsiglip-448", weights=None, revision=None, registry="classifier")
    assert tier == "flow-check" and why == "backbone medsiglip-448: the registry records no sha256 of its weight file"
    assert weights_upper_bound(backbone="resnet50", weights=None, revision=None, registry="classifier")[0] == "real"
    assert weights_upper_bound(backbone="resnet50", weights=None, revision=OTHER_SHA,
                               registry="classifier")[0] == "flow-check"
    assert weights_upper_bound(backbone="siglip-mini", weights=None, revision=None,
                               registry="classifier")[0] == "flow-check"
    pin(monkeypatch, "medsiglip-448", weights["siglip"])
    assert upper_bound_tier(datasets=["ham10000"], backbone="medsiglip-448", weights=str(weights["siglip"]),
                            revision=None, registry="classifier") == "real"
    assert upper_bound_tier(datasets=["phantom-derm-classes"], backbone="medsiglip-448", weights=None, revision=None,
                            registry="classifier") == "flow-check"
    # the frozen registry is still the default
    assert upper_bound_tier(datasets=["busi"], backbone="clip-vitb16-openai", weights=None, revision=None) == "real"
