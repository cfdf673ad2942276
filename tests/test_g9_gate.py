"""G9 end to end on small data: metadata that carries the label makes C1 pass only with the metadata branch; the
calibrate stage never sees test labels (leak test, with the attack that calibrates on test patients); the saved
model folder serves the trained model's predictions; the --smoke job writes an audited record and artefacts."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT
from covtoken.classifier.config import CONFIG_DIR, ClassifierConfig
from covtoken.classifier.experiment import fit_stage, sample_other
from covtoken.classifier.predictor import ModelDirError, Predictor, save_model_dir
from covtoken.data.catalog import LoadedDataset, load_dataset
from covtoken.data.layout import EvalMasks, ImageItem, SealedMask
from covtoken.data.splits import split_patients
from covtoken.eval.classification import open_class_labels, softmax
from covtoken.eval.g9 import evaluate_g9
from covtoken.lock import ThresholdLock, judge

FAST = {"frozen_epochs": 2, "finetune_epochs": 1, "batch_size": 32, "lr_head": 0.01, "lr": 0.003,
        "weight_decay": 0.0, "layer_decay": 0.75, "ema_decay": 0.5, "augment": []}


def small_config(name: str, recipe: dict | None = None, **changes: object) -> ClassifierConfig:
    doc = json.loads((CONFIG_DIR / name).read_text())
    doc = copy.deepcopy(doc)
    doc["recipe"] = dict(recipe or FAST)
    for k, v in changes.items():
        doc[k] = v
    return ClassifierConfig.from_dict(doc, base=CONFIG_DIR)


@pytest.fixture(scope="module")
def criteria():
    from covtoken.lock import gate_template_entry

    return gate_template_entry("G9/embedded")["criteria"]


# ------------------------------------------------------------------------------------------------ C1 needs metadata
def metadata_task(n_patients: int = 90, seed: int = 0) -> LoadedDataset:
    """Images are pure noise; the diagnosis is a function of the questionnaire's site alone."""
    rng = np.random.default_rng(seed)
    sites = ["back", "trunk", "face"]
    dx_of = {"back": "nevus", "trunk": "melanoma", "face": "bcc"}
    items, masks = [], {}
    for p in range(n_patients):
        for k in range(2):
            iid = f"m{p:03d}-{k}"
            site = sites[int(rng.integers(3))]
            items.append(ImageItem(image=rng.random((16, 16, 3)).astype(np.float32), image_id=iid,
                                   patient_id=f"m{p:03d}", modality="dermoscopy",
                                   meta={"site": site, "age": float(rng.uniform(20, 80)), "sex": "female"}))
            mask = np.zeros((16, 16), bool)
            mask[4:8, 4:8] = True
            masks[iid] = SealedMask(mask, source=iid, labels={"dx": dx_of[site]})
    return LoadedDataset(items, EvalMasks(masks, items), {"id": "metadata-task", "revision": "seed-0"})


def c1_outcome(data: LoadedDataset, configured: ClassifierConfig, baseline: ClassifierConfig, criteria) -> dict:
    splits = split_patients([it.patient_id for it in data.items], fractions={"train": 0.5, "calib": 0.25,
                                                                             "test": 0.25}, seed=0)
    fit = fit_stage(data, splits, {"configured": configured, "baseline": baseline}, seed=0)
    head = fit.arms["configured"]
    logits = {"configured": head.logits["test"], "full": head.logits["test"],  # C2 is not under test here
              "baseline": fit.arms["baseline"].logits["test"]}
    y = open_class_labels(data.masks, fit.ids["test"], key="dx", classes=configured.labels,
                          other=configured.labels[-1])
    sets = np.ones((len(y), len(configured.labels)), dtype=int)
    res = evaluate_g9(logits=logits, tta_logits=[head.logits["test/identity"]], y=y, patients=fit.patients["test"],
                      labels=configured.labels, temperature=1.0, abstain_threshold=0.0, prediction_sets=sets,
                      alpha=0.1, n_calibration=len(fit.ids["calib"]), top_k=3, n_boot=500, ci_level=0.95, seed=0)
    _, judged, _ = judge(criteria, res.metrics)
    return {"C1": next(c["outcome"] for c in judged if c["id"] == "C1_beats_baseline"),
            "delta": res.metrics["delta_top1_configured_baseline"]}


