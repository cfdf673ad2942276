"""covtoken.data.nifti: reorientation, axial slices, label masks, shape/affine checks, unreadable files."""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from covtoken.data import nifti
from covtoken.data.dicom import window
from covtoken.data.layout import SealedMask
from sealed_access import mask_array

# Stored axes (i, j, k) = (superior, posterior, patient-left), as KiTS23 stores (z, y, x): far from canonical.
AFFINE = np.array([[0, 0, -0.8, 10.0], [0, -0.7, 0, 20.0], [2.5, 0, 0, -5.0], [0, 0, 0, 1]])
SHAPE = (4, 5, 6)


def _peek(mask: SealedMask) -> np.ndarray:
    return mask_array(mask)  # test-only look at the sealed mask, to check the adapter put the right pixels in it


def _world(affine: np.ndarray = AFFINE, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    return ijk @ affine[:3, :3].T + affine[:3, 3]  # (..., 3) RAS world coordinates of every voxel


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _case(tmp_path: Path) -> tuple[Path, Path, Path]:
    w = _world()
    seg = np.zeros(SHAPE, np.int16)
    seg[(w[..., 0] < 7) & (w[..., 1] > 18)] = 2  # tumour: patient right-ish, anterior
    seg[w[..., 0] > 13] = 3  # cyst
    seg[(seg == 0) & (w[..., 2] > 0)] = 1  # kidney
    x = _save(tmp_path / "x.nii.gz", w[..., 0].astype(np.float32))
    y = _save(tmp_path / "y.nii.gz", w[..., 1].astype(np.float32))
    s = _save(tmp_path / "seg.nii.gz", seg)
    return x, y, s


def test_noncanonical_volume_gives_radiological_axial_slices(tmp_path: Path) -> None:
    x_path, y_path, seg_path = _case(tmp_path)
    vx = nifti.load_volume(x_path, seg_path, tumour_labels="kits23")
    vy = nifti.load_volume(y_path, seg_path, tumour_labels="kits23")
    assert vx.n_slices == 4 and vx.spacing_mm == pytest.approx((0.7, 0.8)) and vx.zooms_mm[2] == pytest.approx(2.5)
    ix, mx = nifti.volume_items(vx, patient_id="case_00001")
    iy, _ = nifti.volume_items(vy, patient_id="case_00001")
    assert [it.meta["slice_index"] for it in ix] == [0, 1, 2, 3]
    for a, b in zip(ix, iy):
        assert a.image.shape == (5, 6)  # rows = anterior-posterior (5 voxels), columns = right-left (6)
        np.testing.assert_allclose(np.diff(a.image, axis=1), -0.8, atol=1e-5)  # columns go towards patient left
        np.testing.assert_allclose(np.diff(b.image, axis=0), -0.7, atol=1e-5)  # rows go posterior
        np.testing.assert_allclose(np.diff(a.image, axis=0), 0, atol=1e-5)
        expected = (a.image < 7) & (b.image > 18)
        np.testing.assert_array_equal(_peek(mx[a.image_id]), expected)
    assert sum(_peek(m).sum() for m in mx.values()) > 0
    with_cyst = nifti.load_volume(x_path, seg_path, tumour_labels="kits23_with_cyst")
    ic, mc = nifti.volume_items(with_cyst, patient_id="c")
    for it in ic:
        tumour = _peek(mx[it.image_id.replace("c/", "case_00001/")])
        np.testing.assert_array_equal(_peek(mc[it.image_id]), tumour | (it.image > 13))


def test_slices_go_inferior_to_superior(tmp_path: Path) -> None:
    w = _world()
    z_path = _save(tmp_path / "z.nii", w[..., 2].astype(np.float32))
    vol = nifti.load_volume(z_path)
    zs = [float(vol.axial(k).mean()) for k in range(vol.n_slices)]
    np.testing.assert_allclose(np.diff(zs), 2.5, atol=1e-5)


def test_windowed_items_match_window_of_hu(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 400, size=(8, 7, 3)).astype(np.float32)
    img = _save(tmp_path / "ct.nii.gz", hu, np.diag([0.9, 0.9, 3.0, 1.0]))
    seg = _save(tmp_path / "seg.nii.gz", (hu > 300).astype(np.uint8) * 2, np.diag([0.9, 0.9, 3.0, 1.0]))
    vol = nifti.load_volume(img, seg, tumour_labels="msd_liver")
    items, _ = nifti.volume_items(vol, patient_id="liver_7", preset="liver", slices=nifti.select_slices(vol, every=2))
    assert [it.meta["slice_index"] for it in items] == [0, 2]
    for it in items:
        k = it.meta["slice_index"]
        np.testing.assert_allclose(it.image, window(hu[::-1, ::-1, k].T, 60, 160), atol=1e-6)


def test_select_slices_is_label_free_and_validated() -> None:
    assert nifti.select_slices(10, every=3) == [0, 3, 6, 9]
    assert nifti.select_slices(5, every=2, start=1) == [1, 3]
    with pytest.raises(ValueError, match="every"):
        nifti.select_slices(5, every=0)


def test_truncated_gz_names_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    good = _save(tmp_path / "good.nii.gz", rng.integers(-1000, 1000, (20, 20, 10)).astype(np.int16))
    raw = good.read_bytes()
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"broken\.nii\.gz: cannot read NIfTI voxel data"):
        nifti.load_volume(bad)
    header_only = tmp_path / "stub.nii.gz"
    header_only.write_bytes(raw[:40])
    with pytest.raises(ValueError, match=r"stub\.nii\.gz"):
        nifti.load_volume(header_only)
    with pytest.raises(ValueError, match=r"missing\.nii\.gz: no such file"):
        nifti.load_volume(tmp_path / "missing.nii.gz")


def test_mismatched_segmentation_names_both_files(tmp_path: Path) -> None:
    img = _save(tmp_path / "img.nii.gz", np.zeros((6, 5, 4), np.float32), np.eye(4))
    seg_shape = _save(tmp_path / "seg_shape.nii.gz", np.zeros((6, 5, 3), np.uint8), np.eye(4))
    with pytest.raises(ValueError, match=r"seg_shape\.nii\.gz.*shape.*img\.nii\.gz"):
        nifti.load_volume(img, seg_shape)
    moved = np.eye(4)
    moved[0, 3] = 5.0
    seg_aff = _save(tmp_path / "seg_aff.nii.gz", np.zeros((6, 5, 4), np.uint8), moved)
    with pytest.raises(ValueError, match=r"seg_aff\.nii\.gz.*affine.*img\.nii\.gz"):
        nifti.load_volume(img, seg_aff)
    frac = _save(tmp_path / "seg_frac.nii.gz", np.full((6, 5, 4), 0.5, np.float32), np.eye(4))
    with pytest.raises(ValueError, match="non-integer"):
        nifti.load_volume(img, frac)
    with pytest.raises(ValueError, match="unknown label preset"):
        nifti.load_volume(img, tumour_labels="kits99")
    with pytest.raises(ValueError, match="no segmentation"):
        nifti.volume_items(nifti.load_volume(img), patient_id="p")


def test_nibabel_bundled_anatomical_is_reoriented() -> None:
    path = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "anatomical.nii")
    if not os.path.exists(path):
        pytest.skip("nibabel test data not installed")
    src = nib.load(path)
    vol = nifti.load_volume(path)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    assert nib.aff2axcodes(src.affine) != ("R", "A", "S")
    assert vol.data.shape == src.shape
    # LAS -> RAS flips only the first axis.
    np.testing.assert_array_equal(vol.data, np.asanyarray(src.dataobj)[::-1].astype(np.float32))
