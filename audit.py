"""The audit: recompute every decision from its record and the locked thresholds, and fail closed.

For each record under a results folder the audit checks the schema, that the lock it names is intact and
that its entry digest is the one the record was judged under, that the record's criteria are the locked
ones, that re-applying the decision rule to the recorded metrics gives the recorded outcomes and decision,
that the provenance is complete, and that every artefact is present with the recorded hash (and that no
unlisted file sits in the run's artefact folder). When git history is available it also checks that the
lock entry was committed at or before the code commit that produced the record (pre-registration).

Any problem makes the audit fail and is reported with the file and field. Only a clean audit regenerates
``SUMMARY.md`` and ``NEGATIVE_RESULT.md``; an empty folder is a failure, never a pass.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .calibration_check import calibration_overlaps
from .evidence import audit_evidence
from .lock import LockError, ThresholdLock, criterion_signature, entry_digest, judge
from .provenance import git, repo_root
from .record import RecordError, iter_record_paths, loads_strict, read_record, sha256_file

__all__ = ["AuditReport", "audit_folder", "preregistration", "render_summary", "render_negative"]

log = logging.getLogger(__name__)
SUMMARY = "SUMMARY.md"
NEGATIVE = "NEGATIVE_RESULT.md"
WALL_TOLERANCE_S = 5.0


@dataclass
class RecordAudit:
    path: Path
    record: dict | None = None
    problems: list[str] = field(default_factory=list)
    prereg: tuple[str, str] = ("unavailable", "not checked")
    marks: list[str] = field(default_factory=list)  # shown on the record's summary row (allowed exceptions)

    def fail(self, fld: str, msg: str) -> None:
        self.problems.append(f"{self.path}: field {fld}: {msg}")


@dataclass
class AuditReport:
    folder: Path
    records: list[RecordAudit]
    problems: list[str]
    missing: list = field(default_factory=list)  # ledger runs without a record (audit_integrity.MissingRun)

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.records) and all(not r.problems for r in self.records)

    def all_problems(self) -> list[str]:
        return self.problems + [p for r in self.records for p in r.problems]


def _check_lock(ra: RecordAudit, lock: ThresholdLock) -> None:
    rec = ra.record
    assert rec is not None
    try:
        entry = lock.entry(rec["lock"]["entry"])
    except LockError as exc:
        ra.fail("lock/entry", str(exc))
        return
    if rec["lock"]["entry_digest"] != entry.digest:
        ra.fail("lock/entry_digest", f"record was judged under {rec['lock']['entry_digest']}, the lock entry "
                                     f"{entry.key} is now {entry.digest}")
    if entry.gate_id != rec["gate_id"]:
        ra.fail("lock/entry", f"entry {entry.key} belongs to another gate than {rec['gate_id']}")
    if rec["claim"] != entry.claim:
        ra.fail("claim", "differs from the claim locked for the gate")
    params = rec["provenance"].get("parameters")
    if params is not None and params != dict(entry.parameters):
        diff = sorted(k for k in set(params) | set(entry.parameters) if params.get(k) != entry.parameters.get(k))
        ra.fail("provenance/parameters", f"the run's protocol parameters differ from the locked entry's in {diff}")
    want_bb = entry.parameters.get("backbone")  # an entry calibrated on one backbone judges that backbone only
    got_bb = (rec["provenance"].get("backbone") or {}).get("name")
    if want_bb is not None and got_bb != want_bb:
        ra.fail("provenance/backbone/name", f"{got_bb!r} judged under {entry.key}, which was calibrated on and "
                                            f"judges backbone {want_bb!r} only")
    seen = entry.parameters.get("backbone_pretraining_seeds") or []
    if seen and rec["provenance"].get("seed") in seen:
        ra.fail("provenance/seed", f"{rec['provenance']['seed']} drew the phantoms the backbone of {entry.key} was "
                                   "pretrained on: its test patients were pretraining images")
    locked = [criterion_signature(c) for c in entry.criteria]  # incl. minimum effects and validity roles
    recorded = [criterion_signature(c) for c in rec["criteria"]]
    if locked != recorded:
        for i in range(max(len(locked), len(recorded))):
            a = locked[i] if i < len(locked) else None
            b = recorded[i] if i < len(recorded) else None
            if a != b:
                ra.fail(f"criteria/{i}", f"recorded {b} but the lock has {a}")
                break
        return
    decision, judged, reason = judge(entry.criteria, rec["metrics"])
    got_reason = rec.get("decision_reason")
    if got_reason is not None and rec["provenance"]["backend"].get("aggregate_of"):
        got_reason = got_reason.split("; failed cells not aggregated: ")[0]  # the sweep names its failed cells
    if got_reason is not None and got_reason != reason:
        ra.fail("decision_reason", f"recorded {rec['decision_reason']!r}, recomputed {reason!r}")
    for i, (want, got) in enumerate(zip(judged, rec["criteria"])):
        for key in ("observed", "point", "outcome", "bar"):
            if want.get(key) != got.get(key):
                ra.fail(f"criteria/{i}/{key}", f"recorded {got[key]!r}, recomputed {want[key]!r}")
    if decision != rec["decision"]:
        ra.fail("decision", f"recorded {rec['decision']!r}, recomputed {decision!r} from the metrics and the lock")


def _check_provenance(ra: RecordAudit) -> None:
    prov = ra.record["provenance"]
    bb = prov["backbone"]
    if bb["hub_id"] is not None and not bb["revision"]:
        ra.fail("provenance/backbone/revision", f"Hub backbone {bb['hub_id']} without a revision")
    ds = prov["dataset"]
    if not ds["n_patients"] or not all(v > 0 for v in ds["n_patients"].values()):
        ra.fail("provenance/dataset/n_patients", f"empty split in {ds['n_patients']}")
    if prov["backend"]["name"] == "hf-jobs" and not prov["backend"]["job_id"]:
        ra.fail("provenance/backend/job_id", "an HF Jobs run must carry its job id")
    if prov["backend"]["name"] == "hf-jobs" and "image" in prov["backend"]:
        _check_image(ra, prov["backend"])
    if prov["code"]["dirty"] and not prov["code"].get("diff_sha256"):
        ra.fail("provenance/code/diff_sha256", "a dirty run must carry the hash of its diff")
    from datetime import datetime

    def ts(s: str) -> datetime:
        return datetime.fromisoformat(s.replace("Z", "+00:00"))

    span = (ts(prov["finished_at"]) - ts(prov["started_at"])).total_seconds()
    if abs(span - prov["wall_seconds"]) > WALL_TOLERANCE_S:
        ra.fail("provenance/wall_seconds", f"{prov['wall_seconds']:.1f} s but start/end span {span:.1f} s")


def _check_image(ra: RecordAudit, be: dict) -> None:
    """The image an HF job ran in: the Hub's report equals the launch request, and the digest field is the
    reference's own, of the form sha256:<64 hex> (its existence was the registry's to check at pull time)."""
    from .hfjobs.images import digest_of, is_digest

    image, digest = be.get("image"), be.get("image_digest")
    if "image_requested" in be and be["image_requested"] != image:
        ra.fail("provenance/backend/image", f"the Hub reports {image!r}, the job was launched with "
                                            f"{be['image_requested']!r} (COVTOKEN_IMAGE)")
    if digest != digest_of(image or ""):
        ra.fail("provenance/backend/image_digest", f"{digest!r} is not the digest of the image reference {image!r}")
    elif digest is not None and not is_digest(digest):
        ra.fail("provenance/backend/image_digest", f"{digest!r} is not sha256:<64 hex>")


def _check_artefacts(ra: RecordAudit) -> None:
    rec = ra.record
    base = ra.path.parent
    listed = set()
    for i, art in enumerate(rec["artefacts"]):
        f = base / art["path"]
        listed.add(f.resolve())
        if not art["path"].startswith(f"artefacts/{rec['run_id']}/"):
            ra.fail(f"artefacts/{i}/path", f"{art['path']} is outside artefacts/{rec['run_id']}/")
        if not f.is_file():
            ra.fail(f"artefacts/{i}/path", f"{f} is missing")
            continue
        if f.stat().st_size != art["bytes"]:
            ra.fail(f"artefacts/{i}/bytes", f"{f} has {f.stat().st_size} bytes, recorded {art['bytes']}")
        if sha256_file(f) != art["sha256"]:
            ra.fail(f"artefacts/{i}/sha256", f"{f} does not match its recorded hash")
    run_dir = base / "artefacts" / rec["run_id"]
    if run_dir.is_dir():
        for f in sorted(run_dir.rglob("*")):
            if f.is_file() and f.resolve() not in listed:
                ra.fail("artefacts", f"{f} is in the run's artefact folder but not listed in the record")


def preregistration(record: dict, lock_path: Path) -> tuple[str, str]:
    """Was the lock entry committed at or before the code commit that produced the record?

    Returns:
        ``(status, detail)`` with status ``pre-registered``, ``not-registered`` or ``unavailable``.
    """
    root = repo_root()
    if root is None:
        return "unavailable", "no git checkout"
    commit = record["provenance"]["code"]["commit"]
    if git(root, "cat-file", "-t", commit, check=False).strip() != "commit":
        return "unavailable", f"code commit {commit[:12]} is not in this clone's history"
    try:
        rel = lock_path.resolve().relative_to(root).as_posix()
    except ValueError:
        return "unavailable", f"lock {lock_path} is outside the repository"
    gate_id, _, name = record["lock"]["entry"].partition("/")
    want = record["lock"]["entry_digest"]
    first = None
    for c in git(root, "log", "--format=%H", "--reverse", "--", rel).split():
        try:
            doc = loads_strict(git(root, "show", f"{c}:{rel}"), source=f"{c[:12]}:{rel}")
            gate = doc["gates"][gate_id]
            entry = gate["entries"][name]
        except (KeyError, TypeError, RecordError):
            continue
        if entry.get("digest") == want and entry_digest(gate_id, gate["claim"], name, entry) == want:
            first = first or c
            if _is_ancestor(root, c, commit):
                return "pre-registered", f"lock entry committed in {c[:12]}, code at {commit[:12]}"
    if first:
        return "not-registered", f"lock entry first committed in {first[:12]}, after the code commit {commit[:12]}"
    return "not-registered", f"lock entry digest {want[:19]}... was never committed"


def _is_ancestor(root: Path, a: str, b: str) -> bool:
    import subprocess

    return subprocess.run(["git", "-C", str(root), "merge-base", "--is-ancestor", a, b]).returncode == 0


def audit_folder(folder: str | Path, *, lock_path: str | Path, allow_unproven_prereg: bool = False,
                 allow_dirty: bool = False, allow_missing_records: bool = False,
                 hub_repo_copy: bool = False) -> AuditReport:
    """Audit every record under ``folder`` against the lock at ``lock_path``.

    ``hub_repo_copy``: the folder is a download of a Hub results repo (the dataset card's audit), which carries no
    run ledger; every other check applies.

    Fails closed: pre-registration that cannot be proven, a dirty-tree record and a started run without a record
    each fail unless the matching ``allow_*`` flag is given, and then the summary row says so.
    """
    folder, lock_path = Path(folder), Path(lock_path)
    report = AuditReport(folder, [], [])
    if not folder.is_dir():
        report.problems.append(f"{folder}: results folder is missing")
        return report
    try:
        lock = ThresholdLock.load(lock_path)
    except (LockError, RecordError) as exc:
        report.problems.append(str(exc))
        return report
    paths = iter_record_paths(folder)
    if not paths:
        report.problems.append(f"{folder}: no gate records found; an empty audit is not a pass")
    seen: dict[str, Path] = {}
    for p in paths:
        ra = RecordAudit(p)
        report.records.append(ra)
        try:
            ra.record = read_record(p)
        except RecordError as exc:
            ra.problems.append(str(exc))
            continue
        rid = ra.record["run_id"]
        if rid in seen:
            ra.fail("run_id", f"duplicate of {seen[rid]}")
        seen[rid] = p
        _check_lock(ra, lock)
        for fld, msg in audit_evidence(ra.record):  # the tier, recomputed from the record's facts
            ra.fail(fld, msg)
        _check_provenance(ra)
        _check_artefacts(ra)
        ra.prereg = preregistration(ra.record, lock_path)
        if ra.prereg[0] == "not-registered":
            ra.fail("lock/entry_digest", f"thresholds were not pre-registered: {ra.prereg[1]}")
        _check_integrity(ra, lock_path, lock.digest, allow_unproven_prereg=allow_unproven_prereg,
                         allow_dirty=allow_dirty)
    from .audit_integrity import check_store

    report.missing = check_store(folder, report.records, report.problems, allow_missing=allow_missing_records,
                                 hub_repo_copy=hub_repo_copy)
    report.problems += calibration_overlaps(lock, [(str(r.path), r.record) for r in report.records if r.record])
    return report


def _check_integrity(ra: RecordAudit, lock_path: Path, lock_digest: str, *, allow_unproven_prereg: bool,
                     allow_dirty: bool) -> None:
    """Recompute the metrics, cross-check provenance, code and files (covtoken.audit_integrity)."""
    from .audit_integrity import check_code, check_files, check_lock_file_digest, check_recompute, check_sealed

    if ra.prereg[0] == "unavailable":
        if allow_unproven_prereg:
            ra.marks.append(f"pre-registration unproven ({ra.prereg[1]})")
        else:
            ra.fail("lock/entry_digest", f"pre-registration cannot be proven: {ra.prereg[1]} "
                                         "(audit --allow-unproven-prereg accepts it, marked in the summary)")
    ra.marks += check_code(ra, allow_dirty=allow_dirty)
    check_files(ra)
    check_lock_file_digest(ra, lock_path, lock_digest,
                           unproven_ok=ra.prereg[0] == "unavailable" and allow_unproven_prereg)
    check_sealed(ra, check_recompute(ra))


# ------------------------------------------------------------------------------------------------ summaries
# Rendering lives in covtoken.summary (tiers separated, binding criterion, reruns grouped); re-exported here.
from .summary import render_negative, render_summary  # noqa: E402
