"""Fetch records and artefacts from the results repo into a results folder, and refresh the repo's card.

A run folder ``runs/<run_id>/`` of the results repo holds ``<run_id>.json`` and ``artefacts/<run_id>/``, the
layout of a results folder, so a fetched run is installed with the same checks as a local one: the record must
validate, nothing is ever overwritten, and every file lands through a temporary file and a rename (an
interrupted fetch leaves no partial record, and fetching again works). The repo's dataset card (README.md
with YAML metadata and the SUMMARY table) is regenerated from the repo's own records when their audit is
clean; a card the Hub's YAML validation rejects is a warning, never a failed fetch. A run whose record names
another image than the job spec it was submitted with (``attempts/<n>.json``: ``dockerImage`` and
``COVTOKEN_IMAGE``) is refused, not installed.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..audit import AuditReport, audit_folder, render_summary
from ..record import read_record
from ..runner import default_lock_path
from ..runstore import install_run  # noqa: F401  (re-exported: the backend installs fetched runs with it)
from .errors import HFJobsError
from .hubsync import attempt_path, record_path, run_prefix
from .query import last_attempt, read_json, repo_files
from .retry import with_retry

__all__ = ["FetchResult", "fetch_runs", "download_run", "install_run", "recorded_runs", "attempted_runs",
           "hub_ledger_entries", "record_hub_starts", "render_card", "publish_card", "run_state", "image_mismatch"]

CARD = "README.md"


@dataclass
class FetchResult:
    """What a fetch did: run ids fetched now, already present, missing (with how far each got) and refused
    (a record that contradicts its submitted spec, with why)."""

    dest: Path
    fetched: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    decisions: dict[str, tuple[str, str]] = field(default_factory=dict)  # run id -> (gate, decision)


def recorded_runs(api: Any, repo: str) -> list[str]:
    """Run ids with a record in ``repo``."""
    return sorted(m.group(1) for f in repo_files(api, repo, "runs")
                  if (m := re.fullmatch(r"runs/([a-z0-9][a-z0-9-]+)/\1\.json", f)))


def attempted_runs(api: Any, repo: str) -> list[str]:
    """Run ids with at least one attempt file (``runs/<id>/attempts/<n>.json``) in ``repo``: every run submitted."""
    return sorted({m.group(1) for f in repo_files(api, repo, "runs")
                   if (m := re.fullmatch(r"runs/([a-z0-9][a-z0-9-]+)/attempts/[0-9]+\.json", f))})


def _option(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def hub_ledger_entries(api: Any, repo: str, run_id: str) -> list[dict]:
    """The run's start facts on the Hub as ledger entries, in the local ledger's event format.

    One entry per attempt file: ``start`` for the first, ``resume`` for later ones (as a local rerun under the
    same run id), with the gate, lock entry (``--lock-entry`` when given), submission time, code commit (the
    bundle's build info), calibration flag and command digest, plus where it ran (``backend``, ``job_id``,
    ``attempt``, ``results_repo``). A run whose latest job ended in ERROR with exit status 2 (the kit's one-line
    user error, before the compute) also gets a ``refused`` entry, as a local refusal does.
    """
    from ..runstore import config_digest
    from .query import read_json
    from .spec import job_gate

    files = sorted((f for f in repo_files(api, repo, f"runs/{run_id}/attempts") if f.endswith(".json")),
                   key=lambda f: int(Path(f).stem))
    if not files:
        return []
    try:
        commit = read_json(api, repo, f"{run_prefix(run_id)}/code/build-info.json").get("commit")
    except Exception:  # noqa: BLE001 - a bundle without build info: the job's label still names the commit
        commit = None
    out = []
    for i, f in enumerate(files):
        doc = read_json(api, repo, f)
        args = [str(a) for a in doc.get("job_args", [])]
        out.append({"event": "start" if i == 0 else "resume", "run_id": run_id, "gate_id": job_gate(doc["job"]),
                    "entry": _option(args, "--lock-entry"), "time": doc.get("submitted_at"),
                    "commit": commit or (doc.get("spec", {}).get("labels", {}) or {}).get("code"),
                    "calibration": "--calibration" in args, "command_sha256": config_digest([doc["job"], *args]),
                    "backend": "hf-jobs", "job_id": doc.get("job_id"), "attempt": doc.get("attempt"),
                    "results_repo": repo})
    return out


def _refusal(api: Any, repo: str, run_id: str, start: dict) -> dict | None:
    """A ``refused`` entry when the run's latest job ended in ERROR with exit status 2."""
    try:
        att = last_attempt(api, repo, run_id)
        job = with_retry(api.inspect_job, what="inspect_job", job_id=att["job_id"], namespace=att["namespace"])
    except HFJobsError:
        return None
    msg = job.status.message or ""
    if str(job.status.stage) != "ERROR" or not re.search(r"exit code:? *2\b", msg):
        return None
    return {"event": "refused", "run_id": run_id, "gate_id": start["gate_id"], "time": start["time"],
            "reason": f"job {job.id} ended ERROR: {msg}"[:500], "backend": "hf-jobs", "job_id": job.id}


