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

__all__ = ["FetchResult", "fetch_runs", "download_run", "install_run", "recorded_runs", "render_card",
           "publish_card", "run_state", "image_mismatch"]

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
