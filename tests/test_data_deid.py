"""covtoken.data.deid: PS3.15 Basic Profile de-identification of bundled and real DICOM files."""
from __future__ import annotations

import copy
import datetime as dt
import io
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import config as dcm_config
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.valuerep import validate_value

from covtoken.data import deid
from covtoken.data.deid_check import values_of, walk_elements
from covtoken.data.deid_profile import PROFILE_KEYWORDS, Action, profile_by_tag

KEY = b"covtoken-test-key-0123456789abcdef"
BUNDLED = ["CT_small.dcm", "MR_small.dcm"]
UID_RE = re.compile(r"^2\.1\d{39}$")  # dicognito's remapped UIDs
_TEXT_VRS = {"PN", "LO", "SH", "LT", "ST", "UT", "AE", "UI", "DA", "DT"}


def _all_elements(ds: Dataset) -> list[tuple[str, object]]:
    out = list(walk_elements(ds))
    if getattr(ds, "file_meta", None) is not None:
        out += list(walk_elements(ds.file_meta, "meta."))
    return out


def _identifying_values(ds: Dataset) -> set[str]:
    """Original values that must not survive: everything the profile touches, private text, names, dates."""
    table = profile_by_tag()
    found = set()
    for _, elem in _all_elements(ds):
        action = table.get(int(elem.tag))
        touched = elem.tag.is_private or action in (Action.REMOVE, Action.EMPTY, Action.DUMMY, Action.UID)
        instance_uid = elem.VR == "UI" and str(elem.value) not in pydicom.uid.UID_dictionary
        touched = touched or elem.VR in ("PN", "DA", "DT") or instance_uid
        if touched and elem.VR in _TEXT_VRS:
            for v in values_of(elem.value):
                if len(str(v).strip()) >= 4 and action is not Action.KEEP:
                    found.add(str(v).strip())
    return found


def _bytes_without_pixels(ds: Dataset) -> bytes:
    ds = copy.deepcopy(ds)
    if "PixelData" in ds:
        del ds.PixelData
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _real_files(realdata: Path) -> list[Path]:
    return sorted((realdata / "lung_pet_ct_dx" / "Lung_Dx-A0001" / "dicom").glob("*.dcm"))


def _check_no_original_values(src: Dataset, out: Dataset) -> None:
    secret = _identifying_values(src)
    assert secret, "the source must carry identifying values for this check to mean anything"
    for path, elem in _all_elements(out):
        for v in values_of(elem.value) if elem.VR not in ("SQ", "OB", "OW", "UN") else []:
            assert str(v).strip() not in secret, f"{path} still holds an original identifying value"
    raw = _bytes_without_pixels(out)
    for v in secret:
        if len(v) >= 8 and (v[0].isalpha() or v.count(".") >= 3 or re.fullmatch(r"\d{8}", v)):
            assert v.encode() not in raw, f"original value {v!r} found in the encoded output"


def _check_valid_for_vr(out: Dataset) -> None:
    for path, elem in _all_elements(out):
        if elem.VR in ("SQ", "OB", "OW", "OD", "OF", "OL", "OV", "UN", "AT") or elem.is_empty:
            continue
        for v in values_of(elem.value):
            v = v if isinstance(v, (int, float)) and elem.VR not in ("DS", "IS") else str(v)
            validate_value(elem.VR, v, dcm_config.RAISE)


def test_profile_table_resolves_every_keyword() -> None:
    table = profile_by_tag()
    assert len(table) == len(PROFILE_KEYWORDS)  # no keyword maps to a tag twice
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "AccessionNumber", "InstitutionName",
               "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "StudyID",
               "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
               "MediaStorageSOPInstanceUID", "PatientSex"):
        assert kw in PROFILE_KEYWORDS, kw


@pytest.mark.parametrize("name", BUNDLED)
@pytest.mark.parametrize("shift", [-400, None])
def test_bundled_files_deidentified(name: str, shift: int | None) -> None:
    src = pydicom.dcmread(get_testdata_file(name))
    before = src.PatientName
    res = deid.deidentify(src, key=KEY, date_shift_days=shift)
    out = res.dataset
    assert src.PatientName == before, "the input must not be modified"
    _check_no_original_values(src, out)
    _check_valid_for_vr(out)
    assert not [e for _, e in _all_elements(out) if e.tag.is_private]
    assert res.report.private_removed == sum(1 for _, e in _all_elements(src) if e.tag.is_private)
    assert out.PatientIdentityRemoved == "YES" and deid.METHOD in values_of(out.DeidentificationMethod)
    assert re.fullmatch(r"Anon\^[0-9a-f]{8}", str(out.PatientName))
    assert out.PatientID == deid.pseudonym(str(src.PatientID), KEY)[1]
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        assert UID_RE.match(out[kw].value) and len(out[kw].value) <= 64
        assert out[kw].value == deid.remap_uid(src[kw].value, KEY)
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.SOPClassUID == src.SOPClassUID and out.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
    np.testing.assert_array_equal(out.pixel_array, src.pixel_array)
    assert deid.is_deidentified(out)
    assert not deid.is_deidentified(src)


