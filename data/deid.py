"""DICOM de-identification on the maintained de-identifier ``dicognito``, wrapped by the kit's PS3.15 rules and checks.

:func:`deidentify` works on a copy of a dataset, recursing into sequences and the file meta, in three steps:

1. the kit's PS3.15 Annex E Basic Profile table (:mod:`covtoken.data.deid_profile`) removes or empties what the
   profile says to remove or empty (``X``/``Z``), and private tags, curves and overlays (groups 50xx, 60xx), person
   names, free text and UN (uncheckable) values not in the table; with ``date_shift_days=None`` dates are removed
   (emptied for the type 2 StudyDate/StudyTime/ContentDate/ContentTime); a date that cannot be shifted is removed,
   never replaced by words;
2. ``dicognito.anonymizer.Anonymizer`` (seeded with an HMAC of ``key``) replaces what remains: instance UIDs
   (``2.<40 digits>``, the same UID maps to the same new UID in every file processed with the same key, so studies,
   series and references stay consistent), IDs, and DA/DT values, shifted by ``date_shift_days`` whole days with
   dicognito's ``DateTimeAnonymizer`` (intervals and times of day preserved: Retain Longitudinal Temporal
   Information with Modified Dates option);
3. PatientName/PatientID become the kit's keyed pseudonyms (``Anon^<8 hex>`` / ``anon-<16 hex>``) so a patient's
   images stay together; PatientIdentityRemoved=YES, DeidentificationMethod (the kit and dicognito with its
   version) and the code sequence are set.

Every value of the result is validated against its VR with pydicom's validators, the dataset is written as a
DICOM file and read back, the pixel data is compared with the input, and the kit's own PS3.15 check
(:func:`deidentification_problems`) must find nothing but possible burned-in annotation; any failure raises,
nothing is returned half done. Burned-in annotation ("YES", or missing on ultrasound and secondary-capture images) is not
removed from pixels: it is flagged in the report, and :func:`assert_deidentified` (in
:mod:`covtoken.data.deid_check`, re-exported here) refuses such files unless told otherwise.
"""
from __future__ import annotations

import copy
import datetime as dt
import hashlib
import hmac
import io
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom import config as dcm_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, UID_dictionary
from pydicom.valuerep import validate_value

from covtoken.data.deid_check import (
    CLEAN_PIXEL_CODE,
    METHOD,
    assert_deidentified,
    burned_in_risk,
    deidentification_problems,
    is_deidentified,
    values_of,
    walk_elements,
)
from covtoken.data.deid_profile import CLASS_UID_KEYWORDS, DATE_Z_KEYWORDS, Action, profile_by_tag

__all__ = [
    "METHOD",
    "DeidReport",
    "DeidResult",
    "remap_uid",
    "pseudonym",
    "patient_date_shift",
    "deidentify",
    "deidentify_file",
    "deidentification_problems",
    "is_deidentified",
    "assert_deidentified",
]

log = logging.getLogger(__name__)

DICOGNITO_METHOD = "dicognito (UIDs, IDs, dates)"
_BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
_MODIFIED_DATES_CODE = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
_CLEAN_CODES = frozenset({CLEAN_PIXEL_CODE, "113102", "113103", "113104", "113105"})  # PS3.16 CID 7050 "Clean" options
_FREE_TEXT_VRS = frozenset({"LT", "ST", "UT"})
_BYTES_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "SQ", "AT", "OB or OW", "US or SS or OW"})