def record_hub_starts(api: Any, repo: str, run_id: str, dest: Path, *, with_refusal: bool) -> int:
    """Append the run's Hub start facts to ``dest``'s ledger, skipping those already there; returns how many."""
    from ..runstore import append_ledger, read_ledger

    entries = hub_ledger_entries(api, repo, run_id)
    if entries and with_refusal:
        refused = _refusal(api, repo, run_id, entries[0])
        entries += [refused] if refused else []
    have = {(e.get("run_id"), e.get("event"), e.get("job_id"), e.get("time")) for e in read_ledger(dest)}
    new = [e for e in entries if (e["run_id"], e["event"], e["job_id"], e["time"]) not in have]
    for e in new:
        append_ledger(dest, e)
    return len(new)


def download_run(api: Any, repo: str, run_id: str, staging: Path) -> Path | None:
    """Download a run's record and artefacts into ``staging`` (a results folder); None when it has no record."""
    from huggingface_hub import snapshot_download

    if not with_retry(api.file_exists, repo, record_path(run_id), what="file_exists", repo_type="dataset"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        with_retry(snapshot_download, repo, what="snapshot_download", repo_type="dataset", local_dir=tmp,
                   allow_patterns=[record_path(run_id), f"{run_prefix(run_id)}/artefacts/**"])
        got = Path(tmp) / run_prefix(run_id)
        for f in sorted(got.rglob("*")):
            if f.is_file():
                dest = staging / f.relative_to(got)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dest)
    return staging / f"{run_id}.json"


def run_state(api: Any, repo: str, run_id: str) -> str:
    """How far a run without a record got: its latest job's stage and message."""
    try:
        att = last_attempt(api, repo, run_id)
        job = with_retry(api.inspect_job, what="inspect_job", job_id=att["job_id"], namespace=att["namespace"])
    except HFJobsError as exc:
        return str(exc)
    msg = f": {job.status.message}" if job.status.message else ""
    return f"latest job {job.id} (attempt {att['attempt']}) is {job.status.stage}{msg}"


def image_mismatch(api: Any, repo: str, record: dict) -> str | None:
    """Why the record's image contradicts the spec of the attempt it names (None when it agrees, or when the
    record is not a single HF job's). The spec is the one ``covtoken submit`` committed before the job ran."""
    be = record["provenance"]["backend"]
    if be.get("name") != "hf-jobs" or "image" not in be or be.get("attempt") is None:
        return None
    spec = read_json(api, repo, attempt_path(record["run_id"], int(be["attempt"])))["spec"]
    submitted = {"image": spec.get("dockerImage"), "image_requested": (spec.get("environment") or {}).get(
        "COVTOKEN_IMAGE")}
    bad = [f"provenance/backend/{k} {be[k]!r} but {attempt_path(record['run_id'], int(be['attempt']))} submitted "
           f"{v!r}" for k, v in submitted.items() if k in be and be[k] != v]
    return "; ".join(bad) or None


