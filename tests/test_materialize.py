"""Raw data -> common layout -> a Hub dataset with separate image and mask configs; nothing private leaves."""
from __future__ import annotations

import uuid

import numpy as np
import pytest
from sealed_access import mask_array, mask_labels

from covtoken.data.catalog import load_dataset
from covtoken.data.materialize import (NotDeidentifiedError, check_publishable, dataset_card, load_hub_layout,
                                       push_dataset, write_hub_layout)
from g1_helpers import load_job

hub_emulator = pytest.importorskip("hub_emulator", reason="tests/hub_emulator.py (the local Hub emulator) is absent")
hub = hub_emulator.hub


def _card() -> str:
    return dataset_card(name="phantom", provenance={"id": "phantom-us", "revision": "generator-seed-4"}, n_images=6,
                        n_patients=3, licence="cc0-1.0", citation="none", kit_commit="0" * 40)


def _same(a, b) -> None:
    assert [i.image_id for i in a.items] == [i.image_id for i in b.items]
    for x, y in zip(a.items, b.items):
        assert x.patient_id == y.patient_id and x.modality == y.modality
        np.testing.assert_allclose(x.image, y.image, atol=0.5 / 255 + 1e-6)
        np.testing.assert_array_equal(mask_array(a.masks[x.image_id]), mask_array(b.masks[y.image_id]))


def test_round_trip_through_a_hub_repo_at_a_pinned_revision(hub, tmp_path):
    d = load_dataset("phantom-us", seed=4, n_patients=3, per_patient=2)
    write_hub_layout(d.items, d.masks, tmp_path / "ds", card=_card())
    assert (tmp_path / "ds" / "images" / "metadata.jsonl").is_file()
    assert "config_name: masks" in (tmp_path / "ds" / "README.md").read_text()
    local = load_dataset(str(tmp_path / "ds"))
    _same(local, d)
    repo = f"{hub.namespace}/covtoken-mat-{uuid.uuid4().hex[:8]}"
    sha = push_dataset(tmp_path / "ds", repo, message="v1")
    items, masks = load_hub_layout(f"hf://datasets/{repo}@{sha}", cache_dir=tmp_path / "cache")
    assert [i.image_id for i in items] == [i.image_id for i in d.items]
    remote = load_dataset(f"hf://datasets/{repo}@{sha}")
    assert remote.provenance["revision"] == sha and remote.provenance["id"] == repo
    with pytest.raises(ValueError, match="pin the dataset"):
        load_dataset(f"hf://datasets/{repo}")


def test_existing_output_is_refused_and_nothing_partial_is_left(tmp_path):
    d = load_dataset("phantom-us", seed=4, n_patients=2, per_patient=1)
    (tmp_path / "ds").mkdir()
    with pytest.raises(ValueError, match="exists"):
        write_hub_layout(d.items, d.masks, tmp_path / "ds", card=_card())
    bad = [d.items[0]]
    from covtoken.data.layout import ImageItem

    dicom_item = ImageItem(image=bad[0].image, image_id="x", patient_id="p", modality="CT", meta={"dicom": True})
    with pytest.raises(NotDeidentifiedError, match="has not been de-identified"):
        check_publishable([dicom_item])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


@pytest.mark.realdata
def test_materialize_job_refuses_raw_dicom_then_deidentifies(realdata, tmp_path, monkeypatch, capsys):
    job = load_job("materialize_dataset")
    src = realdata / "lung_pet_ct_dx"
    args = ["--dataset", "lung-pet-ct-dx", "--data-root", str(src), "--out", str(tmp_path / "raw")]
    assert job.main(args) == 2  # a user error: one line naming what is wrong, exit 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "has not been de-identified" in errors[0], errors
    assert job.main([*args, "--debug"]) == 2
    assert f"{NotDeidentifiedError.__name__}: " in capsys.readouterr().err  # --debug shows the traceback
    assert not (tmp_path / "raw").exists()
    monkeypatch.setenv("COVTOKEN_DEID_KEY", "a-test-key-that-is-long-enough")
    assert job.main(["--dataset", "lung-pet-ct-dx", "--data-root", str(src), "--out", str(tmp_path / "ok"),
                     "--deidentify", "--date-shift-days", "-100"]) == 0
    import csv

    rows = list(csv.DictReader(open(src / "index.csv")))
    secrets = {r["sop_instance_uid"] for r in rows} | {r["patient"] for r in rows} | {"Lung_Dx-A0001", "20070404"}
    blob = b"".join(p.read_bytes() for p in (tmp_path / "ok").rglob("*") if p.is_file())
    leaked = [s for s in secrets if s.encode() in blob]
    assert not leaked, leaked
    back = load_dataset(str(tmp_path / "ok"))
    assert len(back.items) == len(rows) and all(it.meta["deidentified"] for it in back.items)


@pytest.mark.realdata
def test_materialize_busi_sample_round_trip(realdata, tmp_path):
    job = load_job("materialize_dataset")
    assert job.main(["--dataset", "busi", "--data-root", str(realdata / "busi"), "--out", str(tmp_path / "b")]) == 0
    card = (tmp_path / "b" / "README.md").read_text()
    assert "license: cc0-1.0" in card and "Al-Dhabyani" in card
    _same(load_dataset(str(tmp_path / "b")), load_dataset("busi", root=realdata / "busi"))


def test_materialize_keeps_dx_labels_spdx_licence_and_says_what_was_deidentified(tmp_path):
    """HAM10000-like data: the 'dx' label reaches the eval-only config (G7 needs it), CC BY-NC stays CC-BY-NC-4.0."""
    from test_data_ham10000 import make

    job = load_job("materialize_dataset")
    src = make(tmp_path / "ham")
    assert job.main(["--dataset", "ham10000", "--data-root", str(src), "--out", str(tmp_path / "m")]) == 0
    card = (tmp_path / "m" / "README.md").read_text()
    assert "license: cc-by-nc-4.0" in card and "Licence (SPDX): CC-BY-NC-4.0" in card and "other" not in card
    assert "no DICOM header" in card and ".jpg" in card and "de-identified as DICOM" not in card
    assert "`dx`" in card
    back = load_dataset(str(tmp_path / "m"))
    orig = load_dataset("ham10000", root=src)
    for iid in orig.masks:
        assert mask_labels(back.masks[iid]) == mask_labels(orig.masks[iid])  # test-only look inside the seals
    assert {mask_labels(back.masks[i])["dx"] for i in back.masks} == {"nv", "mel"}


def test_materialize_refuses_an_unrecognised_licence_unless_stated(tmp_path):
    import json

    from test_data_checks import _folder_dataset

    job = load_job("materialize_dataset")
    root = _folder_dataset(tmp_path / "f", info={"name": "x", "licence": "ask the hospital", "modality": "US"},
                           index=None)
    with pytest.raises(SystemExit):
        job.main(["--dataset", "folder", "--data-root", str(root), "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()
    assert job.main(["--dataset", "folder", "--data-root", str(root), "--out", str(tmp_path / "m"),
                     "--licence", "CC-BY-4.0"]) == 0
    assert "license: cc-by-4.0" in (tmp_path / "m" / "README.md").read_text()
    assert json.loads((tmp_path / "m" / "masks" / "metadata.jsonl").read_text().splitlines()[0])["labels"] == "{}"
