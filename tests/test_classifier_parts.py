"""G9 classifier parts: feature schema, config schema, backbones from local snapshots, calibration and metrics
against slow references, conformal coverage, and the Predictor round trip."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from covtoken.classifier.backbones import build_feature_backbone, list_classifier_backbones
from covtoken.classifier.calibrate import (abstain_threshold, conformal_qhat, conformal_sets, fit_calibration,
                                           fit_temperature, nll)
from covtoken.classifier.config import ClassifierConfig, ClassifierConfigError
from covtoken.classifier.feature_schema import FeatureSchema, FeatureSchemaError
from covtoken.eval.classification import (aurc, clustered_mean, conformal_coverage_band, expected_calibration_error,
                                          risk_coverage, softmax, topk_hits)

SHA = hashlib.sha1(b"covtoken g9 test snapshot").hexdigest()


# ------------------------------------------------------------------------------------------------ feature schema
def _schema(**extra: object) -> dict:
    return {"name": "s", "features": [
        {"name": "age", "kind": "numeric", "center": 50, "scale": 20, "missing": ["unknown"]},
        {"name": "sex", "kind": "categorical", "categories": ["female", "male"], "missing": ["", "unknown"]},
        *extra.get("more", [])]}


def test_feature_schema_encodes_numeric_categorical_and_missing() -> None:
    fs = FeatureSchema.from_dict(_schema())
    x = fs.encode([{"age": 70, "sex": "Male"}, {"age": None, "sex": "unknown"}, {}])
    np.testing.assert_array_equal(x, np.array([[1.0, 0, 0, 1, 0], [0, 1, 0, 0, 1], [0, 1, 0, 0, 1]], np.float32))
    assert fs.width == 5


@pytest.mark.parametrize("row,msg", [({"sex": "other"}, "unknown category 'other'"),
                                     ({"age": "old"}, "'old' is not a number"),
                                     ({"age": float("inf")}, "not finite")])
def test_feature_schema_refuses_values_it_cannot_encode(row: dict, msg: str) -> None:
    with pytest.raises(FeatureSchemaError, match=msg):
        FeatureSchema.from_dict(_schema()).encode([row], ids=["img-7"])


def test_reduced_schema_must_be_a_subset_with_the_same_definitions() -> None:
    full = FeatureSchema.from_dict(_schema(more=[{"name": "itch", "kind": "categorical", "categories": ["yes", "no"]}]))
    FeatureSchema.from_dict(_schema()).check_subset_of(full)
    with pytest.raises(FeatureSchemaError, match="'itch' is not in"):
        full.check_subset_of(FeatureSchema.from_dict(_schema()))
    changed = _schema()
    changed["features"][0]["scale"] = 10
    with pytest.raises(FeatureSchemaError, match="defined differently"):
        FeatureSchema.from_dict(changed).check_subset_of(full)


def test_feature_schema_file_is_validated() -> None:
    bad = _schema()
    bad["features"][1]["kind"] = "ordinal"
    with pytest.raises(FeatureSchemaError, match="features/1"):
        FeatureSchema.from_dict(bad)


def test_shipped_reduced_schemas_are_subsets() -> None:
    for pre in ("phantom", "ham10000"):
        ClassifierConfig.load(f"g9_{pre}.json")  # validates
        red = ClassifierConfig.load(f"g9_{pre}.json").feature_schema
        full = ClassifierConfig.load(f"g9_{pre}.json").with_feature_schema(f"{pre}_full.feature_schema.json")
        red.check_subset_of(full.feature_schema)
        assert red.width < full.feature_schema.width


# ------------------------------------------------------------------------------------------------ config
def test_config_rejects_unknown_keys_with_their_path() -> None:
    doc = json.loads(Path(ClassifierConfig.load("g9_phantom.json").source).read_text())
    doc["recipe"]["momentum"] = 0.9
    with pytest.raises(ClassifierConfigError, match="recipe.*momentum"):
        ClassifierConfig.from_dict(doc, base=Path(ClassifierConfig.load("g9_phantom.json").source).parent)


def test_config_labels_end_with_other_and_tta_needs_identity() -> None:
    cfg = ClassifierConfig.load("g9_phantom.json")
    assert cfg.labels[-1] == "other" and len(cfg.labels) >= 7 + 1
    doc = dict(cfg.doc, tta=["hflip"])
    with pytest.raises(ClassifierConfigError, match="identity"):
        ClassifierConfig.from_dict(doc, base=Path(cfg.source).parent)


# ------------------------------------------------------------------------------------------------ backbones
@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _snapshot(cache: Path, hub_id: str, sha: str = SHA) -> Path:
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    folder = repo / "snapshots" / sha
    folder.mkdir(parents=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    return folder


def _small_siglip(folder: Path) -> torch.nn.Module:
    """A random full SigLIP (text + vision, as in google/medsiglip-448) with a 448-style processor config."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(3)
    cfg = SiglipConfig(vision_config={"image_size": 28, "patch_size": 14, "hidden_size": 32, "intermediate_size": 64,
                                      "num_hidden_layers": 2, "num_attention_heads": 2},
                       text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "vocab_size": 50})
    model = SiglipModel(cfg).eval()
    model.save_pretrained(folder)
    SiglipImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.4, 0.5, 0.6],
                         image_std=[0.2, 0.3, 0.4]).save_pretrained(folder)
    return model