def test_dates_shift_consistently_and_times_are_kept() -> None:
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    out = deid.deidentify(src, key=KEY, date_shift_days=-400).dataset

    def day(v: str) -> dt.date:
        return dt.datetime.strptime(str(v), "%Y%m%d").date()

    for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate"):
        assert day(out[kw].value) - day(src[kw].value) == dt.timedelta(days=-400), kw
    assert day(out.StudyDate) - day(out.SeriesDate) == day(src.StudyDate) - day(src.SeriesDate)
    assert out.AcquisitionTime == src.AcquisitionTime
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    assert str(out.PatientBirthDate) == ""

    gone = deid.deidentify(src, key=KEY, date_shift_days=None).dataset
    assert gone["StudyDate"].is_empty and gone["ContentTime"].is_empty
    assert "SeriesDate" not in gone and "AcquisitionTime" not in gone
    assert gone.LongitudinalTemporalInformationModified == "REMOVED"


def test_patient_date_shift_is_per_patient_and_keyed() -> None:
    a = deid.patient_date_shift("P1", KEY)
    assert a == deid.patient_date_shift("P1", KEY) and -3650 <= a <= -1
    shifts = {deid.patient_date_shift(f"P{i}", KEY) for i in range(20)}
    assert len(shifts) > 15
    other_key = [deid.patient_date_shift(f"P{i}", KEY + b"x") for i in range(20)]
    assert other_key != [deid.patient_date_shift(f"P{i}", KEY) for i in range(20)]
    with pytest.raises(ValueError, match="16"):
        deid.deidentify(pydicom.dcmread(get_testdata_file("CT_small.dcm")), key=b"short", date_shift_days=None)


def test_sequences_processed_recursively() -> None:
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    item = Dataset()
    item.ReferencedSOPClassUID = src.SOPClassUID
    item.ReferencedSOPInstanceUID = "1.2.3.4.5.6.7.8.9"
    item.ContentCreatorName = "Doe^Jane"
    item.ObservationDateTime = "20040119120000.5-0500"
    item.add_new(0x00291010, "LO", "private in a sequence")
    src.SourceImageSequence = Sequence([item])
    out = deid.deidentify(src, key=KEY, date_shift_days=-1).dataset
    got = out.SourceImageSequence[0]
    assert got.ReferencedSOPInstanceUID == deid.remap_uid("1.2.3.4.5.6.7.8.9", KEY)
    assert got.ReferencedSOPClassUID == src.SOPClassUID
    assert "ContentCreatorName" not in got
    assert got.ObservationDateTime == "20040118120000.5"
    assert not [e for e in got if e.tag.is_private]


def test_in_memory_dataset_without_file_meta() -> None:
    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.Modality, ds.StudyDate = "Doe^John", "MRN-778899", "CT", "20200101"
    ds.SOPClassUID, ds.SOPInstanceUID = pydicom.uid.CTImageStorage, "1.2.3.4.5.6.7.8.9.10"
    ds.add_new(0x0018FFF0, "UN", b"opaque public value")  # not in the dictionary: cannot be checked, so removed
    res = deid.deidentify(ds, key=KEY, date_shift_days=-1)
    out = res.dataset
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID == deid.remap_uid("1.2.3.4.5.6.7.8.9.10", KEY)
    assert out.StudyDate == "20191231" and 0x0018FFF0 not in out
    assert b"MRN-778899" not in _bytes_without_pixels(out) and b"Doe^John" not in _bytes_without_pixels(out)
    assert deid.is_deidentified(out)


def test_invalid_value_for_vr_is_refused_with_file_and_element() -> None:
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    with dcm_config.disable_value_validation():
        src.Laterality = "left"  # CS allows upper case only
    with pytest.raises(ValueError, match=r"CT_small\.dcm.*Laterality"):
        deid.deidentify(src, key=KEY, date_shift_days=None)


def test_unshiftable_date_is_removed_not_replaced_by_words() -> None:
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    with dcm_config.disable_value_validation():
        src.SeriesDate = "UNKNOWN"
    res = deid.deidentify(src, key=KEY, date_shift_days=-3)
    assert "SeriesDate" not in res.dataset
    assert any("SeriesDate" in n for n in res.report.notes)


def test_burned_in_annotation_flagged_and_refused() -> None:
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    src.BurnedInAnnotation = "YES"
    res = deid.deidentify(src, key=KEY, date_shift_days=None)
    assert res.report.needs_pixel_review and res.report.burned_in_annotation == "YES"
    with pytest.raises(ValueError, match="burned-in"):
        deid.assert_deidentified(res.dataset, "ct.dcm")
    deid.assert_deidentified(res.dataset, "ct.dcm", allow_burned_in=True)
    us = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    us.Modality = "US"
    assert deid.deidentify(us, key=KEY, date_shift_days=None).report.needs_pixel_review


