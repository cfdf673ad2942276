"""Checks that a DICOM dataset was de-identified by :mod:`covtoken.data.deid` (used before anything leaves).

:func:`assert_deidentified` is what an upload path calls: it refuses a dataset without the covtoken method
marker, with private tags, with an attribute the profile removes or empties, with a person name other than the
pseudonym, with an instance UID outside ``2.25.``, or with pixels that may carry burned-in annotation.
"""
from __future__ import annotations

import re
from typing import Any, Iterator

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID_dictionary

from covtoken.data.deid_profile import CLASS_UID_KEYWORDS, Action, profile_by_tag

__all__ = [
    "METHOD",
    "burned_in_risk",
    "deidentification_problems",
    "is_deidentified",
    "assert_deidentified",
    "values_of",
    "walk_elements",
]

#: Marker written into DeidentificationMethod (LO, at most 64 characters); the checks look for it.
METHOD = "covtoken.deid PS3.15 E.1-1 Basic Profile"
CLEAN_PIXEL_CODE = "113101"
_BURNED_IN_MODALITIES = frozenset({"US", "OT", "SC", "XC", "ES", "GM", "SM", "DOC"})
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
NAME_RE = re.compile(r"^Anon\^[0-9a-f]{8}$")
ID_RE = re.compile(r"^anon-[0-9a-f]{16}$")
#: what a remapped UID looks like: dicognito's ``2.<10**39 + n>`` (or the kit's former ``2.25.<int>``)
REMAPPED_UID = re.compile(r"^(2\.1\d{39}|2\.25\.\d+)$")


def values_of(value: Any) -> list[Any]:
    """An element value as a list (empty for None, one entry for a single value)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return list(value)
    return [value]


def walk_elements(ds: Dataset, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``(path, element)`` for every element, depth first through sequence items.

    Args:
        ds: dataset or sequence item.
        prefix: prepended to each path (``"meta."`` for the file meta).

    Returns:
        Iterator of paths such as ``"ReferencedImageSequence[0].ReferencedSOPInstanceUID"`` and elements.
    """
    for elem in ds:
        path = f"{prefix}{elem.keyword or elem.tag}"
        yield path, elem
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value):
                yield from walk_elements(item, f"{path}[{i}].")


def burned_in_risk(ds: Dataset) -> tuple[str | None, bool]:
    """Whether the pixels may carry burned-in identifying text.

    Args:
        ds: the dataset.

    Returns:
        ``(BurnedInAnnotation value or None, needs_review)``; review is needed for "YES", or for a missing
        value on ultrasound, secondary capture and similar images, unless a Clean Pixel Data option is recorded.
    """
    raw = ds.get("BurnedInAnnotation")
    value = None if raw is None else str(raw).upper()
    risky_kind = str(ds.get("Modality", "")).upper() in _BURNED_IN_MODALITIES or str(
        ds.get("SOPClassUID", "")
    ).startswith(_SECONDARY_CAPTURE_PREFIX)
    codes = ds.get("DeidentificationMethodCodeSequence", [])
    cleaned = any(str(it.get("CodeValue", "")) == CLEAN_PIXEL_CODE for it in codes)
    return value, (not cleaned) and (value == "YES" or (value is None and risky_kind))


def deidentification_problems(ds: Dataset, *, allow_burned_in: bool = False) -> list[str]:
    """Why ``ds`` does not look de-identified by :func:`covtoken.data.deid.deidentify`.

    Args:
        ds: dataset to check, file meta included.
        allow_burned_in: do not count possible burned-in annotation as a problem.

    Returns:
        Human-readable problems, each naming the element path; empty when none.
    """
    problems = []
    if str(ds.get("PatientIdentityRemoved", "")).upper() != "YES":
        problems.append("PatientIdentityRemoved is not YES")
    if METHOD not in [str(v) for v in values_of(ds.get("DeidentificationMethod"))]:
        problems.append(f"DeidentificationMethod does not record {METHOD!r}")
    table = profile_by_tag()
    elems = list(walk_elements(ds))
    if getattr(ds, "file_meta", None) is not None:
        elems += list(walk_elements(ds.file_meta, "meta."))
    for path, elem in elems:
        action = table.get(int(elem.tag))
        group = elem.tag.group & 0xFF00
        if elem.tag.is_private:
            problems.append(f"{path}: private tag")
        elif action is Action.REMOVE or group in (0x5000, 0x6000):
            problems.append(f"{path}: must be removed")
        elif action is Action.EMPTY and not elem.is_empty:
            problems.append(f"{path}: must be empty")
        elif elem.keyword == "PatientName" and not NAME_RE.match(str(elem.value or "")):
            problems.append(f"{path}: not a pseudonym")
        elif elem.keyword == "PatientID" and not ID_RE.match(str(elem.value or "")):
            problems.append(f"{path}: not a pseudonym")
        elif elem.VR == "PN" and elem.keyword != "PatientName" and not elem.is_empty:
            problems.append(f"{path}: person name present")
        elif elem.VR == "UI" and elem.keyword not in CLASS_UID_KEYWORDS:
            for v in values_of(elem.value):
                if str(v) and str(v) not in UID_dictionary and not REMAPPED_UID.match(str(v)):
                    problems.append(f"{path}: UID not remapped")
    value, needs_review = burned_in_risk(ds)
    if needs_review and not allow_burned_in:
        problems.append(f"pixels may carry burned-in annotation (BurnedInAnnotation={value})")
    return problems


def is_deidentified(ds: Dataset, *, allow_burned_in: bool = False) -> bool:
    """True when :func:`deidentification_problems` finds nothing."""
    return not deidentification_problems(ds, allow_burned_in=allow_burned_in)


def assert_deidentified(ds: Dataset, source: str, *, allow_burned_in: bool = False) -> None:
    """Refuse a dataset that was not de-identified by covtoken (the Hub upload path calls this).

    Args:
        ds: dataset about to leave the machine.
        source: file or item name for the error message.
        allow_burned_in: accept images flagged for possible burned-in annotation.

    Raises:
        ValueError: naming ``source`` and listing the problems.
    """
    problems = deidentification_problems(ds, allow_burned_in=allow_burned_in)
    if problems:
        raise ValueError(f"{source}: not de-identified: " + "; ".join(problems[:10]))
