"""The command line of the HF Jobs backend: ``covtoken submit | status | ps | logs | wait | cancel | fetch |
sweep | aggregate``. Flags are named after ``hf jobs run`` (``-e/--env``, ``-s/--secrets``, ``--env-file``,
``--secrets-file``, ``--name``, ``-l/--label``, ``--flavor``, ``--timeout``, ``--attempts``, ``-d/--detach``).

This layer only turns flags into the library's requests (submit.py, sweep.py, fetch.py) and prints what comes
back: data (run ids, commands, log lines, JSON) on stdout, messages on stderr. A user error (:class:`HFJobsError`,
a Hub failure one can act on) is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from .errors import HFJobsError, hub_error_message
from .prices import price_lines
from .spec import DEFAULT_FLAVOR, DEFAULT_TIMEOUT, parse_duration

__all__ = ["register_cli", "cli_command", "fetch_and_audit"]

console = Console(stderr=True, highlight=False, emoji=False)  # ":abc" in a digest is no emoji code


def out(text: str) -> None:
    """Data output (spec, commands, log lines, run ids) on stdout, unformatted."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def say(text: str) -> None:
    console.print(text, markup=False, soft_wrap=True)


def cli_command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A user error or a Hub failure one can act on -> one line on stderr, exit status 2."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except HFJobsError as exc:
            msg = str(exc)
        except Exception as exc:
            msg = hub_error_message(exc, repo=getattr(args, "results_repo", None))
            if msg is None:
                raise
        say(f"error: {msg}")
        return 2

    return run


# ------------------------------------------------------------------------------------------------- flag parsing
def results_repo_of(args: argparse.Namespace) -> str | None:
    """``--results-repo`` or ``$COVTOKEN_RESULTS_REPO``."""
    repo = getattr(args, "results_repo", None) or os.environ.get("COVTOKEN_RESULTS_REPO")
    if repo and (repo.count("/") != 1 or not all(repo.split("/"))):
        raise HFJobsError(f"--results-repo {repo!r}: expected <namespace>/<name>")
    return repo


def _dotenv(text: str, source: str) -> dict[str, str | None]:
    from dotenv import dotenv_values

    values = dict(dotenv_values(stream=io.StringIO(text)))
    if not values and text.strip() and not text.strip().startswith("#"):
        raise HFJobsError(f"{source}: no KEY=VALUE line")
    return values


def _read_env_file(path: str, flag: str) -> str:
    if path == "-":
        return sys.stdin.read()
    f = Path(path)
    if not f.is_file():
        raise HFJobsError(f"{flag} {path}: file not found")
    return f.read_text(encoding="utf-8-sig")


def parse_env(items: list[str] | None, env_file: str | None) -> dict[str, str]:
    """``-e KEY=VALUE`` (repeatable) over ``--env-file`` (dotenv format); a bare ``KEY`` reads the local value."""
    env: dict[str, str | None] = {}
    if env_file:
        env.update(_dotenv(_read_env_file(env_file, "--env-file"), f"--env-file {env_file}"))
    for item in items or []:
        env.update(_dotenv(item, f"-e {item}"))
    return _resolve(env, "-e/--env")


def parse_secrets(items: list[str] | None, secrets_file: str | None) -> dict[str, str]:
    """``-s NAME`` (value from the local environment) or ``-s NAME=VALUE``, and ``--secrets-file``.

    ``HF_TOKEN`` is always sent (from the local login) and is dropped here.
    """
    sec: dict[str, str | None] = {}
    if secrets_file:
        sec.update(_dotenv(_read_env_file(secrets_file, "--secrets-file"), f"--secrets-file {secrets_file}"))
    for item in items or []:
        if "=" in item:
            say(f"warning: -s {item.split('=', 1)[0]}=...: the value stays in your shell history; prefer "
                f"-s {item.split('=', 1)[0]} (read from your environment) or --secrets-file")
        sec.update(_dotenv(item, f"-s {item.split('=', 1)[0]}"))
    sec.pop("HF_TOKEN", None)
    return _resolve(sec, "-s/--secrets")


