"""The ``covtoken`` command line: run jobs, audit records, calibrate and lock thresholds.

    covtoken run jobs/g1_lesion_subspace.py --smoke            # local backend, record fetched into results/
    covtoken run jobs/g1_lesion_subspace.py -- --help          # the job's own options
    covtoken audit [gate_reports/]                             # recompute every decision; non-zero on any problem
    covtoken backbones | datasets [--json]                     # what can be run: ids, revisions, licences
    covtoken thresholds calibrate --gate G1 --entry embedded results/calibration/calibration/*.json --out P.json
    covtoken thresholds lock P.json [--supersede]
    covtoken thresholds verify | show
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .audit import NEGATIVE, SUMMARY, audit_folder, render_negative, render_summary
from .errors import OneLineParser, UserError, report_errors
from .lock import (LockError, ThresholdLock, carry_thresholds, gate_template, lock_entry, propose_thresholds,
                   read_calibration_input, write_lock)
from .record import loads_strict, new_run_id, read_record, utc_now, write_json_atomic
from .runner import default_lock_path

__all__ = ["main", "fetch_local_run"]

console = Console(stderr=True)
log = logging.getLogger("covtoken.cli")


# ----------------------------------------------------------------------------------------------------- run
def fetch_local_run(src: Path, run_id: str, dest: Path) -> Path:
    """Install one run's record and artefacts from a results folder into ``dest`` (never overwriting a record;
    every file through a temporary file and a rename, the record last), with the run's ledger entries."""
    from .runstore import append_ledger, install_run, read_ledger

    if (dest / f"{run_id}.json").exists():
        raise FileExistsError(f"{dest / f'{run_id}.json'}: run already fetched; records are never overwritten")
    for entry in read_ledger(src):  # the run's ledger entries travel with it
        if entry["run_id"] == run_id:
            append_ledger(dest, entry)
    return install_run(src, run_id, dest)


def _job_gate(job: Path) -> str:
    stem = job.stem.split("_", 1)[0].upper()
    if not stem.startswith("G"):
        raise UserError(f"{job}: job scripts are named g<N>_<name>.py")
    return stem


def cmd_run(args: argparse.Namespace) -> int:
    job = Path(args.job)
    if not job.is_file():
        raise UserError(f"{job}: job script not found")
    if args.backend != "local":
        raise UserError("--backend: only the local backend runs from `covtoken run`; use `covtoken submit` for HF Jobs")
    if {"-h", "--help"} & set(args.job_args):
        return _job_help(job, args.job_args)
    run_id = new_run_id(_job_gate(job))
    staging = Path(args.staging)
    cmd = [sys.executable, str(job), "--results", str(staging), "--run-id", run_id, *args.job_args]
    console.print(f"[bold]covtoken run[/bold] {' '.join(cmd)}")
    stage = "starting: importing torch and the backbone libraries"
    with console.status(f"{run_id}: {stage}") as status:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stderr.write(line)
            brace = line.find("{")
            if brace >= 0 and '"event"' in line:
                try:
                    ev = json.loads(line[brace:])
                except json.JSONDecodeError:
                    continue
                if ev.get("event") == "stage_start":
                    stage = ev.get("stage", stage)
                    status.update(f"{run_id}: {stage}")
        rc = proc.wait()
    if rc != 0:
        console.print(f"[red]job failed with exit code {rc}; no record was fetched[/red]")
        return rc
    if (staging / "calibration" / f"{run_id}.json").exists():
        console.print(f"calibration run written to {staging / 'calibration' / f'{run_id}.json'}")
        return 0
    target = fetch_local_run(staging, run_id, Path(args.results))
    rec = read_record(target)
    console.print(f"[bold]{rec['gate_id']}[/bold] {rec['decision'].upper()} -> {target}")
    return _exit_for_decision(rec["decision"], getattr(args, "fail_on", None))


def _exit_for_decision(decision: str, fail_on: str | None) -> int:
    """0 whenever a record was written; 1 with ``--fail-on`` when the decision is at or below that level."""
    failing = {None: set(), "fail": {"fail"}, "inconclusive": {"fail", "inconclusive"}}[fail_on]
    if decision.lower() in failing:
        console.print(f"[yellow]--fail-on {fail_on}: decision {decision.upper()}, exit status 1[/yellow]")
        return 1
    return 0


