"""The audit's integrity checks: recompute every metric, cross-check provenance, fail closed on the unknown.

These checks extend :mod:`covtoken.audit` (which calls them for every record and once per folder):

* **recompute** - every metric of the record is recomputed from the run's stored evaluation inputs through
  the recipe that computed it (``evaluation.json`` + ``eval_inputs-<k>.npz``, see
  :mod:`covtoken.eval.recompute`); a metric no recipe produced, or any difference, fails.
* **sealed fields** - the record's provenance, seed, notes and sample flag must equal the copy the run sealed
  in ``evaluation.json``; the split sizes must equal the ``splits.json`` artefact; the lock file digest must
  be the digest of a version of the lock that holds the entry; the protocol parameters must be present.
* **code** - the record's tree id must be the tree of its commit (a commit swapped for another real commit
  fails); a dirty tree is not evidence and fails unless explicitly allowed.
* **files** - symlinks and special files in a run's artefact folder fail.
* **store** (per folder) - ledger entries without a record, records without a ledger entry, artefact folders
  without a record, staging leftovers, and records that duplicate another run's content under a new id.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from .provenance import git, repo_root
from .record import RecordError, loads_strict, sealed_fields, sha256_file

__all__ = ["check_recompute", "check_sealed", "check_code", "check_files", "check_lock_file_digest",
           "check_store", "MissingRun"]

EVALUATION = "evaluation.json"


def _artefact(ra: Any, name: str) -> Path | None:
    """The listed artefact ``name`` of the record, verified by hash, or None (the problem is recorded)."""
    rec = ra.record
    want = f"artefacts/{rec['run_id']}/{name}"
    for art in rec["artefacts"]:
        if art["path"] == want:
            f = ra.path.parent / want
            if f.is_symlink() or not f.is_file() or sha256_file(f) != art["sha256"]:
                return None  # reported by the artefact check
            return f
    return None


def _evaluation_doc(ra: Any) -> dict | None:
    f = _artefact(ra, EVALUATION)
    if f is None:
        ra.fail("artefacts", f"no intact {EVALUATION} artefact: the metrics cannot be recomputed from stored inputs")
        return None
    try:
        doc = loads_strict(f.read_text(encoding="utf-8"), source=str(f))
    except RecordError as exc:
        ra.fail("artefacts", str(exc))
        return None
    if not isinstance(doc, dict) or doc.get("kind") != "covtoken.evaluation" or not isinstance(
            doc.get("evaluations"), list) or not isinstance(doc.get("sealed"), dict):
        ra.fail("artefacts", f"{f}: not a covtoken.evaluation document")
        return None
    return doc


_RECOMPUTED: dict[str, Any] = {}


def _recompute_cached(name: str, data: bytes, args: Any, evaluate: Any, unpack: Any) -> Any:
    """A recipe's result for these exact input bytes and arguments (recipes are pure, so equal keys give equal
    results; the cache only saves time when one process audits many copies of the same run)."""
    import hashlib
    import json

    key = hashlib.sha256(data).hexdigest() + name + json.dumps(args, sort_keys=True, allow_nan=False)
    if key not in _RECOMPUTED:
        if len(_RECOMPUTED) > 32:
            _RECOMPUTED.clear()
        _RECOMPUTED[key] = evaluate(name, unpack(data), args)
    return _RECOMPUTED[key]


def check_recompute(ra: Any) -> dict | None:
    """Recompute every metric of ``ra.record`` from its stored inputs; returns the evaluation document."""
    from .eval.recompute import RecipeError, compare_metrics, evaluate, unpack_arrays

    # a sweep aggregate is recomputed twice: from its stored per-seed inputs (recipe sweep.seed_mean, here) and
    # from its cells' records in the audited folder (check_aggregates)
    doc = _evaluation_doc(ra)
    if doc is None:
        return None
    rec = ra.record
    covered: dict[str, int] = {}
    for i, call in enumerate(doc["evaluations"]):
        where = f"{EVALUATION}/evaluations/{i}"
        try:
            name, args, inputs, listed = call["recipe"], call["args"], call["inputs"], call["metrics"]
        except (KeyError, TypeError):
            ra.fail("artefacts", f"{where}: needs recipe, args, inputs and metrics")
            continue
        f = _artefact(ra, inputs) if isinstance(inputs, str) and "/" not in inputs else None
        if f is None:
            ra.fail("artefacts", f"{where}: evaluation inputs {inputs!r} are not an intact listed artefact")
            continue
        try:
            ev = _recompute_cached(name, f.read_bytes(), args, evaluate, unpack_arrays)
        except (RecipeError, ValueError, KeyError, TypeError, OSError) as exc:
            ra.fail("metrics", f"{where}: recipe {name!r} cannot be recomputed from {f.name}: {exc}")
            continue
        if sorted(ev.metrics) != sorted(listed):
            ra.fail("metrics", f"{where}: recipe {name} produces {sorted(ev.metrics)}, listed {sorted(listed)}")
        for m, value in ev.metrics.items():
            if m in covered:
                ra.fail(f"metrics/{m}", f"produced by evaluations {covered[m]} and {i}")
            covered[m] = i
            if m not in rec["metrics"]:
                ra.fail(f"metrics/{m}", f"recomputed by recipe {name} but missing from the record")
                continue
            for d in compare_metrics({m: value}, {m: rec["metrics"][m]})[:3]:
                ra.fail(f"metrics/{m}", f"does not match its recomputation from {f.name} ({d})")
    for m in sorted(set(rec["metrics"]) - set(covered)):
        ra.fail(f"metrics/{m}", "no stored evaluation input covers this metric; it cannot be recomputed")
    return doc


def check_sealed(ra: Any, doc: dict | None) -> None:
    """Fields the audit cannot recompute must equal what the run sealed; split sizes must match the splits."""
    rec, prov = ra.record, ra.record["provenance"]
    if "parameters" not in prov:
        ra.fail("provenance/parameters", "missing: the run's locked protocol parameters cannot be checked")
    cfg_seed = prov["config"].get("seed")
    if cfg_seed is not None and cfg_seed != prov["seed"]:
        ra.fail("provenance/seed", f"{prov['seed']} but the run's config has seed {cfg_seed}")
    _check_splits(ra)
    if doc is None:
        return
    sealed = doc["sealed"]
    want = sealed_fields(prov, evidence=rec.get("evidence"), entry=rec["lock"]["entry"])
    for k, v in want.items():
        if sealed.get(k) != v:
            fld = {"evidence": "evidence", "entry": "lock/entry"}.get(k, f"provenance/{k}")
            ra.fail(fld, f"differs from the value the run sealed in {EVALUATION}")
    if doc.get("notes") != rec.get("notes", []):
        ra.fail("notes", f"differ from the notes the run sealed in {EVALUATION}")


def _check_splits(ra: Any) -> None:
    f = _artefact(ra, "splits.json")
    if f is None:
        return
    try:
        doc = loads_strict(f.read_text(encoding="utf-8"), source=str(f))
        counts = {k: len(v) for k, v in doc["membership"].items()}
        seed, digest = doc.get("seed"), doc.get("membership_sha256")
    except (RecordError, KeyError, TypeError, AttributeError) as exc:
        ra.fail("artefacts", f"{f}: unreadable split manifest: {exc}")
        return
    ds = ra.record["provenance"]["dataset"]
    if ds["n_patients"] != counts:
        ra.fail("provenance/dataset/n_patients", f"{ds['n_patients']} but {f.name} holds {counts}")
    if ds.get("split_seed") != seed:
        ra.fail("provenance/dataset/split_seed", f"{ds.get('split_seed')} but {f.name} was split with seed {seed}")
    got = (ds.get("splits") or {}).get("membership_sha256")
    if got is not None and got != digest:
        ra.fail("provenance/dataset/splits/membership_sha256", f"does not match {f.name}")


def check_lock_file_digest(ra: Any, lock_path: Path, current_digest: str, *, unproven_ok: bool = False) -> None:
    """``lock.file_digest`` must be the digest of the current lock or of a committed version of it.

    ``unproven_ok``: the record's pre-registration is already unprovable here and the user accepted that
    (``--allow-unproven-prereg``, e.g. a record whose commit this clone lacks): a digest that no version in this
    history has is then marked in the summary, not failed, for the same reason.
    """
    want = ra.record["lock"]["file_digest"]
    if want == current_digest:
        return
    root = repo_root()
    rel = None
    if root is not None:
        try:
            rel = lock_path.resolve().relative_to(root).as_posix()
        except ValueError:
            rel = None
    if rel is not None:
        for c in git(root, "log", "--format=%H", "--", rel, check=False).split():
            try:
                doc = loads_strict(git(root, "show", f"{c}:{rel}", check=False) or "null", source=f"{c[:12]}:{rel}")
            except RecordError:
                continue
            if isinstance(doc, dict) and doc.get("digest") == want:
                return
    if unproven_ok:
        ra.marks.append("lock file digest unproven (no version of the lock in this history has it)")
        return
    ra.fail("lock/file_digest", f"{want[:19]}... is neither the digest of {lock_path} nor of any committed version of it")


def check_code(ra: Any, *, allow_dirty: bool) -> list[str]:
    """The tree id must be the commit's tree; a dirty tree fails unless allowed. Returns summary marks."""
    code = ra.record["provenance"]["code"]
    marks = []
    if code["dirty"]:
        marks.append("dirty tree: not evidence")
        if not allow_dirty:
            ra.fail("provenance/code/dirty", "the run's code had uncommitted changes: not evidence "
                                             "(audit --allow-dirty accepts it, marked in the summary)")
    root = repo_root()
    tree = code.get("tree")
    if root is not None and git(root, "cat-file", "-t", code["commit"], check=False).strip() == "commit":
        actual = git(root, "rev-parse", f"{code['commit']}^{{tree}}", check=False).strip()
        if tree is not None and tree != actual:
            ra.fail("provenance/code/tree", f"{tree[:12]} is not the tree of commit {code['commit'][:12]} ({actual[:12]}): "
                                            "the commit was changed after the run")
    return marks


