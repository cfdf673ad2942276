"""The gate record: one JSON Schema, one strict writer, one reader. Jobs, the audit and the paper all use it.

A record lives in a results folder as ``<run_id>.json``; its artefacts live beside it under
``artefacts/<run_id>/`` and are listed in the record with their sha256. Records are written atomically
(temporary file, fsync, hard link into place) and never overwritten: a second run gets a new run id.
JSON is strict both ways: NaN and Infinity are rejected when writing and when reading.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import tempfile
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import jsonschema

__all__ = [
    "RecordError",
    "schema",
    "validate_record",
    "dumps_strict",
    "loads_strict",
    "read_record",
    "write_json_atomic",
    "write_record",
    "new_run_id",
    "sha256_file",
    "ArtefactWriter",
    "utc_now",
    "iter_record_paths",
    "sealed_fields",
]

RUN_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{7,80}$")


class RecordError(ValueError):
    """A record (or a file it points to) is malformed; the message names the file and the field."""


@lru_cache(maxsize=1)
def schema() -> dict:
    """The gate-record JSON Schema (draft 2020-12), shipped as ``configs/gate_record.schema.json``."""
    text = resources.files("covtoken").joinpath("configs/gate_record.schema.json").read_text()
    sch = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(sch)
    return sch


def _field(path: Iterator[Any]) -> str:
    parts = [str(p) for p in path]
    return "/".join(parts) if parts else "<root>"


def validate_record(record: Any, *, source: str = "<record>") -> None:
    """Check ``record`` against the schema and the cross-field rules the schema cannot express.

    Raises:
        RecordError: naming ``source`` and the first offending field.
    """
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(record), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        e = errors[0]
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise RecordError(f"{source}: field {_field(e.absolute_path)}: {e.message}{more}")
    metrics = record["metrics"]
    for i, c in enumerate(record["criteria"]):
        if c["metric"] not in metrics:
            raise RecordError(f"{source}: field criteria/{i}/metric: {c['metric']!r} is not among the metrics")
    for name, m in metrics.items():
        if m["ci"] is not None:
            lo, hi = m["ci"]
            if lo > hi:
                raise RecordError(f"{source}: field metrics/{name}/ci: lower bound {lo} above upper bound {hi}")
            if m.get("ci_method") in (None, ""):
                raise RecordError(f"{source}: field metrics/{name}/ci_method: a CI needs the method that produced it")
    prov = record["provenance"]
    if prov["finished_at"] < prov["started_at"]:
        raise RecordError(f"{source}: field provenance/finished_at: before provenance/started_at")


def _reject_constant(token: str) -> float:
    raise ValueError(f"non-JSON number {token!r}")


def dumps_strict(obj: Any) -> str:
    """Serialise with ``allow_nan=False`` (NaN/Infinity raise) and a stable key order."""
    return json.dumps(obj, allow_nan=False, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def loads_strict(text: str, *, source: str = "<json>") -> Any:
    """Parse JSON, rejecting NaN/Infinity and duplicate keys."""

    def no_dupes(pairs: list[tuple[str, Any]]) -> dict:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise RecordError(f"{source}: duplicate key {k!r}")
            out[k] = v
        return out

    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=no_dupes)
    except (json.JSONDecodeError, ValueError) as exc:
        if isinstance(exc, RecordError):
            raise
        raise RecordError(f"{source}: not strict JSON: {exc}") from None


def read_record(path: str | Path) -> dict:
    """Read and validate one record file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecordError(f"{path}: record file is missing") from None
    record = loads_strict(text, source=str(path))
    validate_record(record, source=str(path))
    if path.name != f"{record['run_id']}.json":
        raise RecordError(f"{path}: field run_id: {record['run_id']!r} does not match the file name")
    return record


def write_json_atomic(path: str | Path, obj: Any, *, overwrite: bool = False) -> Path:
    """Write strict JSON to ``path`` atomically.

    The text goes to a temporary file in the same folder, is fsynced, then linked into place. Without
    ``overwrite`` an existing file is never replaced (``FileExistsError``); nothing partial is ever visible.
    """
    path = Path(path)
    text = dumps_strict(obj)  # raises before anything touches the disk
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # fails with FileExistsError when the target exists
                except FileExistsError:
                    raise FileExistsError(f"{path}: exists; it is never overwritten (remove it or write elsewhere)"
                                          ) from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        if isinstance(exc, FileExistsError):
            raise
        raise OSError(exc.errno, f"{path}: cannot write ({exc.strerror or exc})", str(path)) from None
    return path