def _resolve(values: dict[str, str | None], flag: str) -> dict[str, str]:
    out_: dict[str, str] = {}
    for k, v in values.items():
        if v is None:
            if k not in os.environ:
                raise HFJobsError(f"{flag} {k}: no value given and ${k} is not set here; pass {k}=VALUE or export it")
            v = os.environ[k]
        out_[k] = v
    return out_


def parse_labels(items: list[str] | None) -> dict[str, str]:
    labels = {}
    for kv in items or []:
        k, sep, v = kv.partition("=")
        if not sep:
            raise HFJobsError(f"-l {kv}: expected KEY=VALUE")
        labels[k] = v
    return labels


def confirm(question: str, yes: bool) -> None:
    """Ask on the terminal unless ``--yes``; no terminal and no ``--yes`` is an error."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise HFJobsError("no terminal to confirm the cost on: pass --yes")
    from rich.prompt import Confirm

    if not Confirm.ask(question, console=console):
        raise HFJobsError("not submitted")


def _submit_request(args: argparse.Namespace, repo: str):  # noqa: ANN202 (SubmitRequest, imported lazily)
    from .runs import SubmitRequest

    return SubmitRequest(job=args.job, results_repo=repo, job_args=tuple(args.job_args), namespace=args.namespace,
                         flavor=args.flavor or DEFAULT_FLAVOR, timeout=args.timeout or DEFAULT_TIMEOUT,
                         image=args.image, labels=parse_labels(args.label), env=parse_env(args.env, args.env_file),
                         secrets=parse_secrets(args.secrets, args.secrets_file), name=args.name,
                         attempts=args.attempts, commit_every_s=parse_duration(args.commit_every, "--commit-every", allow_zero=True),
                         allow_dirty=args.allow_dirty, public=args.public, bucket=args.bucket)


def _show_plan(plan: Any) -> None:
    for line in price_lines(plan.price):
        say(line)
    if plan.state is not None:
        st = plan.state
        say(f"code        {st.commit}" + (f" DIRTY (diff sha256 {st.diff_sha256})" if st.dirty else " (clean)"))
    say(f"image       {plan.requests[0].image}")
    if plan.requests[0].state_bucket:
        say(f"state       hf://buckets/{plan.requests[0].state_bucket} mounted read-write at /state (token-bank "
            "shards and checkpoints as they are made)")
    for w in plan.warnings:
        say(("note: " if w.startswith(("resume", "sweep")) else "warning: ") + w)


# ------------------------------------------------------------------------------------------------- commands
@cli_command
def cmd_submit(args: argparse.Namespace) -> int:
    """``covtoken submit``."""
    from .query import hub_api
    from .runs import ResumeRequest, dry_run_lines, launch, next_steps, plan_resume, plan_submit

    repo = results_repo_of(args)
    backend = args.backend or ("hf-jobs" if repo or args.resume else "local")
    if backend == "local":
        if args.resume or args.dry_run:
            raise HFJobsError("--resume and --dry-run need the HF Jobs backend: pass --results-repo "
                              "<namespace>/<name> (or set COVTOKEN_RESULTS_REPO)")
        say("no results repo configured (--results-repo / COVTOKEN_RESULTS_REPO): running locally")
        from ..cli import cmd_run

        return cmd_run(argparse.Namespace(job=args.job, backend="local", results=args.results,
                                          staging="results/local", job_args=args.job_args))
    secrets = parse_secrets(args.secrets, args.secrets_file)
    if args.resume:
        if args.job_args:
            raise HFJobsError(f"--resume {args.resume}: the job arguments are those of the first attempt; do not "
                              "pass new ones")
        if args.bucket:
            raise HFJobsError(f"--resume {args.resume} --bucket: a resumed run keeps the state bucket of its first "
                              "attempt (where its shards are); drop --bucket")
        api = hub_api()
        plan = plan_resume(ResumeRequest(run_id=args.resume, results_repo=repo, namespace=args.namespace,
                                         job=args.job, flavor=args.flavor, timeout=args.timeout, image=args.image,
                                         secrets=secrets, attempts=args.attempts_given, public=args.public), api=api)
    else:
        if not repo:
            raise HFJobsError("--backend hf-jobs needs --results-repo <namespace>/<name> (or COVTOKEN_RESULTS_REPO)")
        req = _submit_request(args, repo)
        api = None if args.dry_run else hub_api()
        plan = plan_submit(req, offline=args.dry_run, api=api)
    _show_plan(plan)
    if args.dry_run:
        for line in dry_run_lines(plan):
            out(line)
        return 0
    req0 = plan.requests[0]
    confirm(f"{'resume' if args.resume else 'submit'} {req0.job} as run {req0.run_id}?", args.yes)
    (h,) = launch(plan, secrets=secrets, public=args.public, api=api)
    say(f"run {h.run_id} attempt {h.attempt}: job {h.job_id}")
    say(f"url         {h.url}")
    if args.detach:
        say("follow it with:")
        for cmd in next_steps(h.run_id, h.results_repo):
            say(f"    {cmd}")
        out(h.run_id)
        return 0
    return _foreground(api, h, Path(args.results), allow_unproven_prereg=args.allow_unproven_prereg)


def _foreground(api: Any, h: Any, results: Path, *, allow_unproven_prereg: bool = False) -> int:
    from .retry import with_retry
    from .runs import explain_end

    for line in api.fetch_job_logs(job_id=h.job_id, namespace=h.namespace, follow=True):
        out(line)
    final = with_retry(api.wait_for_job, h.job_id, what="wait_for_job", namespace=h.namespace)
    if str(final.status.stage) != "COMPLETED":
        say(explain_end(api, final, h.namespace, h.run_id))
        return 1
    return fetch_and_audit(api, h.results_repo, [h.run_id], results, allow_unproven_prereg=allow_unproven_prereg)


def fetch_and_audit(api: Any, repo: str, run_ids: list[str], dest: Path, *, card: bool = True,
                    allow_unproven_prereg: bool = False, allow_missing_records: bool = False) -> int:
    """Fetch runs into ``dest`` (their Hub start facts into its ledger), audit ``dest`` (writing SUMMARY.md and
    NEGATIVE_RESULT.md), then refresh the repo's card.

    Returns 0 when every run was fetched (or, with ``allow_missing_records``, is listed as without a record) and
    the audit is clean, else 1.
    """
    from ..cli import audit_command
    from .fetch import fetch_runs, publish_card

    res = fetch_runs(api, repo, run_ids, dest)
    for rid, state in res.missing.items():
        say(f"run {rid}: no record in {repo} ({state})")
    for rid, why in res.refused.items():
        say(f"run {rid}: refused, not fetched: {why}")
    for rid in res.present:
        say(f"run {rid}: already in {dest}")
    for rid in res.fetched:
        gate, decision = res.decisions[rid]
        say(f"{gate} {decision.upper()} {rid} -> {dest / f'{rid}.json'}")
    rc = (audit_command(dest, allow_unproven_prereg=allow_unproven_prereg, allow_missing_records=allow_missing_records)
          if any(dest.glob("*.json")) or (dest / "ledger.jsonl").is_file() else 1)
    if card:
        _, msg = publish_card(api, repo, allow_unproven_prereg=allow_unproven_prereg)
        say(msg)
    return 1 if (res.missing and not allow_missing_records) or res.refused or rc else 0


def _age(s: int | None) -> str:
    if s is None:
        return "?"
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{s}s"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


@cli_command
def cmd_status(args: argparse.Namespace) -> int:
    """``covtoken status RUN_ID [--json]``: every attempt (full job id, stage, URL) and what was uploaded."""
    from .runs import status

    st = status(args.run_id, args.namespace)
    if args.json:
        out(json.dumps(dataclasses.asdict(st), indent=2, sort_keys=True))
        return 0
    rows = [["attempt", "job", "stage", "flavor", "created", "url"]]
    rows += [[j["attempt"], j["job_id"], j["stage"], j["flavor"], j["created_at"] or "", j["url"]] for j in st.jobs]
    for line in _table(rows):
        out(line)
    for j in st.jobs:
        if j["message"]:
            out(f"attempt {j['attempt']}: {j['message']}")
    if st.results_repo and st.state_bucket:
        say(f"{st.results_repo}: record {'present' if st.record else 'not written'}; token-bank shards and "
            f"checkpoints are kept in the bucket hf://buckets/{st.state_bucket} (runs/{st.run_id}/)")
    elif st.results_repo:
        say(f"{st.results_repo}: {st.shards} token-bank shard(s) uploaded; record "
            f"{'present' if st.record else 'not written'}")
    return 0


@cli_command
def cmd_ps(args: argparse.Namespace) -> int:
    """``covtoken ps [-a] [--json]``: the kit's runs in a namespace, from their job labels."""
    from .runs import list_runs

    runs = list_runs(args.namespace, all_states=args.all)
    if args.json:
        out(json.dumps([dataclasses.asdict(r) for r in runs], indent=2, sort_keys=True))
        return 0
    if not runs:
        say("no run" + ("" if args.all else " running (pass -a for finished ones)"))
        return 0
    rows = [["run", "gate", "state", "flavor", "attempts", "age", "url"]]
    rows += [[r.run_id, r.gate, r.state, r.flavor, str(r.attempts), _age(r.age_s), r.url] for r in runs]
    for line in _table(rows):
        out(line)
    return 0