def _job_help(job: Path, job_args: list[str]) -> int:
    """``covtoken run job -- --help``: the job's own help, nothing run, no record expected."""
    return subprocess.call([sys.executable, str(job), "--help"])


# --------------------------------------------------------------------------------------------------- audit
def cmd_audit(args: argparse.Namespace) -> int:
    return audit_command(args.folder, args.lock, check=args.check, allow_unproven_prereg=args.allow_unproven_prereg,
                         allow_dirty=args.allow_dirty, allow_missing_records=args.allow_missing_records)


def audit_command(folder: str | Path, lock: str | Path | None = None, *, check: bool = False,
                  allow_unproven_prereg: bool = False, allow_dirty: bool = False,
                  allow_missing_records: bool = False) -> int:
    """Audit ``folder``, print the problems or the table, and write (or ``check``) its summaries; exit status."""
    folder = Path(folder)
    lock_path = Path(lock) if lock else default_lock_path()
    report = audit_folder(folder, lock_path=lock_path, allow_unproven_prereg=allow_unproven_prereg,
                          allow_dirty=allow_dirty, allow_missing_records=allow_missing_records)
    if not report.ok:
        for p in report.all_problems():
            console.print(f"[red]FAIL[/red] {p}", soft_wrap=True)
        console.print(f"[red]audit failed: {len(report.all_problems())} problem(s) in {folder}[/red]")
        return 1
    summary, negative = render_summary(report), render_negative(report)
    if check:
        stale = [n for n, text in ((SUMMARY, summary), (NEGATIVE, negative))
                 if not (folder / n).is_file() or (folder / n).read_text() != text]
        if stale:
            console.print(f"[red]audit --check: {', '.join(stale)} in {folder} is stale or missing; run `covtoken audit`[/red]")
            return 1
    else:
        for name, text in ((SUMMARY, summary), (NEGATIVE, negative)):
            tmp = folder / f".{name}.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, folder / name)
    table = Table(title=f"audit of {folder}: {len(report.records)} record(s), all decisions recomputed")
    for col in ("gate", "run", "decision", "thresholds"):
        table.add_column(col)
    for ra in sorted(report.records, key=lambda r: r.record["run_id"]):
        table.add_row(ra.record["gate_id"], ra.record["run_id"], ra.record["decision"], ra.prereg[0])
    Console().print(table)
    return 0


# ---------------------------------------------------------------------------------------------- thresholds
def cmd_calibrate(args: argparse.Namespace) -> int:
    template = gate_template(args.gate)
    entry = template["entries"].get(args.entry)
    if entry is None:
        raise LockError(f"gate {args.gate} has no template entry {args.entry!r}")
    key = f"{args.gate}/{args.entry}"
    runs, inputs = [], []
    for f in args.calibration_files:
        doc, entry_input = read_calibration_input(f, key)  # refuses judged records and unproven patients
        runs.append(doc["metrics"])
        inputs.append(entry_input)
    rules = {c.get("calibration_rule", "fixed") for c in entry["criteria"]}
    carried = {}
    if getattr(args, "carry_locked_thresholds", False):
        if runs:
            raise LockError(f"{key}: --carry-locked-thresholds takes no calibration files")
        lock_path = Path(args.lock) if getattr(args, "lock", None) else default_lock_path()
        locked = ThresholdLock.load(lock_path).entry(key)
        criteria = carry_thresholds(entry["criteria"], locked)
        carried = {"thresholds_carried_from": {"entry": key, "entry_digest": locked.digest}}
    elif not runs and rules != {"fixed"}:
        raise LockError(f"{key}: criteria with rules {sorted(rules - {'fixed'})} need calibration results "
                        "(or --carry-locked-thresholds to keep the locked ones while superseding other fields)")
    else:
        criteria = propose_thresholds(entry["criteria"], runs) if runs else [dict(c) for c in entry["criteria"]]
    calibration = {**entry.get("calibration", {}), **carried, "inputs": inputs, "proposed_at": utc_now(),
                   "proposed_values": {c["id"]: c["threshold"] for c in criteria}}
    proposal = {"kind": "covtoken.threshold_proposal", "gate_id": args.gate, "entry": args.entry,
                "claim": template["claim"], "criteria": criteria, "parameters": entry["parameters"],
                "calibration": calibration}
    write_json_atomic(args.out, proposal)
    console.print(f"proposal written to {args.out}: " + ", ".join(f"{c['id']} {c['comparator']} {c['threshold']}"
                                                                  for c in criteria))
    return 0