def test_medsiglip_builds_from_a_hub_snapshot_through_the_same_code(hub_cache: Path) -> None:
    from covtoken.classifier.backbones import get_classifier_spec

    ref = _small_siglip(_snapshot(hub_cache, "google/medsiglip-448"))
    with pytest.raises(ValueError, match="revision"):
        build_feature_backbone("convnextv2-tiny")  # nothing pinned: a run must name the commit
    with pytest.raises(ValueError, match="40-hex"):
        build_feature_backbone("medsiglip-448", revision="main")
    bb = build_feature_backbone("medsiglip-448", revision=SHA).eval()
    assert bb.source["resolved_revision"] == SHA
    assert bb.weights_verification == (False, "medsiglip-448: the registry records no sha256 of its weight file")
    # without a revision the pinned commit is fetched (here: served from the offline cache)
    pinned = get_classifier_spec("medsiglip-448").revision
    _small_siglip(_snapshot(hub_cache, "google/medsiglip-448", pinned))
    assert build_feature_backbone("medsiglip-448").source["resolved_revision"] == pinned
    assert bb.data_config["mean"] == pytest.approx([0.4, 0.5, 0.6]) and bb.data_config["input_size"] == [3, 28, 28]
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        want = ref.vision_model(pixel_values=x).pooler_output
        torch.testing.assert_close(bb(x), want)


def test_siglip_preprocessing_matches_the_library_processor(tmp_path: Path) -> None:
    from transformers import SiglipImageProcessor

    from covtoken.classifier.model import preprocess_images

    _small_siglip(tmp_path)
    bb = build_feature_backbone("medsiglip-448", weights=tmp_path)
    img = np.random.default_rng(0).random((28, 28, 3)).astype(np.float32)  # already at the input size: no resize
    ours = preprocess_images([img], bb.data_config)
    proc = SiglipImageProcessor.from_pretrained(tmp_path)
    theirs = proc(images=[img], return_tensors="pt", do_rescale=False)["pixel_values"]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,arch,args", [
    ("resnet50", "resnet50", {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8}),
    ("convnextv2-tiny", "convnextv2_tiny", {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]})])
