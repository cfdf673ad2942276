"""covtoken.data.lidc_xml: LIDC XML reads on a DICOM series -> consensus masks, checked against hand-built votes."""
from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pydicom
import pytest
from matplotlib.path import Path as MplPath
from pydicom.data import get_testdata_file

from covtoken.data import lidc_xml
from covtoken.data.catalog import load_dataset
from covtoken.data.layout import SealedMask
from sealed_access import mask_array, mask_labels

CT_SMALL = get_testdata_file("CT_small.dcm")
SERIES = "1.2.826.0.1.3680043.8.498.1"
ZS = [-10.0, -7.5, -5.0, -2.5]
N = 128  # CT_small is 128 x 128


def _peek(mask: SealedMask) -> np.ndarray:
    return mask_array(mask)  # test-only look at the sealed mask, to check the adapter put the right pixels in it


def _sop(i: int, series: str = SERIES) -> str:
    return f"{series}.{i + 1}"


def _write_series(folder: Path, *, patient: str = "LIDC-TEST-0001", series: str = SERIES) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    sops = []
    for i, z in enumerate(ZS):
        ds = pydicom.dcmread(CT_SMALL)
        sop = _sop(i, series)
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SeriesInstanceUID = series
        ds.PatientID = patient
        ds.ImagePositionPatient = ["-158.1358", "-179.0358", f"{z:.4f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceThickness = "2.5"
        ds.InstanceNumber = i + 1
        ds.save_as(folder / f"{i + 1:06d}.dcm", enforce_file_format=True)
        sops.append(sop)
    return sops


# --- contours: dense 8-connected pixel chains, like LIDC edge maps -------------------------------------------------

def rect_chain(x0: int, y0: int, x1: int, y1: int) -> list[tuple[int, int]]:
    top = [(x, y0) for x in range(x0, x1 + 1)]
    right = [(x1, y) for y in range(y0 + 1, y1 + 1)]
    bottom = [(x, y1) for x in range(x1 - 1, x0 - 1, -1)]
    left = [(x0, y) for y in range(y1 - 1, y0, -1)]
    return top + right + bottom + left


def diamond_chain(cx: int, cy: int, r: int) -> list[tuple[int, int]]:
    pts = [(cx + r - t, cy + t) for t in range(r)]
    pts += [(cx - t, cy + r - t) for t in range(r)]
    pts += [(cx - r + t, cy - t) for t in range(r)]
    pts += [(cx + t, cy - r + t) for t in range(r)]
    return pts


YY, XX = np.mgrid[0:N, 0:N]


def rect_region(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    return (XX >= x0) & (XX <= x1) & (YY >= y0) & (YY <= y1)


def diamond_region(cx: int, cy: int, r: int) -> np.ndarray:
    return np.abs(XX - cx) + np.abs(YY - cy) <= r


def point_region(x: int, y: int) -> np.ndarray:
    return (XX == x) & (YY == y)


# --- XML ----------------------------------------------------------------------------------------------------------

def _roi(points, *, z: float | None, sop: str | None, inclusion: bool = True) -> str:
    parts = ["<roi>"]
    if z is not None:
        parts.append(f"<imageZposition>{z}</imageZposition>")
    if sop is not None:
        parts.append(f"<imageSOP_UID>{escape(sop)}</imageSOP_UID>")
    parts.append(f"<inclusion>{'TRUE' if inclusion else 'FALSE'}</inclusion>")
    parts += [f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>" for x, y in points]
    parts.append("</roi>")
    return "".join(parts)


def _nodule(nid: str, rois: list[str], *, characteristics: bool = True) -> str:
    chars = ("<characteristics><subtlety>4</subtlety><malignancy>3</malignancy></characteristics>"
             if characteristics else "")
    return f"<unblindedReadNodule><noduleID>{nid}</noduleID>{chars}{''.join(rois)}</unblindedReadNodule>"


def _xml(sessions: list[list[str]], *, series: str = SERIES, extra: str = "") -> str:
    body = "".join(f"<readingSession><annotationVersion>3.12</annotationVersion>"
                   f"<servicingRadiologistID>{i}</servicingRadiologistID>{''.join(s)}</readingSession>"
                   for i, s in enumerate(sessions))
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<LidcReadMessage uid="1.3.6.1.4.1.14519.5.2.1.6279.1" '
            'xmlns="http://www.nih.gov" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
            f"<ResponseHeader><Version>1.8.1</Version><StudyInstanceUID>1.2.3</StudyInstanceUID>"
            f"<SeriesInstanceUid>{series}</SeriesInstanceUid></ResponseHeader>{body}{extra}</LidcReadMessage>")


def _scenario_sessions(sops: list[str]) -> list[list[str]]:
    """Nodule A on slices 1-2 by readers 1-3 (reader 4 misses it; reader 1 has a hole on slice 1 and gives only z
    on slice 2); small nodule B on slice 2 by readers 3 and 4 (one point each, one pixel apart)."""
    r1 = _nodule("A1", [
        _roi(rect_chain(40, 40, 60, 60), z=ZS[1], sop=sops[1]),
        _roi(rect_chain(48, 48, 52, 52), z=ZS[1], sop=sops[1], inclusion=False),
        _roi(rect_chain(42, 42, 58, 58), z=ZS[2], sop=None),
    ])
    r2 = _nodule("Nodule 002", [
        _roi(rect_chain(45, 45, 65, 65), z=ZS[1], sop=sops[1]),
        _roi(diamond_chain(52, 52, 9), z=ZS[2], sop=sops[2]),
    ])
    r3a = _nodule("IL057_1", [_roi(rect_chain(35, 35, 55, 55), z=ZS[1], sop=sops[1])])
    r3b = _nodule("small_3", [_roi([(101, 20)], z=ZS[2], sop=sops[2])], characteristics=False)
    r4b = _nodule("small_4", [_roi([(100, 20)], z=ZS[2], sop=sops[2])], characteristics=False)
    non_nodule = (f"<nonNodule><nonNoduleID>NN1</nonNoduleID><imageZposition>{ZS[0]}</imageZposition>"
                  f"<imageSOP_UID>{sops[0]}</imageSOP_UID><locus><xCoord>10</xCoord><yCoord>10</yCoord></locus>"
                  "</nonNodule>")
    return [[r1], [r2], [r3a, r3b], [r4b, non_nodule]]


def _expected(consensus: float) -> list[np.ndarray]:
    """Explicit per-pixel vote counts from the analytic regions (closed polygons, holes subtracted)."""
    import math

    out = [np.zeros((N, N), bool) for _ in ZS]
    need_a = max(1, math.ceil(consensus * 3 - 1e-9))  # nodule A: readers 1, 2, 3
    votes1 = ((rect_region(40, 40, 60, 60) & ~rect_region(48, 48, 52, 52)).astype(int)
              + rect_region(45, 45, 65, 65) + rect_region(35, 35, 55, 55))
    votes2 = rect_region(42, 42, 58, 58).astype(int) + diamond_region(52, 52, 9)
    out[1] |= votes1 >= need_a
    out[2] |= votes2 >= need_a
    need_b = max(1, math.ceil(consensus * 2 - 1e-9))  # nodule B: readers 3, 4, one pixel each
    votes_b = point_region(101, 20).astype(int) + point_region(100, 20)
    out[2] |= votes_b >= need_b
    return out


@pytest.fixture()
def lidc_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "LIDC-TEST-0001" / "study" / "series"
    sops = _write_series(folder)
    (folder / "069.xml").write_text(_xml(_scenario_sessions(sops)))
    return tmp_path


@pytest.mark.parametrize("consensus", [0.5, 1.0, 0.25])
def test_consensus_masks_match_hand_counted_votes(lidc_folder: Path, consensus: float) -> None:
    items, masks = lidc_xml.load_lidc_xml(lidc_folder, consensus=consensus)
    assert len(items) == len(ZS) == len(masks)
    assert [it.meta["position_mm"][2] for it in items] == pytest.approx(ZS)
    expected = _expected(consensus)
    for it, exp in zip(items, expected):
        assert it.patient_id == "LIDC-TEST-0001"
        assert it.modality == "CT" and it.image.dtype == np.float32 and 0 <= it.image.min() <= it.image.max() <= 1
        np.testing.assert_array_equal(_peek(masks[it.image_id]), exp, err_msg=f"slice {it.meta['slice_index']}")
    m1 = _peek(masks[items[1].image_id])
    if consensus == 0.5:  # the hole is covered by readers 2 and 3, so it stays lesion at 50%
        assert m1[50, 50] and not m1[35, 35] and m1[40, 40]
        assert _peek(masks[items[2].image_id])[20, 100] and _peek(masks[items[2].image_id])[20, 101]
    if consensus == 1.0:  # only 2 of 3 readers inside the hole; B never reaches 2 of 2 on one pixel
        assert not m1[50, 50] and m1[47, 47] and not _peek(masks[items[2].image_id])[20, 100]
    if consensus == 0.25:  # any reader: the union, contours included
        assert m1[35, 35] and m1[65, 65] and m1[50, 50]


def test_labels_count_readers_and_nodules(lidc_folder: Path) -> None:
    items, masks = lidc_xml.load_lidc_xml(lidc_folder)
    labels = [mask_labels(masks[it.image_id]) for it in items]
    assert [lab["nodules"] for lab in labels] == [0, 1, 2, 0]
    assert labels[2]["readers_per_nodule"] == [2, 3] and labels[1]["readers_per_nodule"] == [3]
    assert all(lab["n_readers"] == 4 and lab["consensus"] == 0.5 for lab in labels)
    assert masks[items[0].image_id].source.endswith("069.xml")
    assert not _peek(masks[items[0].image_id]).any()  # the nonNodule mark on slice 0 is not a lesion
    assert items[0].meta["dicom"] is True and items[0].meta["deidentified"] is False


def test_roi_region_matches_point_in_polygon_and_keeps_the_contour() -> None:
    poly = [(10, 5), (30, 8), (34, 22), (25, 30), (18, 20), (8, 26), (4, 12)]  # concave, not axis aligned
    r0, c0, sub = lidc_xml.roi_region(np.array(poly, float), (40, 40))
    full = np.zeros((40, 40), bool)
    full[r0:r0 + sub.shape[0], c0:c0 + sub.shape[1]] = sub
    path = MplPath(poly)
    for y in range(40):
        for x in range(40):
            if path.contains_point((x, y), radius=-1e-6) and path.contains_point((x, y), radius=1e-6):
                assert full[y, x], (x, y)  # clearly inside
            elif not path.contains_point((x, y), radius=1e-6) and not path.contains_point((x, y), radius=-1e-6):
                assert not full[y, x], (x, y)  # clearly outside
    for x, y in poly:
        assert full[y, x]
    assert full[5 + 0, 10] and full[20, 18]  # vertices of the reflex corner too
    r0, c0, sub = lidc_xml.roi_region(np.array([[7.0, 3.0]]), (10, 10))
    assert (r0, c0, sub.shape, bool(sub.all())) == (3, 7, (1, 1), True)


def test_far_nodules_of_the_same_readers_stay_apart(tmp_path: Path) -> None:
    sops = _write_series(tmp_path)
    near = [_nodule("a", [_roi(rect_chain(10, 10, 20, 20), z=ZS[1], sop=sops[1])]),
            _nodule("b", [_roi(rect_chain(22, 10, 32, 20), z=ZS[1], sop=sops[1])])]  # 2 px = 1.3 mm from "a"
    other = [_nodule("c", [_roi(rect_chain(10, 10, 20, 20), z=ZS[1], sop=sops[1])])]
    (tmp_path / "r.xml").write_text(_xml([near, other]))
    items, masks = lidc_xml.load_lidc_xml(tmp_path)
    m = _peek(masks[items[1].image_id])
    # "a" and "c" agree (2 of 2); "b" is reader 1's second nodule, alone: 1 of 1 - not merged into a/c
    np.testing.assert_array_equal(m, rect_region(10, 10, 20, 20) | rect_region(22, 10, 32, 20))
    assert mask_labels(masks[items[1].image_id])["readers_per_nodule"] == [1, 2]


def test_catalog_entry_loads_and_digests(lidc_folder: Path) -> None:
    ds = load_dataset("lidc-xml", root=lidc_folder)
    assert len(ds.items) == 4 and ds.provenance["id"] == "lidc-idri-xml"
    assert ds.provenance["revision"].startswith("sha256:")


def test_two_patients_in_sub_folders(tmp_path: Path) -> None:
    for pid, series in (("P1", SERIES), ("P2", "1.2.826.0.1.3680043.8.498.2")):
        folder = tmp_path / pid / "s"
        sops = _write_series(folder, patient=pid, series=series)
        (folder / "x.xml").write_text(_xml([[_nodule("n", [_roi([(5, 5)], z=ZS[0], sop=sops[0])],
                                                       characteristics=False)]], series=series))
    items, masks = lidc_xml.load_lidc_xml(tmp_path)
    assert sorted({it.patient_id for it in items}) == ["P1", "P2"] and len(items) == 8
    assert sum(int(_peek(masks[it.image_id]).sum()) for it in items) == 2


# --- bad inputs: the error names the file ---------------------------------------------------------------------

def _bad(tmp_path: Path, text: str, match: str) -> None:
    xml = tmp_path / "bad.xml"
    xml.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        lidc_xml.load_lidc_xml(tmp_path)
    assert str(xml) in str(info.value)


def test_malformed_xml_names_the_file(tmp_path: Path) -> None:
    _write_series(tmp_path)
    _bad(tmp_path, "<LidcReadMessage><readingSession><unblindedReadNodule>", "malformed XML")


def test_unknown_sop_uid_names_the_file(tmp_path: Path) -> None:
    _write_series(tmp_path)
    _bad(tmp_path, _xml([[_nodule("n", [_roi(rect_chain(1, 1, 5, 5), z=ZS[0], sop="9.9.9")])]]),
         r"imageSOP_UID 9\.9\.9 is not in series")


def test_point_outside_the_image_names_the_file(tmp_path: Path) -> None:
    sops = _write_series(tmp_path)
    _bad(tmp_path, _xml([[_nodule("n", [_roi([(120, 5), (128, 5), (125, 9)], z=ZS[0], sop=sops[0])])]]),
         r"edgeMap 2: point \(xCoord=128, yCoord=5\) is outside the 128x128 image")


def test_z_without_sop_that_matches_no_slice_names_the_file(tmp_path: Path) -> None:
    _write_series(tmp_path)
    _bad(tmp_path, _xml([[_nodule("n", [_roi([(5, 5)], z=-6.2, sop=None)])]]), "matches no slice")


def test_other_series_names_the_file(tmp_path: Path) -> None:
    _write_series(tmp_path)
    _bad(tmp_path, _xml([], series="1.2.3.4"), "SeriesInstanceUid 1.2.3.4 is not the series")


def test_bad_inclusion_and_missing_coordinate_name_the_file(tmp_path: Path) -> None:
    sops = _write_series(tmp_path)
    roi = _roi([(5, 5)], z=ZS[0], sop=sops[0]).replace("TRUE", "MAYBE")
    _bad(tmp_path, _xml([[_nodule("n", [roi])]]), "inclusion must be TRUE or FALSE")
    roi = _roi([(5, 5)], z=ZS[0], sop=sops[0]).replace("<yCoord>5</yCoord>", "")
    _bad(tmp_path, _xml([[_nodule("n", [roi])]]), "missing yCoord")


def test_missing_xml_and_empty_patient_id(tmp_path: Path) -> None:
    _write_series(tmp_path / "a", patient="")
    with pytest.raises(ValueError, match="without an LIDC XML"):
        lidc_xml.load_lidc_xml(tmp_path)
    (tmp_path / "a" / "r.xml").write_text(_xml([]))
    with pytest.raises(ValueError, match="missing patient id") as info:
        lidc_xml.load_lidc_xml(tmp_path)
    assert str(tmp_path / "a") in str(info.value)
    with pytest.raises(ValueError, match="consensus"):
        lidc_xml.load_lidc_xml(tmp_path, consensus=0.0)


def test_nested_contours_are_one_nodule_by_overlap(tmp_path: Path) -> None:
    sops = _write_series(tmp_path)
    big = _nodule("big", [_roi(rect_chain(10, 10, 60, 60), z=ZS[1], sop=sops[1])])
    small = _nodule("small", [_roi(rect_chain(30, 30, 40, 40), z=ZS[1], sop=sops[1])])  # > 13 mm from big's rim
    (tmp_path / "r.xml").write_text(_xml([[big], [small]]))
    items, masks = lidc_xml.load_lidc_xml(tmp_path, consensus=1.0)
    np.testing.assert_array_equal(_peek(masks[items[1].image_id]), rect_region(30, 30, 40, 40))
    assert mask_labels(masks[items[1].image_id])["readers_per_nodule"] == [2]
