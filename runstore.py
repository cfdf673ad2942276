"""A results folder's run store: the run ledger, staged run folders, one-step commits, and content digests.

Layout of a results folder::

    ledger.jsonl                   one line per run start (or resume): run id, gate, entry, time, command digest
    .staging/<run_id>/             a run in progress: artefacts/<run_id>/..., then <run_id>.json
    <run_id>.json                  a finished run's record
    artefacts/<run_id>/...         its artefacts

A run writes only under ``.staging/<run_id>/``. :func:`commit_run` moves the artefact folder into place with
one rename and then links the record into place (the record is the commit point: a run without its record is
not a result). A run killed at any point leaves either nothing outside staging, or its artefact folder with
the record still staged; :func:`recover_commit` finishes the latter, and rerunning the job with the same
``--run-id`` discards whatever else was staged and starts the run again. The audit reports every staging
leftover, every artefact folder without a record, and every ledger entry without a record.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .record import RecordError, dumps_strict, loads_strict, read_record

__all__ = ["atomic_copy", "install_run", "LEDGER", "STAGING", "append_ledger", "read_ledger", "staging_dir", "commit_run", "recover_commit",
           "content_digest", "config_digest", "DiskWriteError"]

LEDGER = "ledger.jsonl"
STAGING = ".staging"


class DiskWriteError(OSError):
    """Writing a run's files failed (disk full, permissions); the message names the path."""


def staging_dir(results_dir: str | Path, run_id: str) -> Path:
    return Path(results_dir) / STAGING / run_id


def config_digest(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (a run's command and config)."""
    return "sha256:" + hashlib.sha256(dumps_strict(obj).encode()).hexdigest()


def append_ledger(results_dir: str | Path, entry: dict) -> None:
    """Append one JSON line to ``<results_dir>/ledger.jsonl`` (O_APPEND, fsynced)."""
    path = Path(results_dir) / LEDGER
    line = json.dumps(entry, allow_nan=False, sort_keys=True, separators=(",", ":")) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise DiskWriteError(exc.errno or errno.EIO, f"{path}: cannot append the run ledger entry: {exc.strerror or exc}") from None


def read_ledger(results_dir: str | Path) -> list[dict]:
    """The ledger entries of a results folder ([] when it has no ledger)."""
    path = Path(results_dir) / LEDGER
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        doc = loads_strict(line, source=f"{path}:{i}")
        if not isinstance(doc, dict) or not isinstance(doc.get("run_id"), str):
            raise RecordError(f"{path}:{i}: a ledger line must be an object with a run_id")
        out.append(doc)
    return out


def commit_run(results_dir: str | Path, run_id: str) -> Path:
    """Move a staged run (``.staging/<run_id>/``: artefacts and the record) into the results folder.

    One rename places the artefact folder, one link places the record (never overwriting), then the staging
    folder is removed. Returns the record path.
    """
    results_dir = Path(results_dir)
    stage = staging_dir(results_dir, run_id)
    staged_record = stage / f"{run_id}.json"
    if not staged_record.is_file():
        raise FileNotFoundError(f"{staged_record}: no staged record to commit")
    dest = results_dir / f"{run_id}.json"
    if dest.exists():
        raise FileExistsError(f"{dest}: a record with run id {run_id!r} exists; records are never overwritten")
    src_art, dst_art = stage / "artefacts" / run_id, results_dir / "artefacts" / run_id
    if src_art.is_dir():
        if dst_art.exists():
            raise FileExistsError(f"{dst_art}: an artefact folder for run {run_id} exists without its record")
        dst_art.parent.mkdir(parents=True, exist_ok=True)
        os.rename(src_art, dst_art)
    _fsync_dir(dst_art.parent)
    os.link(staged_record, dest)
    _fsync_dir(results_dir)
    shutil.rmtree(stage)
    _remove_empty(results_dir / STAGING)
    return dest


def recover_commit(results_dir: str | Path, run_id: str) -> Path | None:
    """Finish a commit that was interrupted (record staged, artefacts moved or not); None if none is pending.

    A record already in place with staging leftovers only has its leftovers removed.
    """
    results_dir = Path(results_dir)
    stage = staging_dir(results_dir, run_id)
    dest = results_dir / f"{run_id}.json"
    if dest.exists():
        if stage.exists():
            shutil.rmtree(stage)
            _remove_empty(results_dir / STAGING)
        return dest
    if not (stage / f"{run_id}.json").is_file():
        return None
    src_art, dst_art = stage / "artefacts" / run_id, results_dir / "artefacts" / run_id
    if dst_art.exists() and src_art.exists():
        raise FileExistsError(f"{dst_art}: artefacts of run {run_id} both staged and in place; cannot recover")
    return commit_run(results_dir, run_id)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_empty(d: Path) -> None:
    try:
        d.rmdir()
    except OSError:
        pass


#: Fields that differ between two genuine runs of the same configuration and say nothing about the result.
def content_digest(record: dict) -> str:
    """Digest of a record's content with its run id taken out (also inside artefact paths).

    Two records with the same content digest are one run counted twice: a copy under a new id. The times and
    the artefact hashes stay in, so two genuine runs (which start at different times) never collide.
    """
    rid = record.get("run_id", "")
    body = {k: v for k, v in record.items() if k != "run_id"}
    text = dumps_strict(body)
    if rid:
        text = text.replace(rid, "<run_id>")
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def atomic_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install_run(staging: Path, run_id: str, dest: Path) -> Path:
    """Copy one run's record and artefacts from ``staging`` into ``dest``: artefacts first, record last, every
    file through a temporary file and a rename; never overwrites a record or an artefact folder."""
    src = staging / f"{run_id}.json"
    read_record(src)  # a malformed record is never fetched
    target = dest / f"{run_id}.json"
    if target.exists():
        raise FileExistsError(f"{target}: run already fetched; records are never overwritten")
    art_src, art_dst = staging / "artefacts" / run_id, dest / "artefacts" / run_id
    if art_src.is_dir():
        if art_dst.exists():  # a fetch interrupted after the artefacts, before the record: take them again
            shutil.rmtree(art_dst)
        part = art_dst.with_name(f".{run_id}.part")
        if part.exists():
            shutil.rmtree(part)
        for f in sorted(art_src.rglob("*")):
            if f.is_file():
                atomic_copy(f, part / f.relative_to(art_src))
        os.replace(part, art_dst)
    atomic_copy(src, target)
    return target
