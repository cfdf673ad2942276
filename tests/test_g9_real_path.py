"""The G9 job's real path on a synthetic folder in the HAM10000/ISIC layout (noise images made here, never real data):
refused in one line, before any data or download, when what a real run needs is missing; run through the same code
up to (and, with small local weights whose digests the test records, past) the point where real weights are needed."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from g1_helpers import copy_lock, load_job
from test_g9_evidence import pin, small_resnet_dir, small_siglip_dir

DX = ["nv", "mel", "bkl", "bcc", "akiec", "df", "vasc"]
SITES = ["back", "face", "trunk", "lower extremity", "upper extremity"]


def ham_folder(root: Path, n_lesions: int = 110, size: int = 32) -> Path:
    """``HAM10000_metadata.csv`` + ``images/<id>.jpg`` + ``masks/<id>_segmentation.png``, one noise image per lesion."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    with open(root / "HAM10000_metadata.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"])
        for i in range(n_lesions):
            iid = f"ISIC_{i:07d}"
            w.writerow([f"HAM_{i:07d}", iid, DX[i % len(DX)], "histo", str(float(20 + (i * 7) % 60)),
                        ["male", "female", "unknown"][i % 3], SITES[i % len(SITES)]])
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "images" / f"{iid}.jpg",
                                                                                       quality=95)
            m = np.zeros((size, size), np.uint8)
            m[8:20, 8:20] = 255
            Image.fromarray(m).save(root / "masks" / f"{iid}_segmentation.png")
    return root


@pytest.fixture(scope="module")
def ham(tmp_path_factory) -> Path:
    return ham_folder(tmp_path_factory.mktemp("ham") / "HAM10000")