@dataclass
class DeidReport:
    """What :func:`deidentify` did. Holds tag paths and counts, never original values.

    Attributes:
        removed: paths of removed elements (private tags counted separately).
        emptied: paths of elements given a zero-length value.
        pseudonymised: paths of elements given a keyed pseudonym.
        uids_remapped: number of UID values replaced.
        dates_shifted: number of DA/DT values shifted.
        private_removed: number of private elements removed.
        date_shift_days: the shift applied, or None when dates were removed.
        burned_in_annotation: the BurnedInAnnotation value, or None when absent.
        needs_pixel_review: pixels may carry burned-in identifying text.
        notes: anything unusual (unparseable dates removed...).
    """

    removed: list[str] = field(default_factory=list)
    emptied: list[str] = field(default_factory=list)
    pseudonymised: list[str] = field(default_factory=list)
    uids_remapped: int = 0
    dates_shifted: int = 0
    private_removed: int = 0
    date_shift_days: int | None = None
    burned_in_annotation: str | None = None
    needs_pixel_review: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DeidResult:
    """The de-identified dataset (as read back from its encoded file) and the report."""

    dataset: Dataset
    report: DeidReport


def _check_key(key: bytes) -> None:
    if not isinstance(key, (bytes, bytearray)) or len(key) < 16:
        raise ValueError("de-identification key must be bytes of length >= 16")


def _digest(key: bytes, domain: str, value: str) -> bytes:
    return hmac.new(bytes(key), f"{domain}\x00{value}".encode(), hashlib.sha256).digest()


def _dicognito_seed(key: bytes) -> str:
    return _digest(key, "dicognito-seed", "").hex()


def remap_uid(uid: str, key: bytes) -> str:
    """The UID dicognito gives ``uid`` under ``key``: ``"2." + str(10**39 + n)`` with ``n`` from its keyed randomizer.

    Args:
        uid: the original UID.
        key: secret, at least 16 bytes; the same key gives the same mapping (in every file).

    Returns:
        A 42-character UID (``2.`` and 40 digits), as ``dicognito.uianonymizer.UIAnonymizer`` writes it.
    """
    from dicognito.randomizer import Randomizer

    _check_key(key)
    return "2." + str(10 ** 39 + Randomizer(_dicognito_seed(key)).to_int(str(uid)))


def pseudonym(patient_id: str, key: bytes) -> tuple[str, str]:
    """Keyed pseudonyms for a patient.

    Args:
        patient_id: the original PatientID.
        key: secret, at least 16 bytes.

    Returns:
        ``(patient_name, patient_id)``: ``"Anon^<8 hex>"`` (valid PN) and ``"anon-<16 hex>"`` (valid LO).
    """
    _check_key(key)
    h = _digest(key, "patient", str(patient_id).strip()).hex()
    return f"Anon^{h[:8]}", f"anon-{h[:16]}"


def patient_date_shift(patient_id: str, key: bytes, *, max_days: int = 3650) -> int:
    """A per-patient date shift in ``[-max_days, -1]`` days, fixed by ``key`` and the patient id.

    Args:
        patient_id: the original PatientID.
        key: secret, at least 16 bytes.
        max_days: largest shift, > 0.

    Returns:
        A negative number of days; the same patient always gets the same shift under the same key.
    """
    _check_key(key)
    if max_days < 1:
        raise ValueError(f"max_days must be >= 1, got {max_days}")
    n = int.from_bytes(_digest(key, "dateshift", str(patient_id).strip())[:8], "big")
    return -(1 + n % max_days)


def _shift_da(value: str, days: int) -> str | None:
    v = value.strip().replace(".", "")
    if not re.fullmatch(r"\d{8}", v):
        return None
    try:
        d = dt.datetime.strptime(v, "%Y%m%d").date() + dt.timedelta(days=days)
    except ValueError:
        return None
    return d.strftime("%Y%m%d") if d.year >= 1 else None


def _shift_dt(value: str, days: int) -> str | None:
    m = re.fullmatch(r"(\d{8})(\d{0,6}(?:\.\d{1,6})?)(?:[+-]\d{4})?", value.strip())
    if not m:
        return None  # year or month precision only, or malformed: cannot shift, so removed
    day = _shift_da(m.group(1), days)
    return None if day is None else day + m.group(2)  # UTC offset dropped with TimezoneOffsetFromUTC


