"""covtoken.data.dicom: HU conversion, windows, series sorting, orientation checks, errors that name the file."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from covtoken.data import dicom

CT_SMALL = get_testdata_file("CT_small.dcm")


def _write_slice(
    path: Path, *, z: float, instance: int, iop=(1, 0, 0, 0, 1, 0), origin=(0.0, 0.0), series=None
) -> Path:
    ds = pydicom.dcmread(CT_SMALL)
    n = dicom._normal(iop)
    pos = np.array([origin[0], origin[1], 0.0]) + z * n
    ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
    ds.InstanceNumber = instance
    if series is not None:
        ds.SeriesInstanceUID = series
    ds.save_as(path, enforce_file_format=True)
    return path


def test_ct_small_hu_is_slope_times_stored_plus_intercept() -> None:
    ds = pydicom.dcmread(CT_SMALL)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    s = dicom.read_dicom(CT_SMALL)
    assert s.hu.dtype == np.float32
    np.testing.assert_array_equal(s.hu, expected.astype(np.float32))
    assert s.spacing_mm == pytest.approx(tuple(float(v) for v in ds.PixelSpacing))
    assert s.instance_number == int(ds.InstanceNumber)
    assert s.modality == "CT"


def test_padding_value_becomes_air() -> None:
    ds = pydicom.dcmread(CT_SMALL)
    arr = ds.pixel_array.copy()
    arr[:4, :4] = int(ds.PixelPaddingValue)
    ds.PixelData = arr.tobytes()
    hu = dicom.to_hu(ds, "mem")
    assert (hu[:4, :4] == dicom.PADDING_HU).all()
    assert hu[10, 10] == pytest.approx(float(arr[10, 10]) - 1024)


def test_window_maps_edges_and_clips() -> None:
    hu = np.array([-2000.0, -1350.0, -600.0, 150.0, 3000.0])
    out = dicom.window(hu, -600, 1500)
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    assert out.dtype == np.float32
    liver = dicom.apply_preset(np.array([60.0 - 80.0, 60.0, 60.0 + 40.0]), "liver")
    np.testing.assert_allclose(liver, [0.0, 0.5, 0.75], atol=1e-6)
    with pytest.raises(ValueError, match="lung"):
        dicom.apply_preset(hu, "no_such_window")
    with pytest.raises(ValueError, match="width"):
        dicom.window(hu, 0, 0)


def test_series_sorted_by_position_along_normal_not_by_instance_or_name(tmp_path: Path) -> None:
    # 10 degree gantry-like tilt: positions lie along the tilted normal; instance numbers are scrambled.
    a = math.radians(10)
    iop = (1, 0, 0, 0, math.cos(a), -math.sin(a))
    zs = [3.0, -7.5, 12.0, 0.5]
    instances = [2, 4, 1, 3]
    files = [_write_slice(tmp_path / f"{i}.dcm", z=z, instance=n, iop=iop)
             for i, (z, n) in enumerate(zip(zs, instances))]
    out = dicom.read_series(list(reversed(files)))
    got = [float(np.dot(s.normal, s.position)) for s in out]
    assert got == pytest.approx(sorted(zs), abs=1e-3)
    assert [s.instance_number for s in out] == [4, 3, 2, 1]


def test_series_falls_back_to_instance_number(tmp_path: Path) -> None:
    paths = []
    for i, n in enumerate([3, 1, 2]):
        p = _write_slice(tmp_path / f"s{i}.dcm", z=float(i), instance=n)
        ds = pydicom.dcmread(p)
        del ds.ImagePositionPatient
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    out = dicom.read_series(tmp_path)
    assert [s.instance_number for s in out] == [1, 2, 3]


def test_series_refuses_duplicates_and_mixed_series(tmp_path: Path) -> None:
    a = _write_slice(tmp_path / "a.dcm", z=1.0, instance=1)
    b = _write_slice(tmp_path / "b.dcm", z=1.0, instance=2)
    with pytest.raises(ValueError, match="same position"):
        dicom.read_series([a, b])
    c = _write_slice(tmp_path / "c.dcm", z=5.0, instance=3, series="1.2.3.4.5")
    with pytest.raises(ValueError, match=r"c\.dcm.*SeriesInstanceUID"):
        dicom.read_series([a, c])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no DICOM files"):
        dicom.read_series(tmp_path / "empty")


def test_non_axial_refused_unless_allowed(tmp_path: Path) -> None:
    sag = _write_slice(tmp_path / "sag.dcm", z=0.0, instance=1, iop=(0, 1, 0, 0, 0, -1))
    with pytest.raises(ValueError, match=r"sag\.dcm: non-axial"):
        dicom.read_dicom(sag)
    assert dicom.read_dicom(sag, allow_non_axial=True).orientation == (0, 1, 0, 0, 0, -1)
    ds = pydicom.dcmread(sag)
    del ds.ImageOrientationPatient
    ds.save_as(tmp_path / "noiop.dcm", enforce_file_format=True)
    with pytest.raises(ValueError, match="noiop.dcm: no ImageOrientationPatient"):
        dicom.read_dicom(tmp_path / "noiop.dcm")


@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")  # truncated UIDs, expected here
def test_corrupt_and_truncated_files_name_the_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not dicom at all" * 10)
    with pytest.raises(ValueError, match=r"junk\.dcm: not a readable DICOM"):
        dicom.read_dicom(junk)
    raw = Path(CT_SMALL).read_bytes()
    cut = tmp_path / "cut.dcm"
    for n in [*range(130, 3000, 41), len(raw) // 2, len(raw) - 20000]:  # inside the header, then inside the pixels
        cut.write_bytes(raw[:n])
        with pytest.raises(ValueError, match=r"cut\.dcm"):
            dicom.read_dicom(cut)
    truncated = get_testdata_file("MR_truncated.dcm")
    with pytest.raises(ValueError, match=r"MR_truncated\.dcm: pixel data"):
        dicom.read_dicom(truncated, allow_non_axial=True)


def test_slices_to_items_windowed(tmp_path: Path) -> None:
    files = [_write_slice(tmp_path / f"{i}.dcm", z=float(i), instance=i + 1) for i in range(2)]
    items = dicom.slices_to_items(dicom.read_series(files), preset="soft_tissue")
    assert all(0.0 <= it.image.min() and it.image.max() <= 1.0 for it in items)
    assert items[0].patient_id == str(pydicom.dcmread(CT_SMALL).PatientID)
    hu = dicom.read_dicom(files[0]).hu
    np.testing.assert_allclose(items[0].image, np.clip((hu + 160) / 400, 0, 1), atol=1e-6)


@pytest.mark.realdata
def test_real_lung_pet_ct_series_matches_index(realdata: Path) -> None:
    root = realdata / "lung_pet_ct_dx"
    rows = {r["sop_instance_uid"]: r for r in csv.DictReader(open(root / "index.csv"))}
    slices = dicom.read_series(root / "Lung_Dx-A0001" / "dicom")
    assert len(slices) == len(rows)
    for s in slices:
        row = rows[s.meta["sop_instance_uid"]]
        assert s.instance_number == int(row["instance"])
        assert s.hu.shape == (int(row["rows"]), int(row["cols"]))
        assert list(s.spacing_mm) == pytest.approx(json.loads(row["pixel_spacing"]))
        assert s.slice_thickness_mm == pytest.approx(float(row["slice_thickness"]))
    z = np.array([s.position[2] for s in slices])
    np.testing.assert_allclose(np.diff(z), float(next(iter(rows.values()))["slice_thickness"]), atol=1e-3)
    for s in slices:
        hu = s.hu
        air = hu[(hu > -1100) & (hu < -900)]
        assert air.size > 0.2 * hu.size, "a chest CT slice is mostly air and lung"
        assert -1030 < float(np.median(air)) < -960, "air should sit near -1000 HU"
        soft = ((hu > -100) & (hu < 100)).mean()
        assert soft > 0.05, "soft tissue (around 0-80 HU) must be present"
        assert hu.min() >= -1025 and hu.max() < 4000
