"""The Hugging Face Jobs backend: ``covtoken submit | status | logs | wait | cancel`` (fetch and sweep live in
hffetch.py and hfsweep.py and are registered here too).

    covtoken submit jobs/g1_lesion_subspace.py --flavor a10g-small --timeout 2h --results-repo org/covtoken-results \\
        -- --dataset hf://datasets/org/lidc-idri-covtoken@<sha> --backbone meddinov3-vitb16-ct --device cuda
    covtoken status RUN_ID;  covtoken logs RUN_ID -f;  covtoken wait RUN_ID;  covtoken cancel RUN_ID
    covtoken submit jobs/g1_lesion_subspace.py --resume RUN_ID --results-repo org/covtoken-results

A submission builds the code bundle at the current commit (bundle.py), commits it to the results dataset repo
under ``runs/<run_id>/code/`` and starts the job with ``run_job`` on ``DEFAULT_IMAGE`` with that folder
mounted read-only at ``/code``, pinned to the commit of the upload. The job runs ``uv run /code/launch.py``
(launcher.py), which installs the bundle's wheel with the bundle's constraints and runs the job script. The
HF token goes to the job only as the secret ``HF_TOKEN``. Jobs carry the labels ``app=covtoken``, ``run``,
``attempt``, ``gate`` and ``code`` (commit prefix); every command finds a run's jobs by those labels.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from .bundle import BundleError, SourceState, build_bundle, source_state
from .hfspec import (DEFAULT_FLAVOR, DEFAULT_IMAGE, DEFAULT_TIMEOUT, HFJobsError, JobRequest, confirm, console,
                     job_gate, make_request, parse_timeout, price, show_price)
from .hubsync import MOUNT, HubSyncError, attempt_path, record_path
from .record import dumps_strict, loads_strict, new_run_id, utc_now

__all__ = ["register_cli", "cli_command", "committed_job", "upload_bundle", "start_job", "jobs_of_run", "last_attempt",
           "explain_end", "repo_files", "read_json"]

log = logging.getLogger(__name__)
LIVE = ("SCHEDULING", "RUNNING")


# ------------------------------------------------------------------------------------------------- helpers
def hub_api() -> Any:
    """An ``HfApi`` on ``HF_ENDPOINT`` with the local token."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # the CLI reports what it fetched itself
    return HfApi()


def local_token() -> str:
    """The local HF token (``HF_TOKEN`` or ``hf auth login``); it only ever goes to a job as a secret."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise HFJobsError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (it is passed to the job "
                          "as the secret HF_TOKEN only)")
    return token


def namespace_of(api: Any, namespace: str | None) -> str:
    """``--namespace`` or the token's user name."""
    return namespace or api.whoami()["name"]


def results_repo_of(args: argparse.Namespace) -> str | None:
    """``--results-repo`` or ``$COVTOKEN_RESULTS_REPO``."""
    repo = getattr(args, "results_repo", None) or os.environ.get("COVTOKEN_RESULTS_REPO")
    if repo and repo.count("/") != 1:
        raise HFJobsError(f"--results-repo {repo!r}: expected <namespace>/<name>")
    return repo


def cli_command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the backend's errors (and Hub HTTP errors) into a one-line message and exit code 1."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from huggingface_hub.errors import HfHubHTTPError

        try:
            return fn(args)
        except (HFJobsError, BundleError, HubSyncError) as exc:
            console.print(f"[red]error:[/red] {exc}", markup=True, soft_wrap=True)
        except HfHubHTTPError as exc:
            console.print(f"[red]Hub error:[/red] {exc}", soft_wrap=True)
        except Exception as exc:  # transport errors of the HTTP client: say where it tried to go
            if type(exc).__module__.split(".")[0] not in ("httpx", "httpx2", "httpcore", "httpcore2"):
                raise
            from huggingface_hub import constants

            console.print(f"[red]cannot reach the Hub at {constants.ENDPOINT}:[/red] {type(exc).__name__}: {exc}",
                          soft_wrap=True)
        return 1

    return run