@pytest.mark.slow
def test_c1_passes_only_with_the_metadata_branch(criteria):
    data = metadata_task()
    site_only = {"feature_schema": str(Path(__file__).parent / "data" / "g9_site.feature_schema.json")}
    recipe = {**FAST, "frozen_epochs": 12, "finetune_epochs": 0, "lr_head": 0.03}
    with_meta = small_config("g9_phantom.json", recipe, metadata=site_only, tta=["identity"])
    no_meta = small_config("g9_phantom.json", recipe, metadata={"feature_schema": None}, tta=["identity"])
    baseline = small_config("g9_phantom_baseline.json", recipe, metadata={"feature_schema": None})
    ok = c1_outcome(data, with_meta, baseline, criteria)
    assert ok["C1"] == "met", ok
    assert ok["delta"]["value"] > 0.3
    blind = c1_outcome(data, no_meta, baseline, criteria)
    assert blind["C1"] != "met", blind


# ------------------------------------------------------------------------------------------------ leak test
def with_test_labels(data: LoadedDataset, test_ids: list[str], how: str, seed: int = 0) -> LoadedDataset:
    """The same data with the test images' diagnoses permuted or zeroed (constant)."""
    from sealed_access import mask_array, mask_labels

    old = {iid: data.masks[iid] for iid in data.masks}
    dx = [mask_labels(old[i])["dx"] for i in test_ids]
    new_dx = list(np.random.default_rng(seed).permutation(dx)) if how == "permute" else ["nevus"] * len(dx)
    assert new_dx != dx
    masks = dict(old)
    for iid, d in zip(test_ids, new_dx):
        masks[iid] = SealedMask(mask_array(old[iid]), source=old[iid].source, labels={"dx": str(d)})
    return LoadedDataset(data.items, EvalMasks(masks, data.items), data.provenance)


@pytest.fixture(scope="module")
def leak_setup():
    data = load_dataset("phantom-derm-classes", seed=5, n_patients=24, per_patient=2, size=32)
    splits = split_patients([it.patient_id for it in data.items], fractions={"train": 0.5, "calib": 0.25,
                                                                             "test": 0.25}, seed=0)
    arms = {"configured": small_config("g9_phantom.json", tta=["identity", "hflip"]),
            "full": small_config("g9_phantom.json").with_feature_schema("phantom_full.feature_schema.json"),
            "baseline": small_config("g9_phantom_baseline.json")}
    fit = fit_stage(data, splits, arms, seed=0)
    return data, splits, arms, fit


def _fingerprint(fit) -> tuple:
    cal = fit.calibration
    return (cal.temperature, cal.conformal_qhat, cal.abstain_threshold,
            tuple(np.asarray(z).tobytes() for arm in fit.arms.values() for _, z in sorted(arm.logits.items())),
            tuple(fit.train_rows))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["permute", "zero"])
def test_fit_and_calibrate_never_see_test_labels(leak_setup, how):
    data, splits, arms, fit = leak_setup
    altered = with_test_labels(data, fit.ids["test"], how)
    again = fit_stage(altered, splits, arms, seed=0)
    assert _fingerprint(again) == _fingerprint(fit)


@pytest.mark.slow
def test_leak_test_catches_calibration_on_test_patients(leak_setup):
    """The attack: calibrate on test patients. Permuting test labels then moves the temperature - caught."""
    data, splits, arms, _ = leak_setup
    one = {"configured": arms["configured"]}  # the attack is on calibration: one arm is enough to show it
    honest = fit_stage(data, splits, one, seed=0, calibrate_on="test")
    altered = fit_stage(with_test_labels(data, honest.ids["test"], "permute"), splits, one, seed=0,
                        calibrate_on="test")
    assert _fingerprint(altered) != _fingerprint(honest)
    assert altered.calibration.temperature != honest.calibration.temperature