def check_files(ra: Any) -> None:
    """Symlinks and special files anywhere in the run's artefact folder fail."""
    base = ra.path.parent / "artefacts"
    run_dir = base / ra.record["run_id"]
    for p in (base, run_dir):
        if p.is_symlink():
            ra.fail("artefacts", f"{p} is a symlink")
            return
    if not run_dir.exists():
        return
    for dirpath, dirnames, filenames in os.walk(run_dir, followlinks=False):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                ra.fail("artefacts", f"{p} is a symlink; artefacts must be regular files")
            elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                ra.fail("artefacts", f"{p} is a special file; artefacts must be regular files")


class MissingRun(dict):
    """A ledger entry whose run has no record (``run_id``, ``gate_id``, ``time``, ``why``)."""


def check_store(folder: Path, records: list[Any], problems: list[str], *, allow_missing: bool,
                hub_repo_copy: bool = False) -> list[MissingRun]:
    """Folder-level checks; appends to ``problems`` and returns the started runs that have no record.

    Every folder holding records (``folder`` and any subfolder such as ``samples/``) is checked on its own:
    its ledger, its artefact folders, its staging area.
    """
    by_dir: dict[Path, list[Any]] = {folder: []}
    for ra in records:
        by_dir.setdefault(ra.path.parent, []).append(ra)
    missing: list[MissingRun] = []
    seen: dict[str, str] = {}
    check_aggregates(records)
    for d, ras in sorted(by_dir.items()):
        missing += _check_store_dir(d, ras, problems, allow_missing=allow_missing, hub_repo_copy=hub_repo_copy)
    for ra in sorted((r for r in records if r.record is not None), key=lambda r: r.record["run_id"]):
        from .runstore import content_digest

        dg = content_digest(ra.record)
        if dg in seen:
            ra.fail("run_id", f"same content as run {seen[dg]} under a new run id: one run counted twice")
        else:
            seen[dg] = ra.record["run_id"]
    return missing


