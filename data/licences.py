"""Licence texts as the catalog writes them ("CC BY-NC 4.0 (HAM10000)") -> SPDX identifiers ("CC-BY-NC-4.0").

A dataset card must carry the licence the data really has: a Creative Commons licence that merely does not match
a short lookup list is not "other". :func:`spdx_licence` reads CC0 and every CC BY variant with its version, and a
few plain SPDX ids; anything else raises, and the caller asks the user to state the SPDX id.
"""
from __future__ import annotations

import re

from .errors import DataError

__all__ = ["spdx_licence", "hub_licence"]

_CC0 = re.compile(r"\bCC[\s-]*0(?:[\s-]+1\.0)?\b", re.I)
_CC_BY = re.compile(r"\bCC[\s-]+BY((?:[\s-]+(?:NC|SA|ND))*)[\s-]+(\d\.\d)\b", re.I)
_PLAIN = {"mit": "MIT", "apache-2.0": "Apache-2.0", "bsd-3-clause": "BSD-3-Clause", "odbl-1.0": "ODbL-1.0",
          "pddl-1.0": "PDDL-1.0", "cdla-permissive-2.0": "CDLA-Permissive-2.0"}


def spdx_licence(text: str) -> str:
    """The SPDX id of the first licence named in ``text``.

    Raises:
        DataError: no licence recognised (the message asks for an explicit SPDX id).
    """
    t = text.strip()
    if t.lower() in _PLAIN:
        return _PLAIN[t.lower()]
    by, zero = _CC_BY.search(t), _CC0.search(t)
    if by and (not zero or by.start() < zero.start()):
        parts = [p.upper() for p in re.split(r"[\s-]+", by.group(1)) if p]
        return "-".join(["CC", "BY", *parts, by.group(2)])
    if zero:
        return "CC0-1.0"
    raise DataError(f"licence {text!r}: no SPDX identifier recognised; state it explicitly (e.g. --licence "
                    "CC-BY-NC-4.0)")


def hub_licence(spdx: str) -> str:
    """The Hugging Face Hub ``license:`` tag of an SPDX id (the Hub uses the lower-case form)."""
    return spdx.lower()
