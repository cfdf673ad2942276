"""KiTS23 / MSD folder layouts through the catalog, on small NIfTI volumes written here."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from covtoken.data.catalog import load_dataset
from sealed_access import mask_array


def _case(path_img, path_seg, rng, *, tumour_label=2, shape=(24, 20, 9)):
    img = rng.normal(40, 20, shape).astype(np.float32)
    seg = np.zeros(shape, np.uint8)
    seg[5:15, 5:15, :] = 1
    seg[8:11, 8:11, 2:7] = tumour_label
    aff = np.diag([0.8, 0.8, 3.0, 1.0])
    nib.save(nib.Nifti1Image(img, aff), path_img)
    nib.save(nib.Nifti1Image(seg, aff), path_seg)


def test_kits23_layout_every_fourth_slice_and_tumour_only(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("case_00000", "case_00001"):
        (tmp_path / c).mkdir()
        _case(tmp_path / c / "imaging.nii.gz", tmp_path / c / "segmentation.nii.gz", rng)
    d = load_dataset("kits23", root=tmp_path)
    assert sorted({i.patient_id for i in d.items}) == ["case_00000", "case_00001"]
    assert [i.meta["slice_index"] for i in d.items if i.patient_id == "case_00000"] == [0, 4, 8]
    areas = {i.image_id: int(mask_array(d.masks[i.image_id]).sum()) for i in d.items}
    assert areas["case_00000/z0004"] == 9 and areas["case_00000/z0000"] == 0  # label 2 only, not the kidney
    assert all(0.0 <= i.image.min() and i.image.max() <= 1.0 for i in d.items)  # kidney window applied
    assert d.provenance["revision"].startswith("sha256:")
    # the loader's own options reach it through the catalog (slice_every was once dropped there silently)
    every = load_dataset("kits23", root=tmp_path, slice_every=1, n_patients=7)  # a phantom option is not the loader's
    assert [i.meta["slice_index"] for i in every.items if i.patient_id == "case_00000"] == list(range(9))


def test_msd_liver_and_missing_label_file(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    _case(tmp_path / "imagesTr" / "liver_0.nii.gz", tmp_path / "labelsTr" / "liver_0.nii.gz", rng)
    d = load_dataset("msd-liver", root=tmp_path)
    assert {i.patient_id for i in d.items} == {"liver_0"}
    (tmp_path / "labelsTr" / "liver_0.nii.gz").unlink()
    with pytest.raises(ValueError, match="no segmentation"):
        load_dataset("msd-liver", root=tmp_path)
    with pytest.raises(ValueError, match="no case_"):
        load_dataset("kits23", root=tmp_path)