class _Context:
    def __init__(self, key: bytes, shift: int | None, report: DeidReport) -> None:
        self.key, self.shift, self.report = key, shift, report
        self.table = profile_by_tag()
        self.dummies: list[tuple[Dataset, Any, str, str]] = []
        self.uids: list[tuple[Dataset, Any, str, list[str]]] = []
        self.dates: list[tuple[Dataset, Any, str, list[str | None]]] = []
        self.empties: list[tuple[Dataset, Any, str]] = []


DICOGNITO_UID = re.compile(r"^2\.1\d{39}$")  # dicognito: "2." + str(10**39 + md5-derived int)


def _dicognito(key: bytes, date_shift_days: int | None) -> Any:
    """dicognito's Anonymizer seeded from ``key``, shifting dates by whole days (so times of day are kept)."""
    from dicognito.anonymizer import Anonymizer
    from dicognito.datetimeanonymizer import DateTimeAnonymizer

    anonymizer = Anonymizer(seed=_dicognito_seed(key))
    # our own whole-day offset first: dicognito's default offset is hours derived from the seed
    anonymizer.add_element_handler(DateTimeAnonymizer(24 * (date_shift_days or 0)))
    return anonymizer


def _apply_library(out: Dataset, ctx: _Context, date_shift_days: int | None) -> None:
    """Run dicognito, then check that it did what the profile needs, and set the kit's pseudonyms."""
    from importlib.metadata import version

    originals = {str(v) for _, _, _, vals in ctx.uids for v in vals}
    _dicognito(ctx.key, date_shift_days).anonymize(out)
    rep = ctx.report
    for ds, tag, path, vals in ctx.uids:
        new = [str(v) for v in values_of(ds[tag].value)] if tag in ds else []
        if len(new) != len(vals) or any(not DICOGNITO_UID.match(v) or v in originals for v in new):
            raise ValueError(f"{path}: dicognito did not remap the UID")
        rep.uids_remapped += len(new)
    for ds, tag, path, expected in ctx.dates:
        got = [str(v) for v in values_of(ds[tag].value)]
        if got != [str(e) for e in expected]:
            raise ValueError(f"{path}: dicognito's date shift gave {len(got)} value(s) that differ from a "
                             f"{date_shift_days}-day shift")
        rep.dates_shifted += len(got)
    for ds, tag, _path in ctx.empties:
        ds[tag].value = Sequence() if ds[tag].VR == "SQ" else None
    for ds, tag, pid, path in ctx.dummies:
        name_p, id_p = pseudonym(pid, ctx.key)
        ds[tag].value = name_p if ds[tag].VR == "PN" else id_p
        rep.pseudonymised.append(path)
    rep.notes.append(f"dicognito {version('dicognito')}: UIDs, IDs and dates")