def out(text: str) -> None:
    """Data output (spec, commands, log lines, run ids) on stdout, unformatted."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------------- submit
def upload_bundle(api: Any, repo: str, bundle: Path, run_ids: list[str], message: str,
                  extra: dict[str, bytes] | None = None) -> str:
    """Commit the bundle under ``runs/<id>/code/`` of every run id, and ``extra`` files, in one commit.

    Returns:
        The commit oid the jobs' ``/code`` volumes are pinned to.
    """
    from huggingface_hub import CommitOperationAdd

    api.create_repo(repo, repo_type="dataset", private=True, exist_ok=True)
    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    ops = [CommitOperationAdd(path_in_repo=f"runs/{rid}/code/{p.relative_to(bundle).as_posix()}",
                              path_or_fileobj=str(p)) for rid in run_ids for p in files]
    ops += [CommitOperationAdd(path_in_repo=k, path_or_fileobj=v) for k, v in (extra or {}).items()]
    return api.create_commit(repo_id=repo, repo_type="dataset", operations=ops, commit_message=message).oid


def start_job(api: Any, req: JobRequest, revision: str, token: str, price_info: dict[str, Any]) -> Any:
    """``run_job``, then commit ``runs/<id>/attempts/<n>.json`` (spec without the token, job id, price)."""
    job = api.run_job(**req.run_job_kwargs(revision, token))
    doc = {"kind": "covtoken.job_attempt", "run_id": req.run_id, "attempt": req.attempt, "job_id": job.id,
           "namespace": req.namespace, "url": job.url, "submitted_at": utc_now(), "job": req.job,
           "job_args": list(req.job_args), "spec": {**req.spec(revision), "secrets": ["HF_TOKEN"]},
           "price": price_info}
    api.upload_file(path_or_fileobj=dumps_strict(doc).encode(), path_in_repo=attempt_path(req.run_id, req.attempt),
                    repo_id=req.results_repo, repo_type="dataset",
                    commit_message=f"{req.run_id}: attempt {req.attempt} is job {job.id}")
    console.print(f"run [bold]{req.run_id}[/bold] attempt {req.attempt}: job {job.id} ({job.url})")
    return job


def read_json(api: Any, repo: str, path: str, revision: str | None = None) -> Any:
    """A JSON file of the results repo (strict)."""
    from huggingface_hub import hf_hub_download

    local = hf_hub_download(repo, path, repo_type="dataset", revision=revision)
    return loads_strict(Path(local).read_text(), source=f"{repo}/{path}")


def repo_files(api: Any, repo: str, prefix: str) -> list[str]:
    """Files of the results repo under ``prefix`` (empty if there is none)."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
    from huggingface_hub.hf_api import RepoFile

    try:
        return [e.path for e in api.list_repo_tree(repo, path_in_repo=prefix, recursive=True, repo_type="dataset")
                if isinstance(e, RepoFile)]
    except (EntryNotFoundError, RepositoryNotFoundError):
        return []


def _dry_run(req: JobRequest, bundle: Path) -> int:
    spec = req.spec("<commit of the bundle upload>")
    upload = ["hf", "upload", req.results_repo, str(bundle), f"runs/{req.run_id}/code", "--repo-type", "dataset",
              "--commit-message", f"{req.run_id}: code bundle"]
    out("# covtoken submit --dry-run: nothing was uploaded or submitted.")
    out(f"# 1. commit the code bundle (built in {bundle}) to the results repo:")
    out(shlex.join(upload))
    out("# 2. start the job on it (`covtoken submit` pins the volume to the commit of step 1: hf://...@<commit>/...):")
    out(shlex.join(req.hf_command(None)))
    out(f"# job spec `covtoken submit` POSTs to /api/jobs/{req.namespace}:")
    out(json.dumps(spec, indent=2, sort_keys=True))
    return 0


def _follow(api: Any, job: Any, namespace: str) -> Any:
    """Stream a job's log to stdout until it ends; returns the final ``JobInfo``."""
    for line in api.fetch_job_logs(job_id=job.id, namespace=namespace, follow=True):
        out(line)
    return api.wait_for_job(job.id, namespace=namespace)


def explain_end(api: Any, job: Any, namespace: str, run_id: str) -> str:
    """One paragraph on how a job ended, with the last log lines when it did not complete."""
    stage = str(job.status.stage)
    head = f"run {run_id}: job {job.id} ended {stage}" + (f": {job.status.message}" if job.status.message else "")
    if stage == "COMPLETED":
        return head
    try:
        tail = list(api.fetch_job_logs(job_id=job.id, namespace=namespace, tail=15))
    except Exception as exc:  # the logs are a courtesy here; the stage above is the answer
        tail = [f"(logs unavailable: {type(exc).__name__})"]
    lines = [head, f"No record was written for run {run_id}. Last log lines:", *("    " + t for t in tail),
             f"To continue from what the job uploaded: covtoken submit <job> --resume {run_id} --results-repo <repo>"]
    return "\n".join(lines)