def write_record(record: dict, results_dir: str | Path) -> Path:
    """Validate ``record`` and write it as ``<results_dir>/<run_id>.json``, never overwriting.

    Artefact hashes are checked against the files on disk before the record is written.
    """
    results_dir = Path(results_dir)
    dest = results_dir / f"{record.get('run_id', '?')}.json"
    validate_record(record, source=str(dest))
    for i, art in enumerate(record["artefacts"]):
        f = results_dir / art["path"]
        if not f.is_file():
            raise RecordError(f"{dest}: field artefacts/{i}/path: {f} does not exist")
        if sha256_file(f) != art["sha256"]:
            raise RecordError(f"{dest}: field artefacts/{i}/sha256: does not match {f}")
    if dest.exists():
        raise FileExistsError(f"{dest}: a record with run id {record['run_id']!r} exists; records are never overwritten")
    return write_json_atomic(dest, record)


def new_run_id(gate_id: str, *, now: datetime | None = None) -> str:
    """``<gate>-<UTC yyyymmddThhmmss>-<6 random hex>``, e.g. ``g1-20261124t150102-3fa9c1``."""
    now = now or datetime.now(timezone.utc)
    return f"{gate_id.lower()}-{now.strftime('%Y%m%dt%H%M%S')}-{secrets.token_hex(3)}"


def utc_now() -> str:
    """Current UTC time as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ArtefactWriter:
    """Writes a run's artefacts under ``<results_dir>/artefacts/<run_id>/`` and remembers their hashes."""

    def __init__(self, results_dir: str | Path, run_id: str) -> None:
        if not RUN_ID_RE.match(run_id):
            raise ValueError(f"invalid run id {run_id!r}")
        self.results_dir = Path(results_dir)
        self.rel = Path("artefacts") / run_id
        self.dir = self.results_dir / self.rel
        self.entries: list[dict] = []

    def _add(self, name: str, data: bytes, description: str) -> Path:
        if "/" in name or name.startswith("."):
            raise ValueError(f"artefact name {name!r} must be a plain file name")
        self.dir.mkdir(parents=True, exist_ok=True)
        dest = self.dir / name
        if dest.exists():
            raise FileExistsError(f"{dest}: artefacts are never overwritten")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.dir)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.link(tmp, dest)
            finally:
                os.unlink(tmp)
        except OSError as exc:
            if isinstance(exc, FileExistsError):
                raise
            raise OSError(exc.errno, f"{dest}: cannot write artefact ({exc.strerror or exc})", str(dest)) from None
        self.entries.append({"path": f"{self.rel.as_posix()}/{name}", "sha256": hashlib.sha256(data).hexdigest(),
                             "bytes": len(data), "description": description})
        return dest

    def json(self, name: str, obj: Any, *, description: str) -> Path:
        """Write ``obj`` as strict JSON."""
        return self._add(name, dumps_strict(obj).encode(), description)

    def bytes(self, name: str, data: bytes, *, description: str) -> Path:
        """Write raw bytes (figures, CSV)."""
        return self._add(name, data, description)


SEALED_PROVENANCE = ("code", "seed", "backbone", "dataset", "command", "config", "parameters")


def sealed_fields(provenance: dict, *, evidence: Any, entry: str) -> dict:
    """The record fields the audit cannot recompute, as a run seals them in its ``evaluation.json``.

    One definition for the three places that need it: the runner and the sweep aggregate seal these values, and the
    audit requires the record to carry exactly them (a record edited after the run no longer matches).
    """
    sealed = {k: provenance.get(k) for k in SEALED_PROVENANCE}
    sealed.update(evidence=evidence, entry=entry)
    return sealed


def iter_record_paths(folder: str | Path) -> list[Path]:
    """Record files under ``folder``: every ``*.json`` outside ``artefacts/`` folders, sorted."""
    folder = Path(folder)
    out = []
    for p in sorted(folder.rglob("*.json")):
        rel = p.relative_to(folder)
        if "artefacts" in rel.parts[:-1] or any(part.startswith(".") for part in rel.parts):
            continue
        out.append(p)
    return out