def _process(ds: Dataset, ctx: _Context, prefix: str) -> None:
    """Apply the profile to ``ds`` in place, recursing into sequence items."""
    rep = ctx.report
    original_pid = str(ds.get("PatientID", "") or "")  # read before PatientID itself is replaced
    for tag in list(ds.keys()):
        elem = ds[tag]
        name = elem.keyword or str(elem.tag)
        path = f"{prefix}{name}"
        group = elem.tag.group
        if elem.tag.is_private:
            del ds[tag]
            rep.private_removed += 1
            continue
        if (group & 0xFF00) in (0x5000, 0x6000):  # curves and overlays (may hold burned-in text)
            del ds[tag]
            rep.removed.append(path)
            continue
        action = ctx.table.get(int(elem.tag))
        vr = elem.VR
        if action is Action.REMOVE:
            del ds[tag]
            rep.removed.append(path)
        elif action is Action.EMPTY:
            ctx.empties.append((ds, tag, path))  # emptied after dicognito, which cannot take empty IDs
            rep.emptied.append(path)
            continue
        elif action is Action.DUMMY:
            if not original_pid:
                rep.notes.append(f"{path}: PatientID empty; pseudonym shared by all patients without an id")
            ctx.dummies.append((ds, tag, original_pid, path))  # set after dicognito (which would replace it)
        elif action is Action.UID or (
            action is None and vr == "UI" and elem.keyword not in CLASS_UID_KEYWORDS
        ):
            vals = [v for v in values_of(elem.value) if str(v).strip()]
            if action is None and all(str(v) in UID_dictionary for v in vals):
                continue  # registered DICOM UIDs (SOP classes, coding schemes) identify nothing
            ctx.uids.append((ds, tag, path, [str(v) for v in vals]))  # dicognito replaces them; checked after
        elif action is Action.KEEP:
            pass
        elif vr in ("DA", "DT", "TM"):
            _process_date(ds, tag, ctx, path)
        elif vr == "PN" or vr in _FREE_TEXT_VRS or vr == "UN":  # names, free text, unparseable values
            del ds[tag]
            rep.removed.append(path)
        if tag in ds and ds[tag].VR == "SQ":
            for i, item in enumerate(ds[tag].value):
                _process(item, ctx, f"{path}[{i}].")


def _process_date(ds: Dataset, tag: Any, ctx: _Context, path: str) -> None:
    elem, rep = ds[tag], ctx.report
    vals = [str(v) for v in values_of(elem.value) if str(v).strip()]
    if not vals:
        return
    if ctx.shift is None:
        if elem.keyword in DATE_Z_KEYWORDS:
            ctx.empties.append((ds, tag, path))
            rep.emptied.append(path)
        else:
            del ds[tag]
            rep.removed.append(path)
        return
    if elem.VR == "TM":
        return  # a whole-day shift keeps the time of day
    shifter = _shift_da if elem.VR == "DA" else _shift_dt
    new = [shifter(v, ctx.shift) for v in vals]
    if any(n is None for n in new):
        del ds[tag]
        rep.removed.append(path)
        rep.notes.append(f"{path}: date value that cannot be shifted was removed")
        return
    if elem.VR == "DT" and any(re.search(r"[+-]\d{4}$", v.strip()) for v in vals):
        elem.value = [v.strip()[:-5] for v in vals] if len(vals) > 1 else vals[0].strip()[:-5]
    ctx.dates.append((ds, tag, path, new))  # shifted by dicognito; the kit's own shift is the expected value


def _invalid_values(ds: Dataset) -> list[str]:
    """Every value checked against its VR with pydicom's validators (raise mode)."""
    bad = []
    meta = getattr(ds, "file_meta", None)
    for path, elem in list(walk_elements(meta, "meta.") if meta is not None else []) + list(walk_elements(ds)):
        if elem.VR in _BYTES_VRS or elem.is_empty:
            continue
        for v in values_of(elem.value):
            v = v if isinstance(v, (int, float)) and elem.VR not in ("DS", "IS") else str(v)
            try:
                validate_value(elem.VR, v, dcm_config.RAISE)
            except ValueError as exc:
                bad.append(f"{path} ({elem.VR}) {exc}")
    return bad