def cmd_lock(args: argparse.Namespace) -> int:
    lock_path = Path(args.lock) if args.lock else default_lock_path()
    doc = loads_strict(lock_path.read_text(), source=str(lock_path)) if lock_path.exists() else {}
    if doc:
        ThresholdLock(doc, source=str(lock_path))  # never build on a tampered lock
    prop = loads_strict(Path(args.proposal).read_text(), source=args.proposal)
    if prop.get("kind") != "covtoken.threshold_proposal":
        raise LockError(f"{args.proposal}: not a threshold proposal")
    calibration = {**prop["calibration"], "locked_at": utc_now()}
    new = lock_entry(doc, gate_id=prop["gate_id"], claim=prop["claim"], name=prop["entry"], criteria=prop["criteria"],
                     parameters=prop["parameters"], calibration=calibration, supersede=args.supersede)
    write_lock(new, lock_path)
    e = ThresholdLock(new).entry(f"{prop['gate_id']}/{prop['entry']}")
    console.print(f"locked {e.key} ({e.digest}) in {lock_path}; commit it before any judged run")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    lock_path = Path(args.lock) if args.lock else default_lock_path()
    lock = ThresholdLock.load(lock_path)
    console.print(f"{lock_path}: intact ({lock.digest}); gates {', '.join(lock.gate_ids())}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    lock = ThresholdLock.load(Path(args.lock) if args.lock else default_lock_path())
    table = Table(title="locked thresholds")
    for col in ("entry", "criterion", "metric", "rule", "calibration"):
        table.add_column(col)
    for gid in lock.gate_ids():
        for name in sorted(lock.doc["gates"][gid]["entries"]):
            e = lock.entry(f"{gid}/{name}")
            for c in e.criteria:
                table.add_row(e.key, c["id"], c["metric"], f"{c['judged_on']} {c['comparator']} {c['threshold']}",
                              str(e.calibration.get("method", "calibration split")))
    Console().print(table)
    return 0


# --------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="covtoken", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    _register_listing_commands(sub)

    r = sub.add_parser("run", help="run a job script with the local backend and fetch its record",
                       description="Run a job script locally and fetch its record. Exit status: 0 when a record is "
                                   "written, whatever the decision (see --fail-on); 2 for a usage error; the job's "
                                   "own status when it fails. Options after -- go to the job (-- --help shows them).")
    r.add_argument("job", help="jobs/<gate>_<name>.py")
    r.add_argument("--backend", default="local", choices=["local"], help="local subprocess (HF Jobs: covtoken submit)")
    r.add_argument("--results", default="results",
                   help="where the record is fetched to (default results/, untracked; --results gate_reports adds it "
                        "to the committed records)")
    r.add_argument("--fail-on", choices=["fail", "inconclusive"], default=None,
                   help="exit 1 when the decision is FAIL (fail), or FAIL or INCONCLUSIVE (inconclusive); without it "
                        "the exit status is 0 whenever a record is written, whatever the decision")
    r.add_argument("--staging", default=".cache/covtoken/staging",
                   help="the job's own results folder (untracked; the record is then fetched to --results)")
    r.set_defaults(fn=cmd_run)

    a = sub.add_parser("audit", help="recompute every decision and regenerate SUMMARY.md / NEGATIVE_RESULT.md")
    a.add_argument("folder", nargs="?", default="gate_reports")
    a.add_argument("--lock", help="threshold lock (default configs/thresholds.lock.json)")
    a.add_argument("--check", action="store_true", help="write nothing; fail if the summaries are stale")
    a.add_argument("--allow-unproven-prereg", action="store_true", help=(
        "accept records whose pre-registration cannot be proven (no git history, unknown commit, lock outside the "
        "repository); their summary rows say so"))
    a.add_argument("--allow-dirty", action="store_true", help="accept dirty-tree records, marked 'not evidence'")
    a.add_argument("--allow-missing-records", action="store_true", help=(
        "accept ledger runs without a record (they stay listed in NEGATIVE_RESULT.md)"))
    a.set_defaults(fn=cmd_audit)

    t = sub.add_parser("thresholds", help="calibrate, lock, verify or show the threshold lock",
                       description="Calibrate, lock, verify or show the threshold lock (subcommands below; "
                                   "`covtoken thresholds <subcommand> --help` for each).")
    tsub = t.add_subparsers(dest="thresholds_command", required=True)
    c = tsub.add_parser("calibrate", help="propose thresholds from calibration-split runs")
    c.add_argument("--gate", required=True)
    c.add_argument("--entry", required=True)
    c.add_argument("--out", required=True, help="proposal file to write")
    c.add_argument("calibration_files", nargs="*", help="calibration run files written by the job")
    c.add_argument("--carry-locked-thresholds", action="store_true",
                   help="supersede parameters/effect fields only: calibrated thresholds are carried from the lock")
    c.add_argument("--lock", help="lock file the thresholds are carried from (default configs/thresholds.lock.json)")
    c.set_defaults(fn=cmd_calibrate)
    lk = tsub.add_parser("lock", help="freeze a proposal into the lock")
    lk.add_argument("proposal")
    lk.add_argument("--lock", help="lock file (default configs/thresholds.lock.json)")
    lk.add_argument("--supersede", action="store_true", help="replace an existing entry (its digest is kept)")
    lk.set_defaults(fn=cmd_lock)
    for name, fn, text in (("verify", cmd_verify, "check the lock's digests and structure"),
                           ("show", cmd_show, "print the locked thresholds")):
        v = tsub.add_parser(name, help=text)
        v.add_argument("--lock")
        v.set_defaults(fn=fn)
    _register_optional_commands(sub)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("covtoken")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


# -------------------------------------------------------------------------------------- backbones / datasets
def _backbone_rows() -> list[dict]:
    from .backbone.registry import get_spec, list_backbones

    rows = []
    for name in list_backbones():
        spec = get_spec(name)
        rows.append({"name": name, "library": spec.library, "hub_id": spec.hub_id, "revision": spec.revision,
                     "revision_pinned": spec.revision_pinned, "image_size": spec.image_size,
                     "patch_size": spec.patch_size, "depth": spec.depth, "width": spec.width,
                     "modality": spec.modality, "licence": spec.licence, "notes": spec.notes})
    return rows


def _dataset_rows() -> list[dict]:
    from .data.catalog import dataset_info, list_datasets

    return [dataset_info(name) for name in list_datasets()]


def _print_rows(rows: list[dict], columns: list[str], title: str, as_json: bool) -> int:
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=title)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*["" if row[c] is None else str(row[c]) for c in columns])
    Console().print(table)
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    rows = _backbone_rows()
    if args.json:
        return _print_rows(rows, [], "", True)
    shown = [{"name": r["name"], "library": r["library"], "hub id": (r["hub_id"] or "(embedded)").removeprefix("hf-hub:"),
              "revision": r["revision"] or ("pass --revision" if r["hub_id"] else "seeded"), "licence": r["licence"]}
             for r in rows]
    return _print_rows(shown, ["name", "library", "hub id", "revision", "licence"],
                       "backbones (--json for geometry and notes)", False)


