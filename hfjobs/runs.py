"""Submit, resume and follow runs on HF Jobs: the library behind ``covtoken submit | status | ps | logs | wait
| cancel``. Everything here takes plain values (frozen request dataclasses) and returns plain values; the
command line (hfjobs/cli.py) only parses flags into requests and prints results.

A submission builds the code bundle at the current commit (bundle.py), commits it to the results dataset repo
under ``runs/<run_id>/code/`` (the repo is created private, and an existing public one is refused unless
``public=True``) and starts the job with ``run_job`` on the image of the flavor (images.py) with that folder
mounted read-only at ``/code``, pinned to the commit of the upload. The job runs ``python /code/launch.py``
(launcher.py), which installs what the image lacks with the bundle's constraints and runs the job script. The
HF token goes to the job only as the secret ``HF_TOKEN`` (other secrets by name, values never stored). Jobs
carry the labels ``app=covtoken``, ``run``, ``attempt``, ``gate``, ``code`` and ``name``; every query finds a
run's jobs by those labels. ``attempts > 1`` lets the Hub retry a failed job itself; each retry restores what
the previous one committed (token-bank shards) and computes only the rest, and uploads its log under its own
name. ``bucket`` (``--bucket NS/NAME``) adds a read-write bucket volume at ``/state`` (created private, a public
one refused) where the job writes shards and checkpoints as they are made, instead of committing them: a hard
kill then loses at most the shard in flight (hubsync.py).
"""
from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..record import dumps_strict, new_run_id, utc_now
from .bundle import SourceState, build_bundle, source_state
from .errors import HFJobsError
from .hubsync import attempt_path, record_path
from .images import check_image_ref, image_for, image_ref, image_warning
from .prices import live_price, offline_price
from .query import LIVE, hub_api, hub_call, jobs_of_run, last_attempt, local_token, namespace_of, repo_files
from .spec import (DEFAULT_COMMIT_EVERY_S, DEFAULT_FLAVOR, DEFAULT_TIMEOUT, MOUNT, RESERVED_LABELS, STATE_MOUNT,
                   JobRequest, job_gate, make_request, parse_bucket, parse_duration)

__all__ = ["SubmitRequest", "ResumeRequest", "RunHandle", "Plan", "RunStatus", "RunRow", "plan_submit",
           "plan_resume", "launch", "submit", "resume", "dry_run_lines", "ensure_private_repo", "ensure_private_bucket", "refuse_public_bucket", "refuse_public_repo", "committed_job",
           "status", "list_runs", "cancel", "wait", "logs", "explain_end", "next_steps", "PLACEHOLDER_NAMESPACE"]

PLACEHOLDER_NAMESPACE = "YOUR-NAMESPACE"


@dataclass(frozen=True)
class SubmitRequest:
    """A new run: the job, its arguments and where and how it runs. Secret *values* (beyond HF_TOKEN, which
    is read from the local login at launch) go in ``secrets``; only their names are ever stored."""

    job: str
    results_repo: str
    job_args: tuple[str, ...] = ()
    namespace: str | None = None
    flavor: str = DEFAULT_FLAVOR
    timeout: str | int = DEFAULT_TIMEOUT
    image: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    secrets: Mapping[str, str] = field(default_factory=dict)
    name: str | None = None
    attempts: int = 1
    commit_every_s: float = DEFAULT_COMMIT_EVERY_S
    allow_dirty: bool = False
    public: bool = False
    bucket: str | None = None   # NS/NAME: read-write state volume for shards and checkpoints (see hubsync.py)


@dataclass(frozen=True)
class ResumeRequest:
    """The next attempt of an unfinished run, on its original bundle and arguments."""

    run_id: str
    results_repo: str | None = None
    namespace: str | None = None
    job: str | None = None
    flavor: str | None = None
    timeout: str | int | None = None
    image: str | None = None
    secrets: Mapping[str, str] = field(default_factory=dict)
    attempts: int | None = None
    public: bool = False


@dataclass(frozen=True)
class RunHandle:
    """A started job of a run."""

    run_id: str
    attempt: int
    job_id: str
    namespace: str
    results_repo: str
    url: str