# ------------------------------------------------------------------------------------------------ serving
@pytest.mark.slow
def test_predictor_from_dir_serves_the_trained_model(leak_setup, tmp_path):
    data, _, arms, fit = leak_setup
    head = fit.arms["configured"]
    files = save_model_dir(tmp_path, model=head.trained.model, cfg=arms["configured"], calibration=fit.calibration,
                           metrics={"top1": 0.5}, run_id="g9-test")
    assert {"model.safetensors", "config.json", "labels.txt", "feature_schema.json", "metrics.json"} <= set(files)
    pred = Predictor.from_dir(tmp_path)
    by_id = {it.image_id: it for it in data.items}
    test_items = [by_id[i] for i in fit.ids["test"]]
    z = pred.logits([it.image for it in test_items], [dict(it.meta) for it in test_items])
    np.testing.assert_allclose(z, head.logits["test"], rtol=0, atol=1e-5)
    out = pred.predict([test_items[0].image], [dict(test_items[0].meta)])[0]
    p = softmax(head.logits["test"][:1], fit.calibration.temperature)[0]
    assert [c for c, _ in out.top_k] == [pred.labels[i] for i in np.argsort(-p)[:3]]
    assert out.top_k[0][1] == pytest.approx(p.max(), abs=1e-5)
    assert out.abstain == (p.max() < fit.calibration.abstain_threshold)
    assert out.prediction_set == [pred.labels[i] for i in range(len(p)) if 1 - p[i] <= fit.calibration.conformal_qhat]
    # a missing answer is encoded as missing; an unknown answer is refused
    pred.predict([test_items[0].image], [{}])
    with pytest.raises(ValueError, match="unknown category"):
        pred.predict([test_items[0].image], [{**test_items[0].meta, "site": "elbow"}])


@pytest.mark.slow
def test_model_dir_tampering_is_refused(leak_setup, tmp_path):
    _, _, arms, fit = leak_setup
    save_model_dir(tmp_path, model=fit.arms["configured"].trained.model, cfg=arms["configured"],
                   calibration=fit.calibration)
    labels = tmp_path / "labels.txt"
    labels.write_text(labels.read_text().replace("melanoma", "benign"))
    with pytest.raises(ModelDirError, match="labels.txt"):
        Predictor.from_dir(tmp_path)
    (tmp_path / "labels.txt").unlink()
    with pytest.raises(ModelDirError, match="missing"):
        Predictor.from_dir(tmp_path)


def test_other_is_sampled_and_listed_classes_are_kept():
    y = np.array([0, 1, 2, 2, 2, 2, 1, 2, 0, 2])
    keep = sample_other(y, 2, 0.5, seed=0)
    assert set(np.nonzero(y != 2)[0]) <= set(keep) and (y[keep] == 2).sum() == 3


def test_shipped_gate_template_locks_the_config_digests():
    from covtoken.classifier.report import config_digests
    from covtoken.lock import gate_template

    for entry, pre in (("embedded", "phantom"), ("real", "ham10000")):
        P = gate_template("G9")["entries"][entry]["parameters"]
        arms = {"configured": ClassifierConfig.load(P["classifier_config"]),
                "baseline": ClassifierConfig.load(P["baseline_config"])}
        arms["full"] = arms["configured"].with_feature_schema(P["full_feature_schema"])
        assert config_digests(arms) == P["config_digests"], entry


def test_edited_config_fails_the_digest_check():
    from covtoken.classifier.report import check_config_digests, config_digests
    from covtoken.lock import LockError

    arms = {"configured": ClassifierConfig.load("g9_phantom.json"), "baseline": small_config("g9_phantom.json")}
    arms["full"] = arms["configured"]
    locked = {"config_digests": config_digests(arms)}
    check_config_digests(locked, arms, overridden=False)
    arms["baseline"] = small_config("g9_phantom_baseline.json")
    with pytest.raises(LockError, match="baseline"):
        check_config_digests(locked, arms, overridden=False)