def cmd_datasets(args: argparse.Namespace) -> int:
    return _print_rows(_dataset_rows(), ["name", "kind", "id", "revision", "licence"],
                       "datasets (or a local folder / org/name / hf://datasets/... source)", args.json)


def _register_listing_commands(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("backbones", help="list the registered backbones (library, Hub id, pinned revision, notes)")
    b.add_argument("--json", action="store_true", help="print JSON instead of a table")
    b.set_defaults(fn=cmd_backbones)
    d = sub.add_parser("datasets", help="list the catalog's datasets (id, revision rule, licence)")
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")
    d.set_defaults(fn=cmd_datasets)


def _quiet_libraries() -> None:
    """httpx logs every request at INFO; keep those lines out unless COVTOKEN_DEBUG_HTTP=1."""
    if os.environ.get("COVTOKEN_DEBUG_HTTP") != "1":
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _register_optional_commands(sub: argparse._SubParsersAction) -> None:
    """Commands that live in their own modules (HF Jobs backend, paper) register themselves here."""
    import importlib

    for module in ("covtoken.hfjobs.cli", "covtoken.paper.cli", "covtoken.reproduce"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register_cli(sub)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--", and any option `covtoken run` does not know, goes to the job script.
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args, unknown = build_parser().parse_known_args(argv)
    if unknown and args.command != "run":
        build_parser().error(f"unrecognized arguments: {' '.join(unknown)}")
    args.job_args = unknown + passthrough
    # an expected error (bad flag, key, file or row; a full disk) is one line and exit status 2; --debug: traceback
    return report_errors(lambda: args.fn(args), debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