@pytest.fixture(scope="module")
def local_weights(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("g9real")
    return {"siglip": small_siglip_dir(root / "siglip"), "resnet": small_resnet_dir(root / "resnet")}


def run_job(args: list[str], capsys) -> tuple[int, list[str]]:
    rc = load_job("g9_classifier").main(args)
    return rc, [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]


def base_args(tmp: Path, ham: Path) -> list[str]:
    return ["--dataset", "ham10000", "--data-root", str(ham), "--results", str(tmp / "r"),
            "--lock", str(copy_lock(tmp / "cfg")), "--threads", "1"]


def test_real_run_without_verifiable_weights_is_refused_before_any_data(tmp_path, ham, capsys):
    args = base_args(tmp_path, ham)
    rc, errors = run_job(args, capsys)
    assert rc == 2 and len(errors) == 1, errors
    assert ("G9 judges real files (ham10000) only under G9/real, with pinned, digest-verified weights for every arm; "
            "missing: backbone medsiglip-448: the registry records no sha256 of its weight file") in errors[0]
    assert not (tmp_path / "r").exists()  # refused before the run opened: nothing written
    # another entry does not get round it
    rc, errors = run_job([*args, "--lock-entry", "G9/embedded"], capsys)
    assert rc == 2 and len(errors) == 1 and "only under G9/real" in errors[0], errors
    # a local folder for the configured arm does not make an entry without a digest verifiable
    rc, errors = run_job([*args, "--weights", str(ham)], capsys)
    assert rc == 2 and "medsiglip-448: the registry records no sha256" in errors[0], errors
    # a baseline revision other than the pinned one can never be verified either; both are named
    rc, errors = run_job([*args, "--baseline-revision", "0" * 40], capsys)
    assert rc == 2 and "backbone resnet50: --revision " + "0" * 40 + " is not the pinned" in errors[0], errors
    assert not (tmp_path / "r").exists()


def test_weight_sources_are_checked_before_any_download(tmp_path, ham, capsys):
    args = base_args(tmp_path, ham)
    cnx = json.loads((Path(__file__).resolve().parent.parent / "configs" / "classifier" / "g9_ham10000.json").read_text())
    cnx["backbone"] = {"name": "convnextv2-tiny"}
    cnx["metadata"]["feature_schema"] = "ham10000_reduced.feature_schema.json"
    (tmp_path / "cnx.json").write_text(json.dumps(cnx))
    rc, errors = run_job([*args, "--classifier-config", str(tmp_path / "cnx.json")], capsys)
    assert rc == 2 and len(errors) == 1, errors
    assert errors[0].startswith("error: --revision: arm configured: convnextv2-tiny: no commit of "
                                "timm/convnextv2_tiny.fcmae_ft_in22k_in1k is pinned"), errors
    rc, errors = run_job([*args, "--weights", str(ham), "--revision", "a" * 40], capsys)
    assert rc == 2 and errors[0].startswith("error: --weights and --revision: backbone medsiglip-448"), errors
    rc, errors = run_job([*args, "--baseline-revision", "main"], capsys)
    assert rc == 2 and "--baseline-revision: arm baseline: resnet50: revision must be a full 40-hex" in errors[0]
    rc, errors = run_job(["--smoke", "--results", str(tmp_path / "r"), "--weights", str(ham)], capsys)
    assert rc == 2 and "siglip-mini (arm configured) is embedded" in errors[0], errors
    assert not (tmp_path / "r").exists()


def test_loaded_weights_that_fail_their_digest_are_refused_before_training(tmp_path, ham, local_weights, capsys,
                                                                           monkeypatch):
    """The options promise verifiable weights (registered digests, local folders); the baseline's bytes are not the
    registered ResNet-50 checkpoint: the run stops right after the backbones are built, before any training."""
    pin(monkeypatch, "medsiglip-448", local_weights["siglip"])
    args = [*base_args(tmp_path, ham), "--weights", str(local_weights["siglip"]),
            "--baseline-weights", str(local_weights["resnet"])]
    rc, errors = run_job(args, capsys)
    assert rc == 2 and len(errors) == 1, errors
    assert "backbone resnet50: the loaded weights are not a pinned, digest-verified pretrained checkpoint" in errors[0]
    assert "no weight file read has the registry's sha256 773525d5821d" in errors[0]
    from covtoken.runstore import read_ledger

    assert read_ledger(tmp_path / "r")[-1]["event"] == "refused"
    assert not list((tmp_path / "r").glob("g9-*.json"))


@pytest.mark.slow
def test_real_path_runs_to_an_audited_real_record_with_pinned_local_weights(tmp_path, ham, local_weights, capsys,
                                                                           monkeypatch):
    """Every arm's weights are a local folder whose digest the registry records: the run is real evidence under
    G9/real (on noise images: the test checks the path, not a result), and the audit recomputes the tier."""
    from covtoken.audit import audit_folder
    from covtoken.evidence import audit_evidence
    from covtoken.record import read_record

    pin(monkeypatch, "medsiglip-448", local_weights["siglip"])
    pin(monkeypatch, "resnet50", local_weights["resnet"])
    args = [*base_args(tmp_path, ham), "--weights", str(local_weights["siglip"]),
            "--baseline-weights", str(local_weights["resnet"])]
    rc, errors = run_job(args, capsys)
    assert rc == 0, errors
    [path] = sorted((tmp_path / "r").glob("g9-*.json"))
    rec = read_record(path)
    assert rec["evidence"] == "real" and rec["lock"]["entry"] == "G9/real"
    bb = rec["provenance"]["backbone"]
    assert bb["registry"] == "classifier" and bb["weights_origin"].startswith("override:")
    assert bb["arms"]["baseline"]["weights"]["name"] == "resnet50"
    assert audit_evidence(rec) == []
    report = audit_folder(tmp_path / "r", lock_path=tmp_path / "cfg" / "thresholds.lock.json",
                          allow_unproven_prereg=True, allow_dirty=True)
    assert report.ok, report.all_problems()
    # the shipped registry records no digest of MedSigLIP-448: the same record claims more than its facts allow
    monkeypatch.undo()
    assert "claims 'real', more than its facts allow" in dict(audit_evidence(rec))["evidence"]