def test_timm_backbones_build_from_a_local_snapshot(tmp_path: Path, name: str, arch: str, args: dict) -> None:
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(5)
    ref = timm.create_model(arch, pretrained=False, **args).eval()
    save_for_hf(ref, str(tmp_path), model_args=args, safe_serialization=True)
    bb = build_feature_backbone(name, weights=tmp_path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref.forward_head(ref.forward_features(x), pre_logits=True)
        torch.testing.assert_close(bb(x), want)
    assert bb.data_config["mean"] == pytest.approx(list(ref.pretrained_cfg["mean"]))
    assert bb.source["files"]["model.safetensors"].startswith("sha256:")


def test_timm_snapshot_of_another_architecture_is_refused(tmp_path: Path) -> None:
    import timm
    from timm.models import save_for_hf

    args = {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}
    save_for_hf(timm.create_model("convnextv2_tiny", **args), str(tmp_path), model_args=args, safe_serialization=True)
    with pytest.raises(ValueError, match="architecture 'convnextv2_tiny'"):
        build_feature_backbone("resnet50", weights=tmp_path)


def test_every_mini_backbone_builds_and_pools() -> None:
    for name in [n for n in list_classifier_backbones() if n.endswith("-mini")]:
        bb = build_feature_backbone(name).eval()
        out = bb(torch.zeros(1, *bb.data_config["input_size"]))
        assert out.shape == (1, bb.num_features)


# ------------------------------------------------------------------------------------------------ calibration
def _calibrated(n: int = 3000, c: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true class distribution (perfectly calibrated)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (n, c))
    p = softmax(logits)
    y = np.array([rng.choice(c, p=row) for row in p])
    return logits, y


def test_temperature_scaling_repairs_an_overconfident_model() -> None:
    logits, y = _calibrated()
    over = 3.0 * logits                               # a miscalibrated (overconfident) model
    t = fit_temperature(over, y)
    grid = np.exp(np.linspace(np.log(2.0), np.log(4.5), 1001))
    t_ref = grid[np.argmin([nll(over, y, g) for g in grid])]   # slow, obvious reference
    assert t == pytest.approx(t_ref, rel=2e-3)
    assert 2.5 < t < 3.5
    before, after = expected_calibration_error(softmax(over), y), expected_calibration_error(softmax(over, t), y)
    assert after < before / 2


def _ece_reference(p: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    conf, pred = p.max(1), p.argmax(1)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        sel = [i for i in range(len(y)) if (conf[i] > lo or (b == 0 and conf[i] >= 0)) and conf[i] <= hi]
        if sel:
            total += len(sel) / len(y) * abs(np.mean([pred[i] == y[i] for i in sel]) - np.mean(conf[sel]))
    return total


def test_ece_matches_a_loop_reference() -> None:
    logits, y = _calibrated(500, 4, seed=1)
    p = softmax(2 * logits)
    assert expected_calibration_error(p, y) == pytest.approx(_ece_reference(p, y), abs=1e-12)


def test_aurc_and_risk_coverage_match_a_brute_force_reference() -> None:
    rng = np.random.default_rng(2)
    conf, correct = rng.random(200), (rng.random(200) < 0.7).astype(float)
    order = np.argsort(-conf)
    ref = np.mean([1 - correct[order[:m]].mean() for m in range(1, 201)])
    assert aurc(conf, correct) == pytest.approx(ref, abs=1e-12)
    rc = risk_coverage(conf, correct)
    assert rc["coverage"][-1] == 1.0 and rc["risk"][-1] == pytest.approx(1 - correct.mean())


def test_abstain_threshold_meets_the_target_on_its_own_data() -> None:
    rng = np.random.default_rng(3)
    conf = rng.random(400)
    correct = (rng.random(400) < conf).astype(float)  # confident images are more often right
    t = abstain_threshold(conf, correct, 0.2)
    ans = conf >= t
    assert 1 - correct[ans].mean() <= 0.2
    looser = conf >= np.max(conf[conf < t])                      # one more image answered breaks the target
    assert 1 - correct[looser].mean() > 0.2 or looser.all()


def test_conformal_sets_cover_exchangeable_data_inside_the_finite_sample_band() -> None:
    alpha, inside = 0.1, 0
    for seed in range(5):
        logits, y = _calibrated(1500, 6, seed=10 + seed)
        p = softmax(logits)
        cal, test = slice(0, 500), slice(500, 1500)
        sets = conformal_sets(p[cal], y[cal], p[test], alpha)
        cov = sets[np.arange(1000), y[test]].mean()
        lo, hi = conformal_coverage_band(500, 1000, alpha, level=0.99)
        inside += lo <= cov <= hi
        # the stored quantile serves the same sets as crepes
        q = conformal_qhat(1 - p[cal][np.arange(500), y[cal]], alpha)
        np.testing.assert_array_equal(sets, (1 - p[test] <= q).astype(int))
    assert inside == 5
    assert 0.85 < lo < 0.9 < hi < 0.95


def test_conformal_coverage_fails_when_calibration_is_not_exchangeable() -> None:
    """Attack: calibrate on the images the model gets right, test on those it gets wrong - coverage leaves the
    band (the band is a property of exchangeable data, not a rubber stamp)."""
    logits, y = _calibrated(3000, 6, seed=4)
    p = softmax(logits)
    easy = p.argmax(1) == y
    cal_idx, test_idx = np.nonzero(easy)[0][:800], np.nonzero(~easy)[0][:800]
    sets = conformal_sets(p[cal_idx], y[cal_idx], p[test_idx], 0.1)
    cov = sets[np.arange(800), y[test_idx]].mean()
    lo, _ = conformal_coverage_band(800, 800, 0.1, level=0.99)
    assert cov < lo


def test_fit_calibration_uses_only_what_it_is_given() -> None:
    logits, y = _calibrated(300, 5, seed=5)
    a = fit_calibration(logits, y, alpha=0.1, target_risk=0.3)
    b = fit_calibration(logits.copy(), y.copy(), alpha=0.1, target_risk=0.3)
    assert a == b
    c = fit_calibration(logits, np.roll(y, 1), alpha=0.1, target_risk=0.3)
    assert c.temperature != a.temperature


# ------------------------------------------------------------------------------------------------ clustered CIs
def test_clustered_ci_widens_when_images_of_a_patient_are_duplicated() -> None:
    """Ten copies of each patient's image are one cluster: the patient-clustered CI must not shrink, an
    image-level one would (by about sqrt(10))."""
    rng = np.random.default_rng(6)
    hits = (rng.random(60) < 0.7).astype(float)
    pats = np.array([f"p{i}" for i in range(60)])
    one = clustered_mean(hits, pats, n_boot=2000, seed=1)
    dup = clustered_mean(np.repeat(hits, 10), np.repeat(pats, 10), n_boot=2000, seed=1)
    naive = clustered_mean(np.repeat(hits, 10), np.arange(600), n_boot=2000, seed=1)
    w = lambda r: r.ci[1] - r.ci[0]  # noqa: E731
    assert w(dup) == pytest.approx(w(one), rel=0.05)
    assert w(naive) < 0.5 * w(dup)


def test_topk_hits() -> None:
    p = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    np.testing.assert_array_equal(topk_hits(p, np.array([1, 1]), 1), [0, 0])
    np.testing.assert_array_equal(topk_hits(p, np.array([1, 1]), 2), [1, 1])


# ------------------------------------------------------------------------------------------------ recipe
def test_layer_decay_scales_backbone_blocks_below_the_head() -> None:
    from timm.optim import param_groups_layer_decay

    from covtoken.classifier.model import LesionClassifier

    for name in ("siglip-mini", "resnet50-mini"):
        m = LesionClassifier(build_feature_backbone(name), n_classes=4, meta_dim=3)
        groups = param_groups_layer_decay(m, weight_decay=0.05, layer_decay=0.5)
        scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
        named = dict(m.named_parameters())
        head = scale[id(m.head[-1].weight)]
        meta = scale[id(m.meta[0].weight)]
        stem = min(scale[id(p)] for n, p in named.items() if n.startswith("backbone.") and scale[id(p)] < head)
        assert head == meta == 1.0 and stem <= 0.5 ** 3, name


def test_cpu_training_is_fp32_without_checkpointing_and_returns_the_ema_weights() -> None:
    from covtoken.classifier.model import LesionClassifier
    from covtoken.classifier.train import train_classifier

    torch.manual_seed(0)
    m = LesionClassifier(build_feature_backbone("siglip-mini"), n_classes=3, meta_dim=0)
    recipe = {"frozen_epochs": 1, "finetune_epochs": 3, "batch_size": 8, "lr_head": 0.01, "lr": 0.01,
              "weight_decay": 0.0, "layer_decay": 0.75, "ema_decay": 0.5, "augment": ["hflip"],
              "bf16_on_gpu": True, "grad_checkpointing_on_gpu": True}
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    r = train_classifier(m, pixels=x, meta=None, y=y, recipe=recipe, seed=0)
    assert not r.bf16 and not r.grad_checkpointing and r.used_ema
    assert r.model is not m and [h["stage"] for h in r.history] == ["frozen", "finetune", "finetune", "finetune"]
    live, ema = dict(m.named_parameters()), dict(r.model.named_parameters())
    # timm's EMA copies the weights at its first step and averages from then on: not the live weights
    assert any(not torch.equal(live[k], ema[k]) for k in live)