def _check_store_dir(folder: Path, records: list[Any], problems: list[str], *, allow_missing: bool,
                     hub_repo_copy: bool = False) -> list[MissingRun]:
    from .runstore import LEDGER, STAGING, read_ledger

    try:
        ledger = read_ledger(folder)
    except RecordError as exc:
        problems.append(str(exc))
        ledger = []
    have = {ra.record["run_id"]: ra for ra in records if ra.record is not None}
    files = {ra.path.stem for ra in records}
    started: dict[str, dict] = {}
    refused = {e["run_id"] for e in ledger if e.get("event") == "refused"}
    for e in ledger:
        if not e.get("calibration") and e.get("event") != "refused":
            started.setdefault(e["run_id"], e)
    for rid in refused & set(have):
        have[rid].fail("run_id", f"run {rid} is marked refused in {folder / LEDGER} but has a record")
    for rid, ra in have.items():
        # An HF Jobs run is started on the Hub (its job id and attempt files); a local run must be in the ledger.
        # A copy of a Hub results repo (the dataset card's audit) has no ledger: the repo holds the runs' uploads.
        if rid not in started and not hub_repo_copy and not (ra.record["provenance"]["backend"]["name"] == "hf-jobs"
                                       and ra.record["provenance"]["backend"].get("job_id")):
            ra.fail("run_id", f"run {rid} has no start entry in {folder / LEDGER}: a run that was never started here")
    missing = []
    for rid, e in sorted(started.items()):
        if rid in files or rid in refused:
            continue  # refused runs stopped before the compute with exit 2: never a result
        why = "staged but never committed" if (folder / STAGING / rid).exists() else "no record (killed, failed or deleted)"
        missing.append(MissingRun(run_id=rid, gate_id=e.get("gate_id", "?"), time=e.get("time", "?"), why=why))
        if not allow_missing:
            problems.append(f"{folder / LEDGER}: run {rid} ({e.get('gate_id', '?')}, started {e.get('time', '?')}) "
                            f"has {why}; it is listed in NEGATIVE_RESULT.md (audit --allow-missing-records accepts it)")
    art = folder / "artefacts"
    if art.is_symlink():
        problems.append(f"{art}: the artefacts folder is a symlink")
    elif art.is_dir():
        for d in sorted(art.iterdir()):
            if d.name not in files:
                problems.append(f"{d}: artefact folder without a record (orphaned artefacts)")
    staging = folder / STAGING
    if staging.exists():
        for d in sorted(staging.iterdir()) if staging.is_dir() else [staging]:
            problems.append(f"{d}: staging leftover of an unfinished run; resume it with --run-id {d.name} or remove it")
    return missing