def _code_item(code: tuple[str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code[0], "DCM", code[1]
    return item


def deidentify(ds: Dataset, *, key: bytes, date_shift_days: int | None) -> DeidResult:
    """De-identify a copy of ``ds`` (see the module docstring for the rules).

    Args:
        ds: the dataset; it is not modified.
        key: secret of at least 16 bytes for UID remapping and pseudonyms; keep it out of the outputs.
        date_shift_days: shift for all DA/DT values (use :func:`patient_date_shift` for a per-patient offset),
            or None to remove dates.

    Returns:
        The de-identified dataset, re-read from its DICOM encoding, and a :class:`DeidReport`.

    Raises:
        ValueError: a value invalid for its VR, an encoding failure, or pixel data changed by the round trip.
    """
    _check_key(key)
    where = str(getattr(ds, "filename", None) or "<dataset>")
    report = DeidReport(date_shift_days=date_shift_days)
    report.burned_in_annotation, report.needs_pixel_review = burned_in_risk(ds)
    out = copy.deepcopy(ds)
    ctx = _Context(key, date_shift_days, report)
    _process(out, ctx, "")
    meta = getattr(out, "file_meta", None) or FileMetaDataset()
    _process(meta, ctx, "meta.")
    if "TransferSyntaxUID" not in meta:  # an in-memory dataset: native pixels, written explicit little endian
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "covtoken_deid"
    out.file_meta = meta
    _apply_library(out, ctx, date_shift_days)

    previous = [str(v) for v in values_of(ds.get("DeidentificationMethod"))
                if str(v).strip() and str(v) not in (METHOD, DICOGNITO_METHOD)]
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = previous + [METHOD, DICOGNITO_METHOD]
    # Earlier "clean" claims stay true (pixels and descriptors are not put back); earlier "retain" options
    # may not (this profile removes what they retained), so only the options applied here are listed.
    codes = [_BASIC_PROFILE_CODE] + ([_MODIFIED_DATES_CODE] if date_shift_days is not None else [])
    earlier = ds.get("DeidentificationMethodCodeSequence", [])
    kept = [copy.deepcopy(it) for it in earlier if str(it.get("CodeValue", "")) in _CLEAN_CODES]
    out.DeidentificationMethodCodeSequence = Sequence([_code_item(c) for c in codes] + kept)
    out.LongitudinalTemporalInformationModified = "MODIFIED" if date_shift_days is not None else "REMOVED"

    bad = _invalid_values(out)
    if bad:
        raise ValueError(f"{where}: de-identified dataset has values invalid for their VR: " + "; ".join(bad[:10]))
    buf = io.BytesIO()
    try:
        pydicom.dcmwrite(buf, out, enforce_file_format=True)
        buf.seek(0)
        back = pydicom.dcmread(buf)
    except Exception as exc:  # encoding errors come as ValueError, TypeError, struct.error...
        raise ValueError(f"{where}: de-identified dataset does not encode and read back: {exc}") from exc
    if "PixelData" in ds and back.get("PixelData") != ds.PixelData:
        raise ValueError(f"{where}: pixel data changed during de-identification")
    problems = deidentification_problems(back, allow_burned_in=True)  # the kit's PS3.15 check on the library's output
    if problems:
        raise ValueError(f"{where}: de-identified dataset fails the PS3.15 check: " + "; ".join(problems[:10]))
    log.info(
        "%s: removed %d, emptied %d, private %d, uids %d, dates shifted %d",
        where, len(report.removed), len(report.emptied), report.private_removed, report.uids_remapped,
        report.dates_shifted,
    )
    return DeidResult(dataset=back, report=report)


def deidentify_file(
    src: str | Path, dst: str | Path, *, key: bytes, date_shift_days: int | None, overwrite: bool = False
) -> DeidReport:
    """Read ``src``, de-identify it and write ``dst`` atomically (a temporary file renamed into place).

    Args:
        src: input DICOM file.
        dst: output path; refused if it exists unless ``overwrite``.
        key: see :func:`deidentify`.
        date_shift_days: see :func:`deidentify`.
        overwrite: replace an existing ``dst``.

    Returns:
        The report.
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise ValueError(f"{dst}: exists; pass overwrite=True to replace it")
    try:
        ds = pydicom.dcmread(src)
    except Exception as exc:  # InvalidDicomError, OSError, EOFError... all mean the same to the caller
        raise ValueError(f"{src}: not a readable DICOM file: {exc}") from exc
    result = deidentify(ds, key=key, date_shift_days=date_shift_days)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pydicom.dcmwrite(tmp, result.dataset, enforce_file_format=True)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return result.report