def _finish_foreground(api: Any, job: Any, req: JobRequest, args: argparse.Namespace) -> int:
    final = _follow(api, job, req.namespace)
    if str(final.status.stage) != "COMPLETED":
        console.print(explain_end(api, final, req.namespace, req.run_id), markup=False)
        return 1
    from .hffetch import fetch_and_audit

    return fetch_and_audit(api, req.results_repo, [req.run_id], Path(args.results))


def committed_job(job: str | None, allow_dirty: bool) -> tuple[SourceState, str]:
    """The git state of the job's checkout and the job's path in it; a dirty tree is refused unless allowed."""
    if not job:
        raise HFJobsError("which job? e.g. covtoken submit jobs/g1_lesion_subspace.py -- --smoke")
    job_path = Path(job).resolve()
    if not job_path.is_file():
        raise HFJobsError(f"{job}: job script not found")
    state = source_state(job_path)
    rel = job_path.relative_to(state.root).as_posix()
    if state.dirty and not allow_dirty:
        listed = ", ".join(state.changed[:10]) + (" ..." if len(state.changed) > 10 else "")
        raise HFJobsError(f"{state.root}: uncommitted changes ({listed}); a job runs committed code only: commit "
                          "them, or pass --allow-dirty (the record will say dirty, with the diff's hash)")
    return state, rel


def _submit_new(api: Any, args: argparse.Namespace, repo: str, ns: str) -> int:
    state, rel = committed_job(args.job, args.allow_dirty)
    timeout_s = parse_timeout(args.timeout or DEFAULT_TIMEOUT)
    run_id = new_run_id(job_gate(rel))
    bundle = build_bundle(state, rel, state.root / "results" / "bundles")
    labels = dict(kv.split("=", 1) for kv in args.label or [])
    req = make_request(run_id=run_id, attempt=0, namespace=ns, results_repo=repo, job=rel, job_args=args.job_args,
                       commit=state.commit, image=args.image or DEFAULT_IMAGE, flavor=args.flavor or DEFAULT_FLAVOR,
                       timeout_s=timeout_s, log_every_s=args.log_every, labels=labels)
    p = price(api, req.flavor, timeout_s)
    show_price(p)
    console.print(f"code        {state.commit}" + (f" DIRTY (diff sha256 {state.diff_sha256})" if state.dirty else
                                                   " (clean)"), markup=False)
    if args.dry_run:
        return _dry_run(req, bundle)
    confirm(f"submit {rel} as run {run_id}?", args.yes)
    token = local_token()
    revision = upload_bundle(api, repo, bundle, [run_id], f"{run_id}: code bundle at {state.commit[:12]}")
    job = start_job(api, req, revision, token, p)
    return _after_start(api, job, req, args)


def _after_start(api: Any, job: Any, req: JobRequest, args: argparse.Namespace) -> int:
    if args.detach:
        console.print(f"follow it: covtoken logs {req.run_id} -f | covtoken wait {req.run_id} | "
                      f"covtoken fetch {req.run_id} --results-repo {req.results_repo}", markup=False)
        out(req.run_id)
        return 0
    return _finish_foreground(api, job, req, args)


def jobs_of_run(api: Any, namespace: str, run_id: str) -> list[Any]:
    """The jobs of a run, by attempt."""
    jobs = list(api.list_jobs(labels={"run": run_id}, namespace=namespace))
    return sorted(jobs, key=lambda j: int((j.labels or {}).get("attempt", "0")))


def last_attempt(api: Any, repo: str, run_id: str) -> dict:
    """The latest ``runs/<id>/attempts/<n>.json`` of a run."""
    files = [f for f in repo_files(api, repo, f"runs/{run_id}/attempts") if f.endswith(".json")]
    if not files:
        raise HFJobsError(f"{repo}: runs/{run_id}/attempts/ is empty; nothing was submitted as run {run_id}")
    n = max(int(Path(f).stem) for f in files)
    return read_json(api, repo, attempt_path(run_id, n))