@cli_command
def cmd_logs(args: argparse.Namespace) -> int:
    """``covtoken logs RUN_ID [-f] [-n N]``: the log of the latest (or ``--attempt``) job."""
    from .runs import logs

    for line in logs(args.run_id, args.namespace, follow=args.follow, tail=args.tail, attempt=args.attempt):
        out(line)
    return 0


@cli_command
def cmd_wait(args: argparse.Namespace) -> int:
    """``covtoken wait RUN_ID [--timeout 2h]``: block until the latest job ends; 0 only if it completed."""
    from .query import hub_api
    from .runs import explain_end, wait

    api = hub_api()
    timeout = parse_duration(args.timeout, "--timeout") if args.timeout else None
    final, ns = wait(args.run_id, args.namespace, timeout_s=timeout, poll_s=args.poll, api=api)
    say(explain_end(api, final, ns, args.run_id))
    return 0 if str(final.status.stage) == "COMPLETED" else 1


@cli_command
def cmd_cancel(args: argparse.Namespace) -> int:
    """``covtoken cancel RUN_ID``: cancel every live job of the run."""
    from .runs import cancel

    canceled, latest = cancel(args.run_id, args.namespace)
    if not canceled:
        say(f"run {args.run_id}: no live job (latest {latest.id} is {latest.status.stage})")
    for jid in canceled:
        say(f"run {args.run_id}: canceled job {jid}")
    return 0


