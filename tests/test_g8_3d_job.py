"""G8's 3-D mode (``--dims 3``) end to end on a tiny protocol: the volumetric phantoms, the volume-level labels, the
label-free 3-D stage (bit-identical with permuted or zeroed masks, pretraining fed exactly the training patients'
volumes), the choice of lock entry (``<entry>-3d``, refused in one line when the protocol's dims differ), and the job:
trains, checkpoints, resumes after a real SIGKILL to the same weights as an unbroken run, and writes a volume-level
G8 record the audit recomputes."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from conftest import REPO_ROOT
from covtoken.audit import audit_folder
from covtoken.data.catalog import load_dataset
from covtoken.evidence import allowed_entry, entry_tier
from covtoken.record import loads_strict, read_record
import g8_helpers
from test_label_leak import with_masks

TINY3D = {"steps": 60, "checkpoint_every": 20, "batch_size": 4, "views": 2, "num_slices": 16,
          "input_size": [8, 16, 16], "patch_size": [4, 8, 8], "proj_dim": 8, "monitor_volumes": 8,
          "vit": {"hidden_size": 32, "mlp_dim": 64, "num_layers": 2, "num_heads": 2}}


def tiny_parameters() -> dict:
    tmpl = loads_strict((REPO_ROOT / "configs" / "gates" / "G8.json").read_text())["entries"]["embedded-3d"]
    p = copy.deepcopy(tmpl["parameters"])
    p["dataset_options"] = {"n_patients": 24, "per_patient": 8, "size": 32}
    p["pretraining"].update(TINY3D)
    p.update({"shots": [1, 3], "primary_shots": 3, "n_episodes": 5, "n_boot": 200, "probe_cs": [0.1, 1.0],
              "data_fractions": [0.5, 1.0], "min_patients_per_judged_split": 5})
    return p


def tiny_lock(dest: Path) -> Path:
    """A copy of the lock whose G8/embedded-3d entry runs the tiny protocol."""
    return g8_helpers.tiny_lock(dest, "embedded-3d", tiny_parameters())


# ------------------------------------------------------------------------------------------------ the data and labels
def test_volume_phantoms_are_volumes_with_balanced_volume_labels():
    from covtoken.eval.ssl import image_labels, pixel_masks, volume_labels

    a = load_dataset("phantom-ct3d", seed=3, n_patients=40, per_patient=12, size=32)
    b = load_dataset("phantom-ct3d", seed=3, n_patients=40, per_patient=12, size=32)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a.items, b.items))  # a seed gives the same arrays
    assert a.provenance["id"] == "phantom-ct3d" and a.provenance["content_digest"] == b.provenance["content_digest"]
    slices: dict[str, list[str]] = {}
    for it in a.items:
        assert it.meta["slice_index"] == int(it.image_id[-2:])
        slices.setdefault(it.patient_id, []).append(it.image_id)
    assert all(len(v) == 12 for v in slices.values())
    ids = sorted(slices)
    y = volume_labels(a.masks, slices, ids)
    spans: list[int] = []
    assert 0.25 < y.mean() < 0.75, "about half the patients have no nodule"
    for pid, label in zip(ids, y):
        per_slice = image_labels(a.masks, slices[pid])
        assert label == per_slice.max()
        if label:  # a nodule is one 3-D object: 1-3 connected components in the stacked mask, most over > 1 slice
            comps, n = ndimage.label(np.stack(pixel_masks(a.masks, slices[pid])), structure=np.ones((3, 3, 3)))
            assert 1 <= n <= 3, (pid, n)
            spans += [len(np.unique(np.nonzero(comps == k)[0])) for k in range(1, n + 1)]
    assert np.mean(np.array(spans) > 1) > 0.5, spans


def test_a_real_3d_entry_judges_real_runs_only():
    assert entry_tier("G8/real-3d") == "real" and entry_tier("G8/sample-3d") == "sample"
    assert entry_tier("G8/embedded-3d") == entry_tier("G8/embedded-trained") == "flow-check"
    assert not allowed_entry("flow-check", "G8/real-3d") and allowed_entry("flow-check", "G8/embedded-3d")


# -------------------------------------------------------------------------------------------- the label-free stage
@pytest.fixture(scope="module")
def setting():
    return g8_helpers.stage_setting("phantom-ct3d", tiny_parameters(), batch_size=8, dims=3)


def stage_outputs(data, setting, work: Path) -> dict:
    job, _, splits, P, cfg = setting
    res, inp = job.label_free_stage_3d(data, splits, P, cfg, work)
    out = {f"feat:{k}": v for k, v in inp.features.items()}
    out["ckpt"] = np.array([c["sha256"] for c in res.checkpoints])
    out["losses"] = res.losses
    out["fed"] = np.array(res.volume_ids)
    out["rows"] = np.concatenate([inp.rows[k] for k in ("train", "val", "test")])
    out["slices"] = np.array([s for v in inp.image_ids for s in inp.slices_of[v]])
    return out


@pytest.mark.slow
def test_3d_stage_is_blind_to_masks_and_pretrains_on_training_patients_only(setting, tmp_path):
    _, data, splits, *_ = setting
    ref = stage_outputs(data, setting, tmp_path / "orig")
    assert list(ref["fed"]) == sorted(splits["train"])  # one volume per training patient, nobody else's
    assert not set(ref["fed"]) & (set(splits["val"]) | set(splits["test"]))
    assert {f"feat:{a}" for a in ("random_init", "pixels", "step000020", "step000040", "step000060")} <= set(ref)
    g8_helpers.assert_blind_to_masks(lambda d, folder: stage_outputs(d, setting, folder), data, ref, tmp_path)


@pytest.mark.slow
def test_a_planted_label_driven_choice_in_the_3d_stage_is_caught(setting, tmp_path):
    """The same check catches a stage that leaves the first positive training volume out of pretraining."""
    job, data, splits, P, cfg = setting
    from covtoken.data.catalog import LoadedDataset
    from covtoken.eval.ssl import image_labels

    def leaky(d):  # noqa: ANN001, ANN202
        ids = [it.image_id for it in d.items]
        y = dict(zip(ids, image_labels(d.masks, ids)))
        drop = next((p for p in sorted(splits["train"]) if any(y[i] for i in ids if i.startswith(p))), None)
        return LoadedDataset([it for it in d.items if it.patient_id != drop], d.masks, d.provenance)

    res_a, _ = job.label_free_stage_3d(leaky(data), splits, P, cfg, tmp_path / "a", stop_after=1)
    res_b, _ = job.label_free_stage_3d(leaky(with_masks(data, "zeroed")), splits, P, cfg, tmp_path / "b",
                                       stop_after=1)
    assert res_a.volume_ids != res_b.volume_ids


# --------------------------------------------------------------------------------------------------------- the job
def _job_cmd(results: Path, work: Path, lock: Path, run_id: str, *extra: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "jobs" / "g8_lejepa_pretrain.py"), "--smoke", "--dims", "3", "--dataset",
            "phantom-ct3d", "--results", str(results), "--work-dir", str(work), "--lock", str(lock), "--threads", "1",
            "--run-id", run_id, *extra]


@pytest.mark.parametrize("extra, says", [
    (("--lock-entry", "G8/embedded"), "--dims 3: lock entry G8/embedded locks a 2-D protocol"),
    (("--dims", "4"), "--dims 4: expected 2 (images) or 3 (volumes)"),
])
def test_a_protocol_of_other_dims_is_refused_in_one_line(tmp_path, extra, says):
    cmd = _job_cmd(tmp_path / "r", tmp_path / "w", REPO_ROOT / "configs" / "thresholds.lock.json",
                   "g8-20261202t000000-0a0b0c", *extra)
    rc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert rc.returncode == 2, rc.stderr[-2000:]
    errors = [ln for ln in rc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], rc.stderr[-2000:]
    assert "Traceback" not in rc.stderr and not list((tmp_path / "r").glob("*.json"))


def test_2d_run_under_a_3d_entry_is_refused(tmp_path):
    cmd = [sys.executable, str(REPO_ROOT / "jobs" / "g8_lejepa_pretrain.py"), "--smoke", "--lock-entry",
           "G8/embedded-3d", "--results", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w")]
    rc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert rc.returncode == 2 and "--dims 2: lock entry G8/embedded-3d locks a 3-D protocol" in rc.stderr, rc.stderr


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """Run the 3-D job, SIGKILL it once its first checkpoint exists, run the same command again; and an unbroken
    run elsewhere."""
    tmp = tmp_path_factory.mktemp("g8-3d")
    lock = tiny_lock(tmp / "lock")
    first, manifest = g8_helpers.kill_and_resume(lambda r, w, rid: _job_cmd(r, w, lock, rid), tmp,
                                                 run_id="g8-20261202t000000-3d3d3d",
                                                 unbroken_id="g8-20261202t000000-3e3e3e", poll=0.01)
    assert len(first) < 3, "the kill came after pretraining had finished"
    return tmp, lock, first, manifest


@pytest.mark.slow
def test_3d_job_resumes_after_a_kill_to_the_same_weights_and_metrics(killed_and_resumed):
    a, b = g8_helpers.assert_resumed_like_unbroken(*killed_and_resumed[:1], *killed_and_resumed[2:])
    assert a["metrics"] == b["metrics"] and a["decision"] == b["decision"]


@pytest.mark.slow
def test_3d_record_is_volume_level_and_audited(killed_and_resumed, tmp_path):
    import shutil

    tmp, lock, *_ = killed_and_resumed
    rec_path = next((tmp / "results").glob("*.json"))
    report = audit_folder(rec_path.parent, lock_path=lock, allow_unproven_prereg=True, allow_dirty=True)
    assert report.ok, report.all_problems()
    rec = read_record(rec_path)
    assert rec["lock"]["entry"] == "G8/embedded-3d" and rec["evidence"] == "flow-check"
    assert rec["provenance"]["parameters"]["dims"] == 3
    assert rec["provenance"]["backbone"]["name"] == "monai-vit3d+lejepa"
    art = rec_path.parent / "artefacts" / rec["run_id"]
    pre = json.loads((art / "pretraining.json").read_text())
    assert pre["dims"] == 3 and [c["step"] for c in pre["checkpoints"]] == [20, 40, 60]
    splits = json.loads((art / "splits.json").read_text())
    assert pre["volumes_fed"]["patients"] == sorted(splits["membership"]["train"])
    n_test = len(splits["membership"]["test"])
    m = rec["metrics"]
    assert m["linear_probe_auroc_gain"]["n"] == {"patients": n_test, "images": n_test}  # one row per test volume
    assert "seg_dice_trained" not in m and m["linear_probe_auroc_pixels"]["ci"] is not None
    ev = json.loads((art / "evaluation.json").read_text())
    assert [e["recipe"] for e in ev["evaluations"]] == ["g8.probes"]
    arrays = np.load(art / ev["evaluations"][0]["inputs"])
    assert arrays["labels"].shape == (24,) and 0 < arrays["labels"].mean() < 1  # volume labels, both classes
    assert arrays["feat.pixels"].shape == (24, 4 * 8 * 8)
    card = next((tmp / "results" / "model_cards").glob("*.md")).read_text()
    assert "MONAI `ViT` (spatial_dims=3" in card and "volumes" in card
    # a forged volume label changes the recomputed metrics: the audit fails
    shutil.copytree(tmp / "results", tmp_path / "results")
    npz = tmp_path / "results" / "artefacts" / rec["run_id"] / ev["evaluations"][0]["inputs"]
    data = dict(np.load(npz))
    data["labels"] = data["labels"].copy()
    te = data["rows.test"]
    data["labels"][te[:3]] = 1 - data["labels"][te[:3]]
    npz.chmod(0o644)
    np.savez(npz, **data)
    report = audit_folder(tmp_path / "results", lock_path=lock, allow_unproven_prereg=True, allow_dirty=True)
    assert not report.ok