@dataclass(frozen=True)
class Plan:
    """What :func:`launch` will do: the job requests, the bundle, the price and the warnings to show first."""

    requests: tuple[JobRequest, ...]
    price: Mapping[str, Any]
    warnings: tuple[str, ...]
    bundle: Path | None = None
    state: SourceState | None = None
    revision: str | None = None          # resume: the bundle commit already in the repo
    extra_files: Mapping[str, bytes] = field(default_factory=dict)
    offline: bool = False

    @property
    def results_repo(self) -> str:
        return self.requests[0].results_repo


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


def _check_repo_id(repo: str | None) -> str:
    if not repo or repo.count("/") != 1 or not all(repo.split("/")):
        raise HFJobsError(f"--results-repo {repo!r}: expected <namespace>/<name> (or set COVTOKEN_RESULTS_REPO)")
    return repo


def _image(flavor: str, image: str | None) -> tuple[str, list[str]]:
    chosen = check_image_ref(image) if image is not None else image_ref(image_for(flavor))
    warn = image_warning(chosen)
    return chosen, [warn] if warn else []


def plan_submit(req: SubmitRequest, *, offline: bool = False, api: Any = None) -> Plan:
    """Build the bundle and the request of a new run, and price it (from the shipped table when ``offline``).

    ``offline`` touches neither the network nor the token: the namespace is ``req.namespace`` or a placeholder.
    """
    repo = _check_repo_id(req.results_repo)
    image, warnings = _image(req.flavor, req.image)  # a malformed --image digest fails here, before any work
    bucket = parse_bucket(req.bucket) if req.bucket else None
    state, rel = committed_job(req.job, req.allow_dirty)
    timeout_s = parse_duration(req.timeout)
    if offline:
        ns = req.namespace or PLACEHOLDER_NAMESPACE
    else:
        api = api or hub_api()
        ns = namespace_of(api, req.namespace)
        refuse_public_repo(api, repo, req.public)
        if bucket:
            refuse_public_bucket(api, bucket, req.public)
    run_id = new_run_id(job_gate(rel))
    jr = make_request(run_id=run_id, attempt=0, namespace=ns, results_repo=repo, job=rel, job_args=list(req.job_args),
                      commit=state.commit, image=image, flavor=req.flavor, timeout_s=timeout_s,
                      attempts=req.attempts, commit_every_s=req.commit_every_s, labels=req.labels, env=req.env,
                      secret_names=_secret_names(req.secrets), name=req.name, bucket=bucket)
    price = (offline_price(req.flavor, timeout_s, attempts=req.attempts) if offline
             else live_price(api, req.flavor, timeout_s, attempts=req.attempts))
    bundle = build_bundle(state, rel, state.root / "results" / "bundles")  # the expensive step, after every check
    return Plan(requests=(jr,), price=price, warnings=tuple(warnings), bundle=bundle, state=state, offline=offline)


