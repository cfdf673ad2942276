"""``covtoken fetch``: pull records and artefacts from the results repo into ``gate_reports/``, audit, refresh the card.

    covtoken fetch RUN_ID [--results gate_reports]       # one run (its repo is found from its job if not given)
    covtoken fetch --all --results-repo org/covtoken-results

A run folder ``runs/<run_id>/`` of the results repo holds ``<run_id>.json`` and ``artefacts/<run_id>/``, the
layout of a results folder, so a fetched run is copied with the same checks as a local one (the record must
validate; nothing is ever overwritten). The audit then runs on the destination folder, and the repo's dataset
card (README.md with YAML metadata and the SUMMARY table) is regenerated from the repo's own records when
their audit is clean.
"""
from __future__ import annotations

import argparse
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from .audit import AuditReport, audit_folder, render_summary
from .hfjobs import cli_command, hub_api, jobs_of_run, last_attempt, namespace_of, repo_files, results_repo_of
from .hfspec import HFJobsError, console
from .hubsync import record_path, run_prefix
from .record import read_record
from .runner import default_lock_path

__all__ = ["fetch_and_audit", "download_run", "recorded_runs", "render_card", "publish_card", "register"]

CARD = "README.md"


def recorded_runs(api: Any, repo: str) -> list[str]:
    """Run ids with a record in ``repo``."""
    return sorted(m.group(1) for f in repo_files(api, repo, "runs")
                  if (m := re.fullmatch(r"runs/([a-z0-9][a-z0-9-]+)/\1\.json", f)))


def download_run(api: Any, repo: str, run_id: str, staging: Path) -> Path | None:
    """Download a run's record and artefacts into ``staging`` (a results folder); None when it has no record."""
    from huggingface_hub import snapshot_download

    if not api.file_exists(repo, record_path(run_id), repo_type="dataset"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        snapshot_download(repo, repo_type="dataset", local_dir=tmp,
                          allow_patterns=[record_path(run_id), f"{run_prefix(run_id)}/artefacts/**"])
        got = Path(tmp) / run_prefix(run_id)
        for f in sorted(got.rglob("*")):
            if f.is_file():
                dest = staging / f.relative_to(got)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(f.read_bytes())
    return staging / f"{run_id}.json"


def run_state(api: Any, repo: str, run_id: str) -> str:
    """How far a run without a record got: its latest job's stage and message."""
    try:
        att = last_attempt(api, repo, run_id)
        job = api.inspect_job(job_id=att["job_id"], namespace=att["namespace"])
    except HFJobsError as exc:
        return str(exc)
    msg = f": {job.status.message}" if job.status.message else ""
    return f"latest job {job.id} (attempt {att['attempt']}) is {job.status.stage}{msg}"


def fetch_and_audit(api: Any, repo: str, run_ids: list[str], dest: Path, *, card: bool = True) -> int:
    """Fetch runs into ``dest``, audit ``dest`` (writing SUMMARY.md), then refresh the repo's card.

    Returns:
        0 when every run was fetched and the audit is clean, else 1.
    """
    from .cli import cmd_audit, fetch_local_run

    dest.mkdir(parents=True, exist_ok=True)
    missing = []
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        for rid in run_ids:
            rec = download_run(api, repo, rid, staging)
            if rec is None:
                missing.append(rid)
                console.print(f"run {rid}: no record in {repo} ({run_state(api, repo, rid)})", markup=False)
                continue
            target = dest / f"{rid}.json"
            if target.exists() and target.read_bytes() == rec.read_bytes():
                console.print(f"run {rid}: already in {dest}", markup=False)
                continue
            fetch_local_run(staging, rid, dest)
            r = read_record(target)
            console.print(f"[bold]{r['gate_id']}[/bold] {r['decision'].upper()} {rid} -> {target}")
    rc = cmd_audit(argparse.Namespace(folder=str(dest), lock=None, check=False)) if any(dest.glob("*.json")) else 1
    if card:
        publish_card(api, repo)
    return 1 if missing or rc else 0


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


def publish_card(api: Any, repo: str) -> bool:
    """Regenerate the repo's card from its records; returns True when the card is current.

    The card is only written after a clean audit of every record in the repo.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    with tempfile.TemporaryDirectory() as tmp:
        runs = recorded_runs(api, repo)
        for rid in runs:
            download_run(api, repo, rid, Path(tmp))
        report = audit_folder(tmp, lock_path=default_lock_path())
        if not report.ok:
            problems = report.all_problems()
            console.print(f"{repo}: card not regenerated, the audit of its {len(runs)} record(s) failed: "
                          f"{problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""),
                          markup=False, soft_wrap=True)
            return False
        text = render_card(report, repo)
    with tempfile.TemporaryDirectory() as tmp:  # not the user's HF cache
        try:
            old = Path(hf_hub_download(repo, CARD, repo_type="dataset", local_dir=tmp)).read_text()
        except EntryNotFoundError:
            old = None
    if old != text:
        api.upload_file(path_or_fileobj=text.encode(), path_in_repo=CARD, repo_id=repo, repo_type="dataset",
                        commit_message=f"dataset card: {len(runs)} record(s)")
        console.print(f"{repo}: dataset card regenerated from {len(runs)} record(s)", markup=False)
    return True


@cli_command
def cmd_fetch(args: argparse.Namespace) -> int:
    """``covtoken fetch RUN_ID | --all``."""
    api = hub_api()
    repo = results_repo_of(args)
    if args.all == bool(args.run_id):
        raise HFJobsError("fetch needs a run id or --all (not both)")
    if args.all:
        if not repo:
            raise HFJobsError("fetch --all needs --results-repo (or COVTOKEN_RESULTS_REPO)")
        runs = recorded_runs(api, repo)
        if not runs:
            raise HFJobsError(f"{repo}: no records yet")
    else:
        runs = [args.run_id]
        if not repo:
            jobs = jobs_of_run(api, namespace_of(api, args.namespace), args.run_id)
            repo = (jobs[-1].environment or {}).get("COVTOKEN_RESULTS_REPO") if jobs else None
            if not repo:
                raise HFJobsError(f"run {args.run_id}: no job found to tell its results repo; pass --results-repo")
    return fetch_and_audit(api, repo, runs, Path(args.results), card=not args.no_card)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``fetch`` to the command line."""
    f = sub.add_parser("fetch", help="download records and artefacts into gate_reports/, then audit")
    f.add_argument("run_id", nargs="?")
    f.add_argument("--all", action="store_true", help="every run with a record in the results repo")
    f.add_argument("--results", default="gate_reports", help="destination folder (default gate_reports)")
    f.add_argument("--results-repo", help="results dataset repo (default $COVTOKEN_RESULTS_REPO or the run's)")
    f.add_argument("--namespace", help="namespace of the jobs (default: the token's user)")
    f.add_argument("--no-card", action="store_true", help="do not regenerate the repo's dataset card")
    f.set_defaults(fn=cmd_fetch)