def _submit_resume(api: Any, args: argparse.Namespace, repo: str, ns: str) -> int:
    rid = args.resume
    live = [j for j in jobs_of_run(api, ns, rid) if str(j.status.stage) in LIVE]
    if live:
        raise HFJobsError(f"run {rid} still has a live job ({live[-1].id}, {live[-1].status.stage}); cancel it first "
                          f"(covtoken cancel {rid})")
    if api.file_exists(repo, record_path(rid), repo_type="dataset"):
        raise HFJobsError(f"{repo}/{record_path(rid)} exists: run {rid} finished; nothing to resume")
    prev = last_attempt(api, repo, rid)
    if args.job and not Path(args.job).resolve().as_posix().endswith("/" + prev["job"]):
        raise HFJobsError(f"--resume {rid}: the run is {prev['job']}, not {args.job}")
    if args.job_args:
        raise HFJobsError(f"--resume {rid}: the job arguments are those of the first attempt ({prev['job_args']}); "
                          "do not pass new ones")
    spec = prev["spec"]
    vol = next(v for v in spec["volumes"] if v["mountPath"] == MOUNT)
    attempt = int(prev["attempt"]) + 1
    timeout_s = parse_timeout(args.timeout) if args.timeout else int(spec["timeoutSeconds"])
    req = make_request(run_id=rid, attempt=attempt, namespace=ns, results_repo=repo, job=prev["job"],
                       job_args=prev["job_args"], commit=spec["labels"]["code"],
                       image=args.image or spec["dockerImage"], flavor=args.flavor or spec["flavor"],
                       timeout_s=timeout_s, log_every_s=float(spec["environment"].get("COVTOKEN_LOG_EVERY_S", 120)),
                       labels={k: v for k, v in spec["labels"].items()
                               if k not in ("app", "gate", "run", "attempt", "code")})
    p = price(api, req.flavor, timeout_s)
    show_price(p)
    console.print(f"resume      run {rid} as attempt {attempt} on its original bundle "
                  f"({vol['source']}@{vol['revision'][:12]}/{vol['path']}); finished shards are downloaded first",
                  markup=False)
    if args.dry_run:
        out(shlex.join(req.hf_command(vol["revision"])))
        out(json.dumps(req.spec(vol["revision"]), indent=2, sort_keys=True))
        return 0
    confirm(f"resume run {rid}?", args.yes)
    job = start_job(api, req, vol["revision"], local_token(), p)
    return _after_start(api, job, req, args)


@cli_command
def cmd_submit(args: argparse.Namespace) -> int:
    """``covtoken submit``."""
    repo = results_repo_of(args)
    backend = args.backend or ("hf-jobs" if repo or args.resume else "local")
    if backend == "local":
        if args.resume or args.dry_run:
            raise HFJobsError("--resume and --dry-run need the HF Jobs backend (a results repo)")
        console.print("no results repo configured (--results-repo / COVTOKEN_RESULTS_REPO): running locally",
                      markup=False)
        from .cli import cmd_run

        return cmd_run(argparse.Namespace(job=args.job, backend="local", results=args.results,
                                          staging="results/local", job_args=args.job_args))
    api = hub_api()
    ns = namespace_of(api, args.namespace)
    if not repo and args.resume:  # the run's own jobs tell where its results go
        jobs = jobs_of_run(api, ns, args.resume)
        repo = (jobs[-1].environment or {}).get("COVTOKEN_RESULTS_REPO") if jobs else None
    if not repo:
        raise HFJobsError("--backend hf-jobs needs --results-repo <namespace>/<name> (or COVTOKEN_RESULTS_REPO)")
    return _submit_resume(api, args, repo, ns) if args.resume else _submit_new(api, args, repo, ns)


# ------------------------------------------------------------------------------------------------- queries
def _run_jobs(args: argparse.Namespace) -> tuple[Any, str, list[Any]]:
    api = hub_api()
    ns = namespace_of(api, args.namespace)
    jobs = jobs_of_run(api, ns, args.run_id)
    if not jobs:
        raise HFJobsError(f"no job labelled run={args.run_id} in namespace {ns}")
    return api, ns, jobs


@cli_command
def cmd_status(args: argparse.Namespace) -> int:
    """``covtoken status RUN_ID``: every attempt, and what is in the results repo."""
    api, ns, jobs = _run_jobs(args)
    table = Table(title=f"run {args.run_id}")
    for col in ("attempt", "job", "stage", "message", "flavor", "created"):
        table.add_column(col)
    for j in jobs:
        table.add_row((j.labels or {}).get("attempt", "?"), j.id, str(j.status.stage), j.status.message or "",
                      str(j.flavor), str(j.created_at))
    Console().print(table)
    repo = (jobs[-1].environment or {}).get("COVTOKEN_RESULTS_REPO")
    if repo:
        files = repo_files(api, repo, f"runs/{args.run_id}")
        shards = {Path(f).parent.as_posix() for f in files if "/bank/" in f and "/shard-" in f}
        rec = record_path(args.run_id) in files
        console.print(f"{repo}: {len(shards)} token-bank shard(s) uploaded; record "
                      f"{'present' if rec else 'not written'}", markup=False)
    return 0