def _secret_names(secrets: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(sorted({"HF_TOKEN", *secrets}))


def plan_resume(req: ResumeRequest, *, api: Any = None) -> Plan:
    """The next attempt of ``req.run_id``: checks the run is unfinished and has no live job."""
    api = api or hub_api()
    ns = namespace_of(api, req.namespace)
    rid = req.run_id
    jobs = jobs_of_run(api, ns, rid)
    repo = req.results_repo or ((jobs[-1].environment or {}).get("COVTOKEN_RESULTS_REPO") if jobs else None)
    repo = _check_repo_id(repo)
    live = [j for j in jobs if str(j.status.stage) in LIVE]
    if live:
        raise HFJobsError(f"run {rid} still has a live job ({live[-1].id}, {live[-1].status.stage}); cancel it "
                          f"first: covtoken cancel {rid}")
    if hub_call(api.file_exists, repo, record_path(rid), what="file_exists", repo=repo, repo_type="dataset"):
        raise HFJobsError(f"{repo}/{record_path(rid)} exists: run {rid} finished; nothing to resume")
    prev = last_attempt(api, repo, rid)
    if req.job and not Path(req.job).resolve().as_posix().endswith("/" + prev["job"]):
        raise HFJobsError(f"--resume {rid}: the run is {prev['job']}, not {req.job}")
    spec = prev["spec"]
    names = sorted(spec.get("secrets") or ["HF_TOKEN"])
    missing = [n for n in names if n != "HF_TOKEN" and n not in req.secrets]
    if missing:
        raise HFJobsError(f"--resume {rid}: the run was started with the secret(s) {', '.join(missing)}; pass "
                          + " ".join(f"-s {n}" for n in missing))
    vol = next(v for v in spec["volumes"] if v["mountPath"] == MOUNT)
    attempt = int(prev["attempt"]) + 1
    timeout_s = parse_duration(req.timeout) if req.timeout else int(spec["timeoutSeconds"])
    flavor = req.flavor or spec["flavor"]
    image, warnings = _image(flavor, req.image or spec["dockerImage"])
    kit_env = {k for k in spec["environment"] if k.startswith("COVTOKEN_")}
    jr = make_request(run_id=rid, attempt=attempt, namespace=ns, results_repo=repo, job=prev["job"],
                      job_args=prev["job_args"], commit=spec["labels"]["code"], image=image, flavor=flavor,
                      timeout_s=timeout_s, attempts=req.attempts or int(spec.get("attempts", 1)),
                      commit_every_s=float(spec["environment"].get("COVTOKEN_COMMIT_EVERY_S", DEFAULT_COMMIT_EVERY_S)),
                      labels={k: v for k, v in spec["labels"].items() if k not in (*RESERVED_LABELS, "name")},
                      env={k: v for k, v in spec["environment"].items() if k not in kit_env},
                      secret_names=tuple(names), name=spec["labels"].get("name"),
                      bucket=spec["environment"].get("COVTOKEN_STATE_BUCKET"))
    price = live_price(api, flavor, timeout_s, attempts=jr.attempts)
    warnings.append(f"resume run {rid} as attempt {attempt} on its original bundle ({vol['source']}@"
                    f"{vol['revision'][:12]}/{vol['path']}); finished shards are "
                    + (f"read from the bucket {jr.state_bucket} first" if jr.state_bucket else "downloaded first"))
    return Plan(requests=(jr,), price=price, warnings=tuple(warnings), revision=vol["revision"])


def refuse_public_repo(api: Any, repo: str, public: bool) -> None:
    """Before any work: an existing public results repo is refused unless ``public`` (a missing one is fine)."""
    from huggingface_hub.errors import RepositoryNotFoundError

    def visibility() -> bool | None:
        try:
            return api.repo_info(repo, repo_type="dataset").private
        except RepositoryNotFoundError:
            return None

    if hub_call(visibility, what="repo_info", repo=repo) is False and not public:
        _public_error(repo)


def _public_error(repo: str) -> None:
    raise HFJobsError(f"{repo} is a public dataset repo: records, token banks and logs would be world-readable; "
                      f"make it private (HfApi().update_repo_settings('{repo}', private=True, repo_type='dataset') "
                      "or its settings page), or pass --public")


def ensure_private_repo(api: Any, repo: str, public: bool) -> None:
    """Create the results repo private (public with ``public``); refuse an existing public one unless ``public``."""
    hub_call(api.create_repo, repo, what="create_repo", repo=repo, repo_type="dataset", private=not public,
             exist_ok=True)
    info = hub_call(api.repo_info, repo, what="repo_info", repo=repo, repo_type="dataset")
    if info.private is False and not public:
        _public_error(repo)


def refuse_public_bucket(api: Any, bucket: str, public: bool) -> None:
    """Before any work: an existing public state bucket is refused unless ``public`` (a missing one is fine)."""
    from huggingface_hub.errors import BucketNotFoundError

    def visibility() -> bool | None:
        try:
            return api.bucket_info(bucket).private
        except BucketNotFoundError:
            return None

    if hub_call(visibility, what="bucket_info", repo=bucket) is False and not public:
        _public_bucket_error(bucket)


def _public_bucket_error(bucket: str) -> None:
    raise HFJobsError(f"bucket {bucket} is public: token banks and checkpoints would be world-readable; make it "
                      f"private (HfApi().update_bucket_settings('{bucket}', private=True)), or pass --public")


def ensure_private_bucket(api: Any, bucket: str, public: bool) -> None:
    """Create the state bucket private (public with ``public``); refuse an existing public one unless ``public``."""
    hub_call(api.create_bucket, bucket, what="create_bucket", repo=bucket, private=not public, exist_ok=True)
    info = hub_call(api.bucket_info, bucket, what="bucket_info", repo=bucket)
    if info.private is False and not public:
        _public_bucket_error(bucket)


def _upload_bundle(api: Any, repo: str, bundle: Path, run_ids: list[str], message: str,
                   extra: Mapping[str, bytes]) -> str:
    from huggingface_hub import CommitOperationAdd

    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    ops = [CommitOperationAdd(path_in_repo=f"runs/{rid}/code/{p.relative_to(bundle).as_posix()}",
                              path_or_fileobj=str(p)) for rid in run_ids for p in files]
    ops += [CommitOperationAdd(path_in_repo=k, path_or_fileobj=v) for k, v in extra.items()]
    return hub_call(api.create_commit, what="create_commit", repo=repo, repo_id=repo, repo_type="dataset",
                    operations=ops, commit_message=message).oid


def launch(plan: Plan, *, secrets: Mapping[str, str] | None = None, public: bool = False,
           api: Any = None) -> list[RunHandle]:
    """Upload the bundle (new runs), start every job, then commit their attempt files in one commit.

    ``secrets`` holds the values of the plan's secret names except HF_TOKEN, which is the local login.
    """
    from huggingface_hub import CommitOperationAdd

    if plan.offline:
        raise HFJobsError("this plan was made offline (--dry-run); plan it again online to submit")
    api = api or hub_api()
    values = {"HF_TOKEN": local_token(), **(secrets or {})}
    repo = plan.results_repo
    revision = plan.revision
    for bucket in sorted({r.state_bucket for r in plan.requests if r.state_bucket}):
        ensure_private_bucket(api, bucket, public)
    if revision is None:
        ensure_private_repo(api, repo, public)
        first = plan.requests[0]
        commit = first.labels["code"]
        revision = _upload_bundle(api, repo, plan.bundle, [r.run_id for r in plan.requests],
                                  f"{first.labels.get('sweep', first.run_id)}: code bundle at {commit}",
                                  plan.extra_files)
    handles, ops = [], []
    for req in plan.requests:
        kw = req.run_job_kwargs(revision, {k: values[k] for k in req.secret_names})
        job = hub_call(api.run_job, what="run_job", **kw)
        doc = {"kind": "covtoken.job_attempt", "run_id": req.run_id, "attempt": req.attempt, "job_id": job.id,
               "namespace": req.namespace, "url": job.url, "submitted_at": utc_now(), "job": req.job,
               "job_args": list(req.job_args), "spec": req.spec(revision, placeholder="<secret>") | {
                   "secrets": list(req.secret_names)}, "price": dict(plan.price), "image_warning": list(plan.warnings)}
        ops.append(CommitOperationAdd(path_in_repo=attempt_path(req.run_id, req.attempt),
                                      path_or_fileobj=dumps_strict(doc).encode()))
        handles.append(RunHandle(run_id=req.run_id, attempt=req.attempt, job_id=job.id, namespace=req.namespace,
                                 results_repo=repo, url=job.url))
    what = handles[0].run_id if len(handles) == 1 else f"{len(handles)} runs"
    hub_call(api.create_commit, what="create_commit", repo=repo, repo_id=repo, repo_type="dataset", operations=ops,
             commit_message=f"{what}: attempt file(s) of job(s) " + ", ".join(h.job_id for h in handles[:5]))
    return handles


def submit(req: SubmitRequest, *, api: Any = None) -> RunHandle:
    """Plan and launch a new run (no confirmation: the caller has priced it)."""
    api = api or hub_api()
    return launch(plan_submit(req, api=api), secrets=req.secrets, public=req.public, api=api)[0]


def resume(req: ResumeRequest, *, api: Any = None) -> RunHandle:
    """Plan and launch the next attempt of a run."""
    api = api or hub_api()
    return launch(plan_resume(req, api=api), secrets=req.secrets, public=req.public, api=api)[0]


def dry_run_lines(plan: Plan) -> list[str]:
    """The commands that would submit ``plan`` with the ``hf`` CLI, and the JSON spec(s) (no token needed)."""
    reqs = plan.requests
    first = reqs[0]
    rev = plan.revision
    out = ["# covtoken --dry-run: nothing was uploaded or submitted" + (
        "; no token and no network were used" if plan.offline else "")]
    for bucket in sorted({r.state_bucket for r in reqs if r.state_bucket}):
        out += [f"# 0. the read-write state bucket, mounted at {STATE_MOUNT} (token-bank shards and checkpoints as "
                "they are made):", shlex.join(["hf", "buckets", "create", bucket, "--private", "--exist-ok"])]
    if rev is None:
        upload = ["hf", "upload", first.results_repo, str(plan.bundle), f"runs/{first.run_id}/code", "--repo-type",
                  "dataset", "--private", "--commit-message", f"{first.run_id}: code bundle"]
        out += [f"# 1. commit the code bundle (built in {plan.bundle}) to the results repo (private):",
                shlex.join(upload),
                "# 2. start the job on it (`covtoken submit` pins the volume to the commit of step 1: "
                "hf://...@<commit>/...):"]
    for r in reqs:
        out.append(shlex.join(r.hf_command(rev)))
    for r in reqs:
        out.append(f"# job spec `covtoken submit` POSTs to /api/jobs/{r.namespace} (run {r.run_id}):")
        out.append(json.dumps(r.spec(rev or "<commit of the bundle upload>", placeholder="<your value, sent as a "
                                     "secret>"), indent=2, sort_keys=True))
    return out


# ------------------------------------------------------------------------------------------------- queries
@dataclass(frozen=True)
class RunStatus:
    """Every attempt of a run and what it uploaded."""

    run_id: str
    namespace: str
    jobs: tuple[Mapping[str, Any], ...]
    results_repo: str | None
    shards: int | None
    record: bool | None
    state_bucket: str | None = None   # shards and checkpoints live there, not in the repo


def _job_row(j: Any) -> dict[str, Any]:
    return {"attempt": (j.labels or {}).get("attempt", "?"), "job_id": j.id, "stage": str(j.status.stage),
            "message": j.status.message or "", "flavor": str(j.flavor), "created_at": _iso(j.created_at),
            "url": j.url, "hub_retries": j.retry}


def _iso(t: Any) -> str | None:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ") if isinstance(t, datetime) else (None if t is None else str(t))


def _run_jobs(api: Any, namespace: str | None, run_id: str) -> tuple[str, list[Any]]:
    ns = namespace_of(api, namespace)
    jobs = jobs_of_run(api, ns, run_id)
    if not jobs:
        raise HFJobsError(f"no job labelled run={run_id} in namespace {ns}: check the run id (covtoken ps) or pass "
                          "--namespace")
    return ns, jobs


def status(run_id: str, namespace: str | None = None, *, api: Any = None) -> RunStatus:
    """The run's jobs (full id, stage, URL) and how many token-bank shards and whether a record were uploaded."""
    api = api or hub_api()
    ns, jobs = _run_jobs(api, namespace, run_id)
    repo = (jobs[-1].environment or {}).get("COVTOKEN_RESULTS_REPO")
    shards = record = None
    if repo:
        files = repo_files(api, repo, f"runs/{run_id}")
        shards = len({Path(f).parent.as_posix() for f in files if "/bank/" in f and "/shard-" in f})
        record = record_path(run_id) in files
    return RunStatus(run_id=run_id, namespace=ns, jobs=tuple(_job_row(j) for j in jobs), results_repo=repo,
                     shards=shards, record=record,
                     state_bucket=(jobs[-1].environment or {}).get("COVTOKEN_STATE_BUCKET"))


@dataclass(frozen=True)
class RunRow:
    """One run of ``ps``: its latest job."""

    run_id: str
    gate: str
    state: str
    flavor: str
    attempts: int
    age_s: int | None
    created_at: str | None
    job_id: str
    url: str
    sweep: str | None


def list_runs(namespace: str | None = None, *, all_states: bool = True, api: Any = None,
              now: float | None = None) -> list[RunRow]:
    """The kit's runs in a namespace (jobs labelled ``app=covtoken``), newest first, one row per run."""
    api = api or hub_api()
    ns = namespace_of(api, namespace)
    jobs = hub_call(lambda: list(api.list_jobs(labels={"app": "covtoken"}, namespace=ns)), what="list_jobs")
    by_run: dict[str, list[Any]] = {}
    for j in jobs:
        rid = (j.labels or {}).get("run")
        if rid:
            by_run.setdefault(rid, []).append(j)
    now = time.time() if now is None else now
    rows = []
    for rid, js in by_run.items():
        js.sort(key=lambda j: int((j.labels or {}).get("attempt", "0")))
        last = js[-1]
        created = last.created_at.replace(tzinfo=last.created_at.tzinfo or timezone.utc).timestamp() \
            if isinstance(last.created_at, datetime) else None
        rows.append(RunRow(run_id=rid, gate=(last.labels or {}).get("gate", "?").upper(), state=str(last.status.stage),
                           flavor=str(last.flavor), attempts=len(js),
                           age_s=None if created is None else max(0, int(now - created)),
                           created_at=_iso(last.created_at), job_id=last.id, url=last.url,
                           sweep=(last.labels or {}).get("sweep")))
    rows = [r for r in rows if all_states or r.state in LIVE]
    return sorted(rows, key=lambda r: r.created_at or "", reverse=True)


def cancel(run_id: str, namespace: str | None = None, *, api: Any = None) -> tuple[list[str], Any]:
    """Cancel every live job of a run; returns (canceled job ids, latest job)."""
    api = api or hub_api()
    ns, jobs = _run_jobs(api, namespace, run_id)
    live = [j for j in jobs if str(j.status.stage) in LIVE]
    for j in live:
        hub_call(api.cancel_job, what="cancel_job", job_id=j.id, namespace=ns)
    return [j.id for j in live], jobs[-1]


def wait(run_id: str, namespace: str | None = None, *, timeout_s: float | None = None, poll_s: float = 1.0,
         api: Any = None) -> tuple[Any, str]:
    """Block until the run's latest job ends; returns (final JobInfo, namespace)."""
    api = api or hub_api()
    ns, jobs = _run_jobs(api, namespace, run_id)
    try:
        final = hub_call(api.wait_for_job, jobs[-1].id, what="wait_for_job", namespace=ns, timeout=timeout_s,
                         poll_interval=poll_s)
    except TimeoutError:
        raise HFJobsError(f"run {run_id}: job {jobs[-1].id} still running after {timeout_s:g} s; wait again "
                          f"(covtoken wait {run_id}) or cancel it (covtoken cancel {run_id})") from None
    return final, ns


def logs(run_id: str, namespace: str | None = None, *, follow: bool = False, tail: int | None = None,
         attempt: int | None = None, api: Any = None) -> Iterator[str]:
    """The log lines of the run's latest (or ``attempt``) job."""
    api = api or hub_api()
    ns, jobs = _run_jobs(api, namespace, run_id)
    job = jobs[-1] if attempt is None else next(
        (j for j in jobs if (j.labels or {}).get("attempt") == str(attempt)), None)
    if job is None:
        raise HFJobsError(f"run {run_id} has no attempt {attempt}")
    yield from api.fetch_job_logs(job_id=job.id, namespace=ns, follow=follow, tail=tail)


def next_steps(run_id: str, results_repo: str) -> list[str]:
    """Commands to follow a detached run, one per line (each pasteable on its own)."""
    return [f"covtoken logs {run_id} -f", f"covtoken wait {run_id}",
            f"covtoken fetch {run_id} --results-repo {results_repo}"]


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
    repo = (job.environment or {}).get("COVTOKEN_RESULTS_REPO", "<repo>")
    lines = [head, f"No record was written for run {run_id}. Last log lines:", *("    " + t for t in tail),
             "To continue from what the job uploaded:",
             f"    covtoken submit --resume {run_id} --results-repo {repo}"]
    return "\n".join(lines)