def _aggregate_of(record: dict) -> list[str] | None:
    agg = record["provenance"]["backend"].get("aggregate_of")
    return list(agg) if isinstance(agg, list) and agg else None


def check_aggregates(records: list[Any]) -> None:
    """A sweep aggregate's metrics must be the t-interval of its cells' values; the cells must be audited here."""
    from .eval.seed_mean import seed_stats
    from .eval.recompute import FLOAT_TOLERANCE

    by_id = {ra.record["run_id"]: ra for ra in records if ra.record is not None}
    for ra in records:
        if ra.record is None or not _aggregate_of(ra.record):
            continue
        cells = _aggregate_of(ra.record)
        absent = [c for c in cells if c not in by_id]
        if absent:
            ra.fail("provenance/backend/aggregate_of", f"cell record(s) {absent} are not in the audited folder; "
                                                       "the aggregate cannot be recomputed")
            continue
        for name, m in ra.record["metrics"].items():
            vals = [by_id[c].record["metrics"][name]["value"] for c in cells if name in by_id[c].record["metrics"]
                    and by_id[c].record["metrics"][name]["value"] is not None]
            st = seed_stats(vals, float(m.get("ci_level") or 0.95))
            got = [m["value"], *(m["ci"] or [None, None])]
            want = [st["mean"], *(st["ci"] or [None, None])]
            if any((a is None) != (b is None) or (a is not None and abs(a - b) > FLOAT_TOLERANCE)
                   for a, b in zip(got, want)):
                ra.fail(f"metrics/{name}", f"recorded {got}, recomputed {want} from cells {cells}")