def fetch_runs(api: Any, repo: str, run_ids: list[str], dest: Path) -> FetchResult:
    """Fetch runs from ``repo`` into ``dest`` (a results folder); the audit is the caller's next step."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    res = FetchResult(dest=dest)
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        for rid in run_ids:
            rec = download_run(api, repo, rid, staging)
            # the run's start facts first (as a local run's start precedes its record): a run whose record is
            # missing on the Hub is then listed by the audit like a local run started without a record
            record_hub_starts(api, repo, rid, dest, with_refusal=rec is None)
            if rec is None:
                res.missing[rid] = run_state(api, repo, rid)
                continue
            why = image_mismatch(api, repo, read_record(rec))
            if why:
                res.refused[rid] = why
                continue
            target = dest / f"{rid}.json"
            if target.exists() and target.read_bytes() == rec.read_bytes():
                res.present.append(rid)
                continue
            install_run(staging, rid, dest)
            r = read_record(target)
            res.fetched.append(rid)
            res.decisions[rid] = (r["gate_id"], r["decision"])
    return res


def render_card(report: AuditReport, repo: str) -> str:
    """README.md of the results repo: YAML metadata, how the repo is laid out, the SUMMARY table."""
    from huggingface_hub import DatasetCardData

    recs = sorted((ra.record for ra in report.records), key=lambda r: r["run_id"])
    meta = DatasetCardData(
        pretty_name=f"covtoken gate records ({repo})",
        tags=["covtoken", "gate-records", "reproducibility", "medical-imaging"],
        viewer=False,
        covtoken={"records": len(recs), "gates": sorted({r["gate_id"] for r in recs}),
                  "decisions": dict(sorted(Counter(r["decision"] for r in recs).items())),
                  "runs": [r["run_id"] for r in recs]})
    summary = render_summary(report).replace("# Gate summary", "## Gate summary", 1)
    return (f"---\n{meta.to_yaml()}\n---\n\n# covtoken results: {repo}\n\n"
            "Gate records of covtoken runs on Hugging Face Jobs. Every run has a folder `runs/<run_id>/` with the "
            "record `<run_id>.json` and its `artefacts/`, the exact code the job ran (`code/`: kit wheel, job script, "
            "threshold lock, constraints, build info; mounted read-only and pinned), token-bank shards (`bank/`), "
            "logs (`logs/`) and the submitted job specs (`attempts/`, secret names only). This card is regenerated "
            "by `covtoken fetch` from the records after a clean audit; do not edit it by hand.\n\n" + summary)


def publish_card(api: Any, repo: str, *, allow_unproven_prereg: bool = False) -> tuple[bool, str]:
    """Regenerate the repo's card from its records; returns (card is current, what happened).

    The card is only written after a clean audit of every record in the repo. A rejection of the card's YAML
    by the Hub (``validate-yaml``) is reported, not raised: the records are what a fetch is for.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    with tempfile.TemporaryDirectory() as tmp:
        runs = recorded_runs(api, repo)
        for rid in runs:
            download_run(api, repo, rid, Path(tmp))
        report = audit_folder(tmp, lock_path=default_lock_path(), allow_unproven_prereg=allow_unproven_prereg,
                              hub_repo_copy=True)
        if not report.ok:
            problems = report.all_problems()
            return False, (f"{repo}: card not regenerated, the audit of its {len(runs)} record(s) failed: "
                           f"{problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
        text = render_card(report, repo)
    with tempfile.TemporaryDirectory() as tmp:  # not the user's HF cache
        try:
            old = Path(with_retry(hf_hub_download, repo, CARD, what="hf_hub_download", repo_type="dataset",
                                  local_dir=tmp)).read_text()
        except EntryNotFoundError:
            old = None
    if old == text:
        return True, f"{repo}: dataset card is current"
    try:
        with_retry(api.upload_file, what="upload_file", path_or_fileobj=text.encode(), path_in_repo=CARD,
                   repo_id=repo, repo_type="dataset", commit_message=f"dataset card: {len(runs)} record(s)")
    except (ValueError, HfHubHTTPError) as exc:  # validate-yaml answers ValueError / an HTTP error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return False, f"warning: {repo}: dataset card not updated, the Hub rejected it ({first}); records are fetched"
    return True, f"{repo}: dataset card regenerated from {len(runs)} record(s)"