@cli_command
def cmd_logs(args: argparse.Namespace) -> int:
    """``covtoken logs RUN_ID [-f] [--tail N]``: the log of the latest (or ``--attempt``) job."""
    api, ns, jobs = _run_jobs(args)
    job = jobs[-1] if args.attempt is None else next(
        (j for j in jobs if (j.labels or {}).get("attempt") == str(args.attempt)), None)
    if job is None:
        raise HFJobsError(f"run {args.run_id} has no attempt {args.attempt}")
    for line in api.fetch_job_logs(job_id=job.id, namespace=ns, follow=args.follow, tail=args.tail):
        out(line)
    return 0


@cli_command
def cmd_wait(args: argparse.Namespace) -> int:
    """``covtoken wait RUN_ID``: block until the latest job ends; 0 only if it completed."""
    api, ns, jobs = _run_jobs(args)
    try:
        final = api.wait_for_job(jobs[-1].id, namespace=ns, timeout=args.timeout, poll_interval=args.poll)
    except TimeoutError:
        raise HFJobsError(f"run {args.run_id}: job {jobs[-1].id} still running after {args.timeout} s") from None
    console.print(explain_end(api, final, ns, args.run_id), markup=False)
    return 0 if str(final.status.stage) == "COMPLETED" else 1


@cli_command
def cmd_cancel(args: argparse.Namespace) -> int:
    """``covtoken cancel RUN_ID``: cancel every live job of the run."""
    api, ns, jobs = _run_jobs(args)
    live = [j for j in jobs if str(j.status.stage) in LIVE]
    if not live:
        console.print(f"run {args.run_id}: no live job (latest {jobs[-1].id} is {jobs[-1].status.stage})",
                      markup=False)
        return 0
    for j in live:
        api.cancel_job(job_id=j.id, namespace=ns)
        console.print(f"run {args.run_id}: canceled job {j.id}", markup=False)
    return 0


# ------------------------------------------------------------------------------------------------- CLI
def add_submit_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``submit`` and ``sweep`` (names follow ``hf jobs run``)."""
    p.add_argument("job", nargs="?", help="jobs/<gate>_<name>.py; its arguments go after `--`")
    p.add_argument("--flavor", help=f"hardware flavor (default {DEFAULT_FLAVOR}); see list_jobs_hardware")
    p.add_argument("--timeout", help=f"max duration: seconds or with s/m/h/d (default {DEFAULT_TIMEOUT})")
    p.add_argument("--results-repo", help="results dataset repo <namespace>/<name> (default $COVTOKEN_RESULTS_REPO)")
    p.add_argument("--namespace", help="namespace the job runs in (default: the token's user)")
    p.add_argument("--image", help=f"docker image (default {DEFAULT_IMAGE})")
    p.add_argument("-l", "--label", action="append", help="extra label KEY=VALUE ([A-Za-z0-9_-])")
    p.add_argument("--dry-run", action="store_true", help="print the job spec and the hf commands; submit nothing")
    p.add_argument("-d", "--detach", action="store_true", help="print the run id and return once submitted")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask to confirm the cost")
    p.add_argument("--allow-dirty", action="store_true", help="bundle uncommitted changes (recorded as dirty)")
    p.add_argument("--log-every", type=float, default=120.0, help="seconds between log uploads (default 120)")
    p.add_argument("--results", default="gate_reports", help="where records are fetched to (default gate_reports)")


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``submit status logs wait cancel fetch sweep aggregate`` to the ``covtoken`` command line."""
    from . import hffetch, hfsweep

    s = sub.add_parser("submit", help="run a job on HF Jobs on the committed code (or locally without a repo)")
    add_submit_options(s)
    s.add_argument("--resume", metavar="RUN_ID", help="continue a run from what its jobs uploaded")
    s.add_argument("--backend", choices=["hf-jobs", "local"],
                   help="default: hf-jobs when a results repo is configured, else local")
    s.set_defaults(fn=cmd_submit)
    for name, fn, helptext in (("status", cmd_status, "attempts of a run and what it uploaded"),
                               ("logs", cmd_logs, "a run's job log"), ("wait", cmd_wait, "wait for a run's job"),
                               ("cancel", cmd_cancel, "cancel a run's live jobs")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("run_id")
        q.add_argument("--namespace", help="namespace of the jobs (default: the token's user)")
        if name == "logs":
            q.add_argument("-f", "--follow", action="store_true")
            q.add_argument("--tail", type=int)
            q.add_argument("--attempt", type=int)
        if name == "wait":
            q.add_argument("--timeout", type=float, help="seconds (default: no limit)")
            q.add_argument("--poll", type=float, default=1.0, help="seconds between polls")
        q.set_defaults(fn=fn)
    hffetch.register(sub)
    hfsweep.register(sub)
