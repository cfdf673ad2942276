"""Templated draft: every number is a reference into a gate record.

A draft starts with a front matter that names the records it reads::

    ---
    records:
      g1: gate_reports/g1-20261124t151344-46fa08.json
    ---

and refers to their fields with ``{{g1:metrics.mid_auroc.value|.3f}}`` (record key, field path with ``.`` and
``[i]``, format spec) and to figures with ``{{figure:g1_auroc_per_block}}``. Rendering never guesses: an
unknown key, a missing field, a value that is not a number where a number format is asked for, or a missing
record raises :class:`PaperError` naming the reference and its line. A value from a record whose evidence tier
is below ``real`` is followed by its tier (``<sup>flow-check</sup>``): a flow check never reads as evidence.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..evidence import tier_marker
from ..record import RecordError, read_record

__all__ = ["PaperError", "Draft", "parse_draft", "resolve", "render", "REF_RE"]

REF_RE = re.compile(r"\{\{\s*([A-Za-z0-9_-]+):([^|}]+?)(?:\|([^}]*))?\s*\}\}")
_PATH_RE = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


class PaperError(ValueError):
    """A reference, record or figure of the paper cannot be trusted; the message says which."""


@dataclass(frozen=True)
class Draft:
    path: Path
    records: dict[str, Path]  # key -> record path (relative to the repository root)
    body: str
    body_line: int  # line number of the body's first line in the file


def parse_draft(path: str | Path) -> Draft:
    """Split front matter (record keys) from the body."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        raise PaperError(f"{path}: line 1: a draft starts with '---' front matter naming its records")
    records: dict[str, Path] = {}
    end = None
    section = None
    for i, line in enumerate(lines[1:], start=2):
        s = line.rstrip("\n")
        if s.strip() == "---":
            end = i
            break
        if not s.strip() or s.lstrip().startswith("#"):
            continue
        if not s.startswith(" "):
            section = s.split(":", 1)[0].strip()
            continue
        if section == "records":
            key, _, value = s.strip().partition(":")
            if not value.strip():
                raise PaperError(f"{path}: line {i}: record {key!r} has no path")
            if key in records:
                raise PaperError(f"{path}: line {i}: record key {key!r} defined twice")
            records[key.strip()] = Path(value.strip())
    if end is None:
        raise PaperError(f"{path}: front matter is not closed with '---'")
    if not records:
        raise PaperError(f"{path}: front matter names no records")
    return Draft(path, records, "".join(lines[end:]), end + 1)


def resolve(obj: Any, field: str, *, where: str) -> Any:
    """Follow ``a.b[0].c`` into nested dicts and lists."""
    cur = obj
    pos = 0
    for m in _PATH_RE.finditer(field.strip()):
        name, index = m.group(1), m.group(2)
        try:
            cur = cur[int(index)] if index is not None else cur[name]
        except (KeyError, IndexError, TypeError):
            raise PaperError(f"{where}: field {field!r} does not resolve at {field[:m.end()]!r}") from None
        pos = m.end()
    if pos == 0:
        raise PaperError(f"{where}: empty field path")
    return cur


def _format(value: Any, spec: str | None, where: str) -> str:
    if spec:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PaperError(f"{where}: format {spec!r} needs a number, the record has {value!r}")
        return format(value, spec)
    if isinstance(value, (dict, list)):
        raise PaperError(f"{where}: refers to a structure, not a value")
    return str(value)


def load_records(draft: Draft, root: Path) -> dict[str, dict]:
    """Read and validate every record the draft names (a missing record is an error, never a skip)."""
    out = {}
    for key, rel in draft.records.items():
        try:
            out[key] = read_record(root / rel)
        except RecordError as exc:
            raise PaperError(f"{draft.path}: record {key!r}: {exc}") from None
    return out


def render(draft: Draft, records: dict[str, dict], figure: Callable[[str, str], str]) -> tuple[str, list[str]]:
    """Replace every reference in the body.

    Args:
        draft: the parsed draft.
        records: key -> record (from :func:`load_records`).
        figure: ``figure(name, where) -> markdown`` for ``{{figure:name}}`` references.

    Returns:
        ``(rendered body, list of references used)``.
    """
    used: list[str] = []
    out_lines = []
    for offset, line in enumerate(draft.body.splitlines(keepends=True)):
        where_line = f"{draft.path}: line {draft.body_line + offset}"

        def sub(m: re.Match) -> str:
            key, field, spec = m.group(1), m.group(2).strip(), m.group(3)
            where = f"{where_line}: {{{{{m.group(0)[2:-2].strip()}}}}}"
            used.append(m.group(0))
            if key == "figure":
                return figure(field, where)
            if key not in records:
                raise PaperError(f"{where}: unknown record key {key!r}; the front matter has {sorted(records)}")
            # every number from a record below `real` carries its evidence tier (flow checks are never evidence)
            return (_format(resolve(records[key], field, where=where), spec, where)
                    + tier_marker(records[key].get("evidence", "flow-check")))

        out_lines.append(REF_RE.sub(sub, line))
    body = "".join(out_lines)
    if "{{" in body:
        raise PaperError(f"{draft.path}: a '{{{{' is left after rendering: malformed reference")
    if not used:
        raise PaperError(f"{draft.path}: no references at all; a draft whose numbers come from nowhere is refused")
    return body, used