def test_assert_deidentified_catches_tampering() -> None:
    out = deid.deidentify(pydicom.dcmread(get_testdata_file("MR_small.dcm")), key=KEY, date_shift_days=None).dataset
    deid.assert_deidentified(out, "mr.dcm")
    bad = copy.deepcopy(out)
    bad.add_new(0x00091010, "LO", "x")
    with pytest.raises(ValueError, match=r"mr\.dcm: not de-identified.*private"):
        deid.assert_deidentified(bad, "mr.dcm")
    bad = copy.deepcopy(out)
    bad.InstitutionName = "Somewhere"
    with pytest.raises(ValueError, match="InstitutionName"):
        deid.assert_deidentified(bad, "mr.dcm")
    bad = copy.deepcopy(out)
    bad.SeriesInstanceUID = "1.2.840.99999.1"
    with pytest.raises(ValueError, match="SeriesInstanceUID: UID not remapped"):
        deid.assert_deidentified(bad, "mr.dcm")


def test_deidentify_file_writes_atomically(tmp_path: Path) -> None:
    dst = tmp_path / "out.dcm"
    deid.deidentify_file(get_testdata_file("CT_small.dcm"), dst, key=KEY, date_shift_days=-5)
    back = pydicom.dcmread(dst)
    assert deid.is_deidentified(back)
    with pytest.raises(ValueError, match="exists"):
        deid.deidentify_file(get_testdata_file("CT_small.dcm"), dst, key=KEY, date_shift_days=-5)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"nope" * 50)
    with pytest.raises(ValueError, match=r"junk\.dcm"):
        deid.deidentify_file(junk, tmp_path / "j.dcm", key=KEY, date_shift_days=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.dcm", "out.dcm"]


@pytest.mark.realdata
def test_real_series_deidentified_consistently(realdata: Path) -> None:
    files = _real_files(realdata)
    assert len(files) >= 2
    srcs = [pydicom.dcmread(f) for f in files]
    shift = deid.patient_date_shift(str(srcs[0].PatientID), KEY)
    outs = [deid.deidentify(s, key=KEY, date_shift_days=shift).dataset for s in srcs]
    for s, o in zip(srcs, outs):
        _check_no_original_values(s, o)
        _check_valid_for_vr(o)
        np.testing.assert_array_equal(o.pixel_array, s.pixel_array)
        assert o.ReferencedImageSequence[0].ReferencedSOPInstanceUID == deid.remap_uid(
            s.ReferencedImageSequence[0].ReferencedSOPInstanceUID, KEY
        )
        deid.assert_deidentified(o, str(s.filename))
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PatientID", "PatientName", "StudyDate"):
        assert len({str(o[kw].value) for o in outs}) == 1, kw
    sops = [o.SOPInstanceUID for o in outs]
    assert len(set(sops)) == len(outs) and all(UID_RE.match(u) for u in sops)
    assert outs[0].StudyInstanceUID != srcs[0].StudyInstanceUID
    other = deid.deidentify(srcs[0], key=KEY[::-1], date_shift_days=shift).dataset
    assert other.StudyInstanceUID != outs[0].StudyInstanceUID, "a different key must give different UIDs"
    # TCIA marked the source PatientIdentityRemoved=YES; that alone is not enough for the upload check.
    assert str(srcs[0].PatientIdentityRemoved) == "YES" and not deid.is_deidentified(srcs[0])


def test_library_step_is_checked_not_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The attack: a de-identifier that silently does nothing (or shifts dates wrongly) is caught by the kit."""
    from dicognito.anonymizer import Anonymizer

    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    monkeypatch.setattr(Anonymizer, "anonymize", lambda self, ds: None)
    with pytest.raises(ValueError, match="dicognito did not remap the UID"):
        deid.deidentify(src, key=KEY, date_shift_days=-400)
    monkeypatch.undo()
    from dicognito import datetimeanonymizer

    real_init = datetimeanonymizer.DateTimeAnonymizer.__init__
    monkeypatch.setattr(datetimeanonymizer.DateTimeAnonymizer, "__init__",
                        lambda self, offset_hours: real_init(self, offset_hours + 24))
    with pytest.raises(ValueError, match="date shift"):
        deid.deidentify(src, key=KEY, date_shift_days=-400)


def test_output_records_the_library() -> None:
    out = deid.deidentify(pydicom.dcmread(get_testdata_file("MR_small.dcm")), key=KEY, date_shift_days=-3).dataset
    assert list(out.DeidentificationMethod) == [deid.METHOD, deid.DICOGNITO_METHOD]
    assert out.StudyInstanceUID == deid.remap_uid(pydicom.dcmread(get_testdata_file("MR_small.dcm")).StudyInstanceUID,
                                                  KEY)