@cli_command
def cmd_fetch(args: argparse.Namespace) -> int:
    """``covtoken fetch RUN_ID | --all``."""
    from .fetch import attempted_runs, recorded_runs
    from .query import hub_api, jobs_of_run, namespace_of

    api = hub_api()
    repo = results_repo_of(args)
    if args.all == bool(args.run_id):
        raise HFJobsError("fetch needs a run id or --all (not both)")
    if args.all:
        if not repo:
            raise HFJobsError("fetch --all needs --results-repo (or COVTOKEN_RESULTS_REPO)")
        runs = sorted(set(recorded_runs(api, repo)) | set(attempted_runs(api, repo)))
        if not runs:
            raise HFJobsError(f"{repo}: no records yet (and no run submitted)")
    else:
        runs = [args.run_id]
        if not repo:
            jobs = jobs_of_run(api, namespace_of(api, args.namespace), args.run_id)
            repo = (jobs[-1].environment or {}).get("COVTOKEN_RESULTS_REPO") if jobs else None
            if not repo:
                raise HFJobsError(f"run {args.run_id}: no job found to tell its results repo; pass --results-repo")
    return fetch_and_audit(api, repo, runs, Path(args.results), card=not args.no_card,
                           allow_unproven_prereg=args.allow_unproven_prereg,
                           allow_missing_records=args.allow_missing_records)