# ------------------------------------------------------------------------------------------------ the job
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The job's --smoke flow on a reduced copy of the embedded entry, locked through the kit's lock tooling."""
    from covtoken.classifier.report import config_digests
    from covtoken.lock import gate_template, lock_entry, write_lock
    from g1_helpers import load_job

    tmp = tmp_path_factory.mktemp("g9")
    for name, src in (("cfg.json", "g9_phantom.json"), ("base.json", "g9_phantom_baseline.json")):
        doc = json.loads((CONFIG_DIR / src).read_text())
        doc["recipe"] = dict(FAST)
        doc["metadata"]["feature_schema"] = str(CONFIG_DIR / doc["metadata"]["feature_schema"])
        (tmp / name).write_text(json.dumps(doc))
    tpl = gate_template("G9")
    entry = copy.deepcopy(tpl["entries"]["embedded"])
    P = entry["parameters"]
    P.update(dataset_options={"n_patients": 40, "per_patient": 2, "size": 32}, classifier_config=str(tmp / "cfg.json"),
             baseline_config=str(tmp / "base.json"), n_boot=200)
    arms = {"configured": ClassifierConfig.load(tmp / "cfg.json"), "baseline": ClassifierConfig.load(tmp / "base.json")}
    arms["full"] = arms["configured"].with_feature_schema(P["full_feature_schema"])
    P["config_digests"] = config_digests(arms)
    doc = json.loads((REPO_ROOT / "configs" / "thresholds.lock.json").read_text())
    doc = lock_entry(doc, gate_id="G9", claim=tpl["claim"], name="embedded", criteria=entry["criteria"],
                     parameters=P, calibration={**entry["calibration"], "locked_at": "test"}, supersede=True)
    lock = write_lock(doc, tmp / "thresholds.lock.json")
    results = tmp / "results"
    rc = load_job("g9_classifier").main(["--smoke", "--results", str(results), "--lock", str(lock), "--threads", "1"])
    assert rc == 0
    records = sorted(results.glob("g9-*.json"))
    assert len(records) == 1
    return records[0], lock


@pytest.mark.slow
def test_smoke_record_is_audited_and_serves(smoke_run):
    from covtoken.audit import audit_folder
    from covtoken.record import read_record

    path, lock = smoke_run
    # a tmp lock cannot be proven pre-registered from git, and tests run on a working tree: allowed explicitly
    report = audit_folder(path.parent, lock_path=lock, allow_unproven_prereg=True, allow_dirty=True)
    assert report.ok, report.all_problems()
    assert rec_evidence(path) == "flow-check"
    rec = read_record(path)
    assert rec["gate_id"] == "G9" and {c["id"] for c in rec["criteria"]} == {
        "C1_beats_baseline", "C2_reduced_noninferior", "C3_conformal_coverage"}
    art = path.parent / "artefacts" / rec["run_id"]
    metrics = json.loads((art / "metrics.json").read_text())
    assert metrics["metrics"] == rec["metrics"] and metrics["run_id"] == rec["run_id"]
    pred = Predictor.from_dir(art)
    data = load_dataset("phantom-derm-classes", seed=0, n_patients=3, per_patient=1, size=32)
    out = pred.predict([it.image for it in data.items], [dict(it.meta) for it in data.items])
    assert len(out) == 3 and all(len(o.top_k) == 3 for o in out)
    assert "delta_top1_tta" in rec["metrics"] and "TTA" in " ".join(rec["notes"])
    assert ThresholdLock.load(lock).entry("G9/embedded").parameters["n_boot"] == 200


@pytest.mark.slow
def test_paper_section_and_risk_coverage_figure_render_from_the_record(smoke_run):
    from covtoken.paper.figures import FIGURES, RecordInput
    from covtoken.paper.render import parse_draft, render
    from covtoken.record import read_record

    path, _ = smoke_run
    rec = read_record(path)
    draft = parse_draft(REPO_ROOT / "paper" / "sections" / "g9_classifier.md")
    assert set(draft.records) == {"g9"}
    body, used = render(draft, {"g9": rec}, figure=lambda name, where: f"[figure {name}]")
    assert f"{rec['metrics']['top1']['value']:.3f}" in body and "[figure g9_risk_coverage(g9)]" in body
    fig, caption, inputs = FIGURES["g9_risk_coverage"]([RecordInput("g9", path, rec)])
    assert rec["run_id"] in caption and inputs and inputs[0].name == "g9_tables.json"
    ax = fig.axes[0]
    assert len(ax.lines[0].get_xdata()) == len(json.loads(inputs[0].read_text())["risk_coverage"]["coverage"])


def rec_evidence(path: Path) -> str:
    return json.loads(path.read_text())["evidence"]
