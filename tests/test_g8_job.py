"""G8 end to end on a tiny protocol: the pretraining stage never sees masks, labels or val/test images (bit-identical
outputs with permuted or zeroed masks; the ids fed are exactly the training patients'), a planted leak is caught by the
same check, and the --smoke job trains, checkpoints, resumes after a real kill (SIGKILL) to the same weights as an
unbroken run, and writes a G8 record the audit accepts."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT
from covtoken.audit import audit_folder
from covtoken.record import loads_strict, read_record
import g8_helpers
from test_label_leak import with_masks

TINY_PRETRAIN = {"global_size": 64, "local_size": 32, "global_views": 2, "local_views": 1, "batch_size": 8,
                 "steps": 4, "checkpoint_every": 2, "warmup_steps": 1, "num_slices": 16, "proj_hidden": 32,
                 "proj_dim": 16, "monitor_images": 16,
                 "encoder": {"timm_model": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 16, "embed_dim": 32,
                             "depth": 2, "num_heads": 2}}


def tiny_parameters() -> dict:
    tmpl = loads_strict((REPO_ROOT / "configs" / "gates" / "G8.json").read_text())["entries"]["embedded"]
    p = copy.deepcopy(tmpl["parameters"])
    p["dataset_options"] = {"n_patients": 24, "per_patient": 3, "size": 64}
    p["pretraining"].update(TINY_PRETRAIN)
    p.update({"shots": [1, 3], "primary_shots": 3, "n_episodes": 5, "n_boot": 200, "seg_positive_min": 0.25,
              "probe_cs": [0.1, 1.0],
              "min_patients_per_judged_split": 5})  # 24 patients leave 6 per judged split in the tiny protocol
    return p


def tiny_lock(dest: Path) -> Path:
    """A copy of the lock whose G8/embedded entry runs the tiny protocol."""
    return g8_helpers.tiny_lock(dest, "embedded", tiny_parameters())


@pytest.fixture(scope="module")
def setting():
    return g8_helpers.stage_setting("phantom-ct", tiny_parameters(), batch_size=16)


def stage_outputs(stage, data, setting, work: Path) -> dict:
    _, _, splits, P, cfg = setting
    res, inp = stage(data, splits, P, cfg, work)
    out = {f"feat:{k}": v for k, v in inp.features.items()}
    out.update({f"tok:{k}": v for k, v in inp.tokens.items()})
    out["ckpt"] = np.array([c["sha256"] for c in res.checkpoints])
    out["losses"] = res.losses
    out["fed"] = np.array(res.image_ids)
    return out


@pytest.mark.slow
def test_pretraining_stage_is_blind_to_masks_and_sees_only_training_patients(setting, tmp_path):
    job, data, splits, *_ = setting
    ref = stage_outputs(job.label_free_stage, data, setting, tmp_path / "orig")
    train = sorted(it.image_id for it in data.items if it.patient_id in set(splits["train"]))
    held_out = {it.image_id for it in data.items if it.patient_id not in set(splits["train"])}
    assert list(ref["fed"]) == train and not held_out & set(ref["fed"])
    g8_helpers.assert_blind_to_masks(lambda d, folder: stage_outputs(job.label_free_stage, d, setting, folder), data,
                                     ref, tmp_path)


@pytest.mark.slow
def test_a_planted_leak_in_pretraining_is_caught(setting, tmp_path):
    job, data, splits, P, cfg = setting
    from covtoken.eval.ssl import image_labels

    def leaky(d, sp, params, c, work):  # leaves the first lesion image out of pretraining: a label-driven choice
        ids = [it.image_id for it in d.items]
        y = dict(zip(ids, image_labels(d.masks, ids)))
        train = {it.image_id for it in d.items if it.patient_id in set(sp["train"])}
        drop = next((i for i in sorted(train) if y[i] == 1), None)
        keep = [it for it in d.items if it.image_id != drop]
        from covtoken.data.catalog import LoadedDataset

        return job.label_free_stage(LoadedDataset(keep, d.masks, d.provenance), sp, params, c, work)

    ref = stage_outputs(leaky, data, setting, tmp_path / "orig")
    out = stage_outputs(leaky, with_masks(data, "zeroed"), setting, tmp_path / "zeroed")
    assert not np.array_equal(ref["fed"], out["fed"])


def _job_cmd(results: Path, work: Path, lock: Path, run_id: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "jobs" / "g8_lejepa_pretrain.py"), "--smoke", "--results", str(results),
            "--work-dir", str(work), "--lock", str(lock), "--threads", "1", "--run-id", run_id]


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """Run the job, SIGKILL it once its first checkpoint exists, run the same command again."""
    tmp = tmp_path_factory.mktemp("g8")
    lock = tiny_lock(tmp / "lock")
    first, manifest = g8_helpers.kill_and_resume(lambda r, w, rid: _job_cmd(r, w, lock, rid), tmp,
                                                 run_id="g8-20261202t000000-a1b2c3",
                                                 unbroken_id="g8-20261202t000000-d4e5f6")
    return tmp, lock, first, manifest


@pytest.mark.slow
def test_smoke_job_resumes_after_a_kill_to_the_same_weights(killed_and_resumed):
    g8_helpers.assert_resumed_like_unbroken(*killed_and_resumed[:1], *killed_and_resumed[2:])


@pytest.mark.slow
def test_smoke_record_is_audited_and_complete(killed_and_resumed):
    tmp, lock, *_ = killed_and_resumed
    rec_path = next((tmp / "results").glob("*.json"))
    # a tmp lock cannot prove pre-registration, and tests run on a working tree: the two explicit allowances
    report = audit_folder(rec_path.parent, lock_path=lock, allow_unproven_prereg=True, allow_dirty=True)
    assert report.ok, report.all_problems()
    rec = read_record(rec_path)
    assert rec["gate_id"] == "G8" and rec["decision"] in ("pass", "fail", "inconclusive")
    assert rec["evidence"] == "flow-check"
    for m in ("linear_probe_auroc_gain", "knn3_balanced_accuracy_gain", "linear_probe_auroc_pixels",
              "seg_dice_trained", "seg_dice_random_init"):
        assert rec["metrics"][m]["ci"] is not None, m
    g = rec["metrics"]["linear_probe_auroc_gain"]
    assert g["value"] == pytest.approx(rec["metrics"]["linear_probe_auroc_trained"]["value"]
                                       - rec["metrics"]["linear_probe_auroc_random_init"]["value"])
    art = {a["name"] if "name" in a else a["path"] for a in rec["artefacts"]}
    assert any("encoder.safetensors" in a for a in art) and any("pretraining.json" in a for a in art)
    pre = json.loads((rec_path.parent / "artefacts" / rec["run_id"] / "pretraining.json").read_text())
    assert [c["step"] for c in pre["checkpoints"]] == [2, 4]
    assert all("rankme_embedding" in c["monitor"] for c in pre["checkpoints"])
    sel = json.loads((rec_path.parent / "artefacts" / rec["run_id"] / "selection.json").read_text())
    assert "SSL loss is never used" in sel["checkpoint"]["rule"]
    assert rec["provenance"]["parameters"]["pretraining"]["lam"] == 0.05
    ev = json.loads((rec_path.parent / "artefacts" / rec["run_id"] / "evaluation.json").read_text())
    assert [e["recipe"] for e in ev["evaluations"]] == ["g8.probes", "g8.segmentation"]
    # the segmentation inputs are the fitted classifiers' token decisions, not the tokens themselves
    seg = np.load(rec_path.parent / "artefacts" / rec["run_id"] / ev["evaluations"][1]["inputs"])
    assert not [k for k in seg.files if k.startswith("tok.")] and seg["dec.trained.test"].dtype == bool


@pytest.mark.slow
def test_an_edited_metric_fails_the_audit(killed_and_resumed, tmp_path):
    import shutil

    tmp, lock, *_ = killed_and_resumed
    shutil.copytree(tmp / "results", tmp_path / "results")
    rec_path = next((tmp_path / "results").glob("*.json"))
    rec_path.chmod(0o644)
    doc = json.loads(rec_path.read_text())
    doc["metrics"]["linear_probe_auroc_gain"]["value"] += 0.1
    rec_path.write_text(json.dumps(doc))
    report = audit_folder(rec_path.parent, lock_path=lock, allow_unproven_prereg=True, allow_dirty=True)
    assert not report.ok and any("linear_probe_auroc_gain" in p for p in report.all_problems())


@pytest.mark.slow
def test_the_audit_recomputes_the_probes_without_refitting(killed_and_resumed, monkeypatch):
    """The recomputation reads the stored probe decisions: an optimiser's last bits depend on the machine's BLAS,
    so a recipe that refits would make the audit of a committed record fail on other hardware."""
    from sklearn.linear_model import LogisticRegression

    tmp, lock, *_ = killed_and_resumed

    def no_fit(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the audit refitted a probe")

    monkeypatch.setattr(LogisticRegression, "fit", no_fit)
    report = audit_folder(tmp / "results", lock_path=lock, allow_unproven_prereg=True, allow_dirty=True)
    assert report.ok, report.all_problems()