@cli_command
def cmd_sweep(args: argparse.Namespace) -> int:
    """``covtoken sweep``: submit every cell, then (unless --detach) wait and aggregate."""
    from .query import hub_api
    from .runs import dry_run_lines, launch
    from .sweep import SweepRequest, plan_sweep

    repo = results_repo_of(args)
    if not repo:
        raise HFJobsError("sweep needs --results-repo <namespace>/<name> (or COVTOKEN_RESULTS_REPO)")
    req = SweepRequest(base=_submit_request(args, repo), seeds=args.seeds, seed_start=args.seed_start,
                       datasets=tuple(d for d in (args.datasets or "").split(",") if d),
                       backbones=tuple(b for b in (args.backbones or "").split(",") if b))
    api = None if args.dry_run else hub_api()
    plan, doc = plan_sweep(req, offline=args.dry_run, api=api)
    _show_plan(plan)
    if args.dry_run:
        for line in dry_run_lines(plan):
            out(line)
        return 0
    confirm(f"submit {len(plan.requests)} job(s) of sweep {doc['sweep_id']}?", args.yes)
    handles = launch(plan, secrets=req.base.secrets, public=args.public, api=api)
    for h in handles:
        say(f"run {h.run_id}: job {h.job_id} {h.url}")
    if args.detach:
        say("aggregate it when done with:")
        say(f"    covtoken aggregate {doc['sweep_id']} --results-repo {repo}")
        out(doc["sweep_id"])
        return 0
    return _aggregate(api, repo, doc["sweep_id"], Path(args.results), None,
                      allow_unproven_prereg=args.allow_unproven_prereg)


def _aggregate(api: Any, repo: str, sweep_id: str, results: Path, timeout: float | None, *,
               allow_unproven_prereg: bool = False) -> int:
    from .sweep import aggregate_sweep, cell_name

    say(f"sweep {sweep_id}: waiting for its jobs")
    res = aggregate_sweep(api, repo, sweep_id, timeout=timeout)
    for rid, (decision, used, n) in res.aggregates.items():
        out(rid)
        say(f"aggregate {rid}: {decision.upper()} over {used} of {n} cell(s)")
    for o in res.failed:
        say(f"failed cell {cell_name(o)}: run {o['run_id']} job {o['job_id']} {o['stage']}"
            + (f": {o['message']}" if o["message"] else ""))
    for p in res.problems:
        say(f"error: {p}")
    rc = fetch_and_audit(api, repo, res.done, results, allow_unproven_prereg=allow_unproven_prereg) if res.done else 1
    return 1 if res.failed or res.problems or rc else 0


@cli_command
def cmd_aggregate(args: argparse.Namespace) -> int:
    """``covtoken aggregate SWEEP_ID``."""
    from .query import hub_api

    repo = results_repo_of(args)
    if not repo:
        raise HFJobsError("aggregate needs --results-repo (or COVTOKEN_RESULTS_REPO)")
    timeout = parse_duration(args.timeout, "--timeout") if args.timeout else None
    return _aggregate(hub_api(), repo, args.sweep_id, Path(args.results), timeout,
                      allow_unproven_prereg=args.allow_unproven_prereg)


# ------------------------------------------------------------------------------------------------- parser
def _attempts(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: an integer >= 1 (total runs, the first included)")
    return n


def add_submit_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``submit`` and ``sweep`` (names follow ``hf jobs run``)."""
    p.add_argument("job", nargs="?", help="jobs/<gate>_<name>.py; its arguments go after `--`")
    p.add_argument("--flavor", help=f"hardware flavor (default {DEFAULT_FLAVOR}); `hf jobs hardware` lists them "
                                    "with prices")
    p.add_argument("--timeout", help=f"max duration: seconds or with s/m/h/d, e.g. 2h (default {DEFAULT_TIMEOUT})")
    p.add_argument("--attempts", type=_attempts, default=None, dest="attempts_given", metavar="N",
                   help="total attempts the Hub makes if the job fails (default 1); each retry resumes from what "
                        "the previous one uploaded")
    p.add_argument("--results-repo", help="results dataset repo <namespace>/<name> (default $COVTOKEN_RESULTS_REPO)")
    p.add_argument("--allow-unproven-prereg", action="store_true", help="when the run is fetched and audited: accept runs whose pre-registration cannot be proven from this checkout (marked in the summary)")
    p.add_argument("--public", action="store_true", help="allow a public results repo (default: private, and an "
                                                         "existing public one is refused)")
    p.add_argument("--namespace", help="namespace the job runs in (default: the token's user; --dry-run prints a "
                                       "placeholder)")
    p.add_argument("--image", help="docker image (default: the kit's image table, a PyTorch CUDA runtime for GPU "
                                   "flavors, a slim uv image for CPU)")
    p.add_argument("--name", help="name of the job (the `name` label; default the run id)")
    p.add_argument("-l", "--label", action="append", help="extra label KEY=VALUE ([A-Za-z0-9_-])")
    p.add_argument("-e", "--env", action="append", help="environment variable KEY=VALUE (or KEY: read here)")
    p.add_argument("-s", "--secrets", action="append",
                   help="secret NAME (value read from your environment) or NAME=VALUE; HF_TOKEN is always sent")
    p.add_argument("--env-file", help="file of environment variables (dotenv format; - for stdin)")
    p.add_argument("--secrets-file", help="file of secret variables (dotenv format; - for stdin)")
    p.add_argument("--dry-run", action="store_true", help="print the job spec and the hf commands; submit nothing; "
                                                          "needs no token and no network")
    p.add_argument("-d", "--detach", action="store_true", help="print the run id and return once submitted")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask to confirm the cost")
    p.add_argument("--allow-dirty", action="store_true", help="bundle uncommitted changes (recorded as dirty)")
    p.add_argument("--commit-every", "--log-every", dest="commit_every", default="5m",
                   help="least time between the job's batched commits of shards and log (default 5m; a sweep "
                        "raises it to stay under the Hub's commit rate limit; 0: one commit per shard)")
    p.add_argument("--bucket", metavar="NS/NAME",
                   help="read-write bucket volume (created private if missing) mounted at /state, where the job "
                        "writes token-bank shards and checkpoints as they are made: a hard kill (SIGKILL, node "
                        "loss) loses at most the shard in flight. Without it they go to the results repo in "
                        "batched commits and a hard kill loses up to one --commit-every interval of them (a "
                        "cancel or timeout, SIGTERM, loses nothing: pending shards are committed first). The "
                        "record, artefacts and logs go to the results repo either way")
    p.add_argument("--results", default="gate_reports", help="where records are fetched to (default gate_reports)")


def _with_attempts(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        args.attempts = args.attempts_given or 1
        return fn(args)

    return run


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``submit status ps logs wait cancel fetch sweep aggregate`` to the ``covtoken`` command line."""
    s = sub.add_parser("submit", help="run a job on HF Jobs on the committed code (or locally without a repo)")
    add_submit_options(s)
    s.add_argument("--resume", metavar="RUN_ID", help="continue a run from what its jobs uploaded")
    s.add_argument("--backend", choices=["hf-jobs", "local"],
                   help="default: hf-jobs when a results repo is configured, else local")
    s.set_defaults(fn=_with_attempts(cmd_submit))
    ps = sub.add_parser("ps", help="the kit's runs on HF Jobs (from their labels)")
    ps.add_argument("-a", "--all", action="store_true", help="also finished runs (default: running ones)")
    ps.add_argument("--namespace", help="namespace of the jobs (default: the token's user)")
    ps.add_argument("--json", action="store_true", help="JSON on stdout")
    ps.set_defaults(fn=cmd_ps)
    for name, fn, helptext in (("status", cmd_status, "attempts of a run (job id, stage, URL) and what it uploaded"),
                               ("logs", cmd_logs, "a run's job log"), ("wait", cmd_wait, "wait for a run's job"),
                               ("cancel", cmd_cancel, "cancel a run's live jobs")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("run_id")
        q.add_argument("--namespace", help="namespace of the jobs (default: the token's user)")
        if name == "status":
            q.add_argument("--json", action="store_true", help="JSON on stdout")
        if name == "logs":
            q.add_argument("-f", "--follow", action="store_true")
            q.add_argument("-n", "--tail", type=int, help="only the last N lines")
            q.add_argument("--attempt", type=int)
        if name == "wait":
            q.add_argument("--timeout", help="give up after this long: seconds or with s/m/h/d, e.g. 2h "
                                             "(default: no limit)")
            q.add_argument("--poll", type=float, default=1.0, help="seconds between polls")
        q.set_defaults(fn=fn)
    f = sub.add_parser("fetch", help="download records and artefacts into gate_reports/, then audit")
    f.add_argument("run_id", nargs="?")
    f.add_argument("--all", action="store_true", help="every run submitted to the results repo (with or without a "
                   "record: a run without one is entered in the local ledger and listed by the audit)")
    f.add_argument("--results", default="gate_reports", help="destination folder (default gate_reports)")
    f.add_argument("--results-repo", help="results dataset repo (default $COVTOKEN_RESULTS_REPO or the run's)")
    f.add_argument("--namespace", help="namespace of the jobs (default: the token's user)")
    f.add_argument("--no-card", action="store_true", help="do not regenerate the repo's dataset card")
    f.add_argument("--allow-unproven-prereg", action="store_true", help="audit runs whose pre-registration cannot be proven from this checkout (code commit not in its history); they are marked in the summary")
    f.add_argument("--allow-missing-records", action="store_true", help="runs started on the Hub without a record "
                   "(killed, failed or deleted) do not fail the fetch; they stay listed in NEGATIVE_RESULT.md")
    f.set_defaults(fn=cmd_fetch)
    sw = sub.add_parser("sweep", help="one HF Job per seed x dataset x backbone, then an aggregate record")
    add_submit_options(sw)
    sw.add_argument("--seeds", type=int, required=True, help="number of seeds")
    sw.add_argument("--seed-start", type=int, default=0, help="first seed (default 0)")
    sw.add_argument("--datasets", help="comma-separated dataset names (default: the job's)")
    sw.add_argument("--backbones", help="comma-separated backbone names (default: the job's)")
    sw.set_defaults(fn=_with_attempts(cmd_sweep))
    a = sub.add_parser("aggregate", help="wait for a sweep's cells and write its aggregate record(s)")
    a.add_argument("sweep_id")
    a.add_argument("--results-repo", help="results dataset repo (default $COVTOKEN_RESULTS_REPO)")
    a.add_argument("--results", default="gate_reports", help="where records are fetched to (default gate_reports)")
    a.add_argument("--timeout", help="give up waiting after this long: seconds or with s/m/h/d (default: no limit)")
    a.add_argument("--allow-unproven-prereg", action="store_true", help="audit runs whose pre-registration cannot be proven from this checkout (code commit not in its history); they are marked in the summary")
    a.set_defaults(fn=cmd_aggregate)

