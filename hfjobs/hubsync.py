"""Inside an HF Job: put results into ``runs/<run_id>/`` of the results dataset repo as they are made.

Layout of a run folder in the results repo (the same names are used by submit, fetch and resume)::

    runs/<run_id>/code/                  the code bundle the job ran (mounted read-only at /code)
    runs/<run_id>/attempts/<n>.json      the job spec of attempt n (secret names only) and its job id
    runs/<run_id>/bank/<bank>/           token-bank manifest and finished shards, many shards per commit
    runs/<run_id>/logs/attempt-<n>.log   the job's log, in the same commits, and once more at the end
    runs/<run_id>/logs/attempt-<n>.try-<k>.log   the log of the Hub's retry k >= 1 of attempt n (--attempts)
    runs/<run_id>/tries/attempt-<n>.try-<k>.json  each try's claim: job id, start time, image (--attempts > 1)
    runs/<run_id>/<run_id>.json          the gate record, committed last together with
    runs/<run_id>/artefacts/<run_id>/    its artefacts (a results folder, as ``covtoken fetch`` expects)

:class:`Run` (runner.py) creates a :class:`HubSync` when ``COVTOKEN_BACKEND=hf-jobs``; the launcher runs
``python -m covtoken.hfjobs.hubsync logs --file F`` beside the job for the log.

Commits are bounded: the Hub limits commits per repo (a public 429 message quotes 128 per hour) and a sweep's
cells share one repo. Finished shards wait in a :class:`CommitBatcher` and go out together, with the current
log, at most once every ``COVTOKEN_COMMIT_EVERY_S`` seconds (default 300; a sweep raises it so that all its
cells together stay under the budget), plus one commit for the record (which carries whatever is still
pending) and one for the final log. The log sidecar uploads the log only when no batch commit went out in the
last interval. Every commit and download is retried on 429/5xx with backoff honouring ``Retry-After``
(retry.py). A job killed abruptly (SIGKILL, node loss) loses the shards of at most one commit interval; a
cancel or timeout (SIGTERM) commits the pending ones first. A resumed attempt (or a Hub-native retry,
``--attempts``) downloads what was committed and computes only the rest.

With a state bucket (``covtoken submit --bucket NS/NAME``: a read-write bucket volume mounted at ``/state``, the
Hub-native place for bulky state, where writes are not commits) token-bank shards and checkpoints are not
committed at all: each finished shard is written into ``/state/runs/<run_id>/bank/<bank>/`` as soon as it is
made, followed by a new version of its manifest (``manifests/<time_ns>.json``; nothing renamed or rewritten in
place), so a hard kill loses at most the shard in flight, and the next attempt reads the bucket back. The
record, artefacts, attempt files and logs still go to the results repo as above. The job finds its own job id by its
labels (``run``, ``attempt``), never from a platform variable. The HF token comes from the job secret
``HF_TOKEN`` and is read by ``huggingface_hub`` itself; nothing here writes it anywhere.
"""
from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import HFJobsError
from .prices import hardware_summary
from .retry import with_retry
from .spec import DEFAULT_COMMIT_EVERY_S, MOUNT

__all__ = ["HubSyncError", "JobEnv", "HubSync", "CommitBatcher", "run_prefix", "record_path", "attempt_path",
           "log_path", "try_path", "commit_record", "main"]

log = logging.getLogger(__name__)
#: The log sidecar never uploads more often than this (the job's own batches carry the log in between).
SIDECAR_MIN_EVERY_S = 60.0


class HubSyncError(HFJobsError):
    """The job environment or the results repo is not as the HF backend needs it; names the variable or path."""


def run_prefix(run_id: str) -> str:
    """``runs/<run_id>``."""
    return f"runs/{run_id}"


def record_path(run_id: str) -> str:
    """Where a run's record lives in the results repo."""
    return f"{run_prefix(run_id)}/{run_id}.json"


def attempt_path(run_id: str, attempt: int) -> str:
    """The submitted spec of one attempt."""
    return f"{run_prefix(run_id)}/attempts/{attempt}.json"


def log_path(run_id: str, attempt: int, try_: int = 0) -> str:
    """The uploaded log of one attempt (try ``try_`` of it when the Hub retried it; 0 is the first)."""
    return f"{run_prefix(run_id)}/logs/attempt-{attempt}" + (f".try-{try_}" if try_ else "") + ".log"


def try_path(run_id: str, attempt: int, try_: int) -> str:
    """The claim of one try of an attempt (written only when the Hub may retry it)."""
    return f"{run_prefix(run_id)}/tries/attempt-{attempt}.try-{try_}.json"


def commit_mark(log_file: Path) -> Path:
    """The file whose mtime says when the job last committed its log (the sidecar reads it)."""
    return log_file.with_name(log_file.name + ".committed")


@dataclass(frozen=True)
class JobEnv:
    """What ``covtoken submit`` puts in the job's environment (public values only; the token is a secret)."""

    run_id: str
    results_repo: str
    namespace: str
    attempt: int
    timeout_s: int | None
    commit_every_s: float
    kit_dir: Path | None
    log_file: Path | None = None
    image: str | None = None
    state_dir: Path | None = None      # where the state bucket is mounted (COVTOKEN_STATE_DIR, set by the launcher)
    state_bucket: str | None = None    # its id NS/NAME (COVTOKEN_STATE_BUCKET, set by submit)
    try_index: int | None = None       # which Hub try of the attempt this is (COVTOKEN_TRY, set by the launcher)

    REQUIRED = ("COVTOKEN_RUN_ID", "COVTOKEN_RESULTS_REPO", "COVTOKEN_JOB_NAMESPACE", "COVTOKEN_ATTEMPT")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "JobEnv":
        """Read the variables; a missing one raises naming it."""
        env = os.environ if environ is None else environ
        missing = [k for k in cls.REQUIRED if not env.get(k)]
        if missing:
            raise HubSyncError(f"COVTOKEN_BACKEND=hf-jobs but {', '.join(missing)} not set; HF jobs are started "
                               "by `covtoken submit`")
        try:
            attempt = int(env["COVTOKEN_ATTEMPT"])
            timeout = int(env["COVTOKEN_TIMEOUT_S"]) if env.get("COVTOKEN_TIMEOUT_S") else None
            every = float(env.get("COVTOKEN_COMMIT_EVERY_S") or DEFAULT_COMMIT_EVERY_S)
            try_index = int(env["COVTOKEN_TRY"]) if env.get("COVTOKEN_TRY") else None
        except ValueError as exc:
            raise HubSyncError(f"COVTOKEN_ATTEMPT / COVTOKEN_TIMEOUT_S / COVTOKEN_COMMIT_EVERY_S / COVTOKEN_TRY: "
                               f"{exc}") from None
        kit, log_file = env.get("COVTOKEN_KIT_DIR"), env.get("COVTOKEN_LOG_FILE")
        return cls(run_id=env["COVTOKEN_RUN_ID"], results_repo=env["COVTOKEN_RESULTS_REPO"],
                   namespace=env["COVTOKEN_JOB_NAMESPACE"], attempt=attempt, timeout_s=timeout, commit_every_s=every,
                   kit_dir=Path(kit) if kit else None, log_file=Path(log_file) if log_file else None,
                   image=env.get("COVTOKEN_IMAGE") or None,
                   state_dir=Path(env["COVTOKEN_STATE_DIR"]) if env.get("COVTOKEN_STATE_DIR") else None,
                   state_bucket=env.get("COVTOKEN_STATE_BUCKET") or None, try_index=try_index)


class CommitBatcher:
    """File additions of one run, committed together at most once every ``every_s`` seconds.

    ``add`` queues files (a later version of the same path replaces the earlier one); a commit goes out when
    ``every_s`` has passed since the last one (or since the batcher started), from ``add`` or from a background
    timer, so a shard never waits longer than one interval. ``flush`` returns the pending operations for a
    commit made by the caller (the record's). ``extra`` is called at each commit for files to add then (the log).

    Args:
        commit: ``commit(ops, message) -> oid``; called with the lock held, one commit at a time.
        every_s: the minimum interval between commits.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, commit: Callable[[list[Any], str], str], every_s: float, *, label: str = "",
                 extra: Callable[[], list[Any]] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._commit, self.every_s, self.label, self._extra, self._clock = commit, float(every_s), label, extra, clock
        self._pending: dict[str, Any] = {}
        self._names: list[str] = []
        self._lock = threading.RLock()
        self._last = clock()
        self.commits = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, ops: list[Any], name: str) -> None:
        """Queue ``ops`` (``CommitOperationAdd``) under a display ``name``; commit if the interval has passed."""
        with self._lock:
            for op in ops:
                self._pending[op.path_in_repo] = op
            self._names.append(name)
        self.maybe_commit()

    @property
    def pending(self) -> list[str]:
        with self._lock:
            return list(self._names)

    def maybe_commit(self) -> str | None:
        """Commit the pending files if ``every_s`` has passed since the last commit; returns the oid or None."""
        with self._lock:
            if not self._pending or self._clock() - self._last < self.every_s:
                return None
            return self._commit_now()

    def commit_pending(self) -> str | None:
        """Commit whatever is pending now, whatever the interval (used on SIGTERM); None when nothing is."""
        with self._lock:
            return self._commit_now() if self._pending else None

    def _commit_now(self) -> str:
        ops = list(self._pending.values()) + (self._extra() if self._extra else [])
        names = self._names
        oid = self._commit(ops, f"{self.label}{', '.join(names[:3])}" + (f" (+{len(names) - 3})" if len(names) > 3
                                                                          else ""))
        self._pending, self._names, self._last = {}, [], self._clock()
        self.commits += 1
        log.info(json.dumps({"event": "batch_committed", "items": names, "files": len(ops), "commit": oid}))
        return oid

    def flush(self) -> list[Any]:
        """Hand the pending operations to the caller (who commits them) and reset; the timer keeps its phase."""
        with self._lock:
            ops = list(self._pending.values())
            self._pending, self._names = {}, []
            return ops

    def start(self, poll_s: float | None = None) -> "CommitBatcher":
        """Commit pending files from a daemon thread once their interval has passed."""
        poll = poll_s or max(0.2, min(5.0, self.every_s / 4))

        def loop() -> None:
            while not self._stop.wait(poll):
                try:
                    self.maybe_commit()
                except Exception as exc:  # the next add, the next tick or the record commit retries
                    log.warning("batched commit failed: %s: %s", type(exc).__name__, exc)

        if self._thread is None:
            self._thread = threading.Thread(target=loop, name="covtoken-commit-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


class HubSync:
    """Uploads of one run, from inside its job.

    Args:
        env: the job's :class:`JobEnv`.
        api: an ``HfApi`` (default: a new one; the token comes from the ``HF_TOKEN`` secret).
    """

    def __init__(self, env: JobEnv, api: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        from huggingface_hub import HfApi

        self.env = env
        self.api = api or HfApi()
        self.prefix = run_prefix(env.run_id)
        if env.state_bucket and env.state_dir is None:
            raise HubSyncError(f"COVTOKEN_STATE_BUCKET={env.state_bucket} but COVTOKEN_STATE_DIR not set: the "
                               "launcher sets it from its --covtoken-state argument")
        #: the run's folder in the state bucket (None: shards go to the results repo in batched commits)
        self.state = None if env.state_dir is None else Path(env.state_dir) / self.prefix
        self._job: Any = None
        self.batcher = CommitBatcher(self._commit, env.commit_every_s, label=f"{env.run_id}: ",
                                     extra=self._log_ops, clock=clock)

    @classmethod
    def from_environment(cls) -> "HubSync":
        """The run's sync, after checking that ``covtoken`` is the bundle's code (never a stray install)."""
        env = JobEnv.from_environ()
        import covtoken

        if env.kit_dir is None:
            raise HubSyncError("COVTOKEN_KIT_DIR not set: HF jobs run through the bundle's launch.py")
        here = Path(covtoken.__file__).resolve().parent
        if here != (env.kit_dir / "covtoken").resolve():
            raise HubSyncError(f"covtoken is imported from {here}, not from the bundle's wheel unpacked in "
                               f"{env.kit_dir}; refusing to record a run whose code is not the bundle's")
        from huggingface_hub.utils import disable_progress_bars

        # one INFO line per HTTP request and tqdm bars would drown the job's own log
        for name in ("httpx", "httpx2"):
            logging.getLogger(name).setLevel(logging.WARNING)
        disable_progress_bars()
        sync = cls(env)
        sync.batcher.start()
        sync.flush_on_sigterm()
        atexit.register(sync._flush_at_exit)  # a job failing after some shards still leaves them for a resume
        return sync

    def _flush_at_exit(self) -> None:
        self.batcher.stop()
        try:
            self.batcher.commit_pending()
        except Exception as exc:  # never mask the job's own exit status
            log.warning("flush at exit failed: %s: %s", type(exc).__name__, exc)

    def flush_on_sigterm(self) -> Any:
        """On SIGTERM (cancel, timeout, a graceful preemption) commit the pending shards, then exit 143.

        Only from the main thread (where Python runs signal handlers); returns the previous handler.
        """
        if threading.current_thread() is not threading.main_thread():
            return None

        def on_term(signum: int, _frame: Any) -> None:
            self.batcher.stop()
            try:
                self.batcher.commit_pending()
            except Exception as exc:  # exiting anyway; the next attempt recomputes what did not land
                log.warning("flush on SIGTERM failed: %s: %s", type(exc).__name__, exc)
            raise SystemExit(128 + signum)

        return signal.signal(signal.SIGTERM, on_term)

    # ------------------------------------------------------------------ identity
    def claim_run_id(self, run_id: str | None) -> str:
        """The run id of this job; a different one given to the job is an error."""
        if run_id is not None and run_id != self.env.run_id:
            raise HubSyncError(f"--run-id {run_id} differs from COVTOKEN_RUN_ID {self.env.run_id} set by submit")
        return self.env.run_id

    def job_info(self) -> Any:
        """This job's ``JobInfo``, found by its ``run`` and ``attempt`` labels."""
        if self._job is None:
            labels = {"run": self.env.run_id, "attempt": str(self.env.attempt)}
            jobs = list(with_retry(lambda: list(self.api.list_jobs(labels=labels, namespace=self.env.namespace)),
                                   what="list_jobs"))
            if len(jobs) != 1:
                raise HubSyncError(f"expected one job labelled {labels} in namespace {self.env.namespace}, "
                                   f"found {[j.id for j in jobs]}")
            self._job = jobs[0]
        return self._job

    def backend(self) -> dict:
        """The record's ``provenance.backend``: job id, flavor, image (and digest), hardware, bundle, repo."""
        from .images import digest_of

        job = self.job_info()
        hw = next((h for h in with_retry(self.api.list_jobs_hardware, what="list_jobs_hardware")
                   if h.name == str(job.flavor)), None)
        vol = next((v for v in job.volumes or [] if v.mount_path == MOUNT), None)
        image = job.docker_image or job.space_id
        # ``image`` is what the Hub says the job runs in, ``image_requested`` what `covtoken submit` launched it
        # with (COVTOKEN_IMAGE); the audit and `covtoken fetch` check both against the submitted spec
        return {"name": "hf-jobs", "job_id": job.id, "namespace": self.env.namespace, "url": job.url,
                "flavor": str(job.flavor), "image": image, "image_requested": self.env.image,
                "image_digest": digest_of(image or ""),
                "timeout_s": self.env.timeout_s, "attempt": self.env.attempt, "try": self.env.try_index,
                "attempts_allowed": (getattr(job, "retry", None) or 0) + 1, "results_repo": self.env.results_repo,
                "run_folder": self.prefix, "commit_every_s": self.env.commit_every_s,
                "state": None if self.state is None else {"bucket": self.env.state_bucket, "folder": self.prefix,
                                                          "holds": "token-bank shards and checkpoints"},
                "bundle": None if vol is None else {"repo": vol.source, "path": vol.path, "revision": vol.revision},
                "hardware": None if hw is None else hardware_summary(hw)}

    # ------------------------------------------------------------------ uploads
    def _commit(self, ops: list[Any], message: str) -> str:
        info = with_retry(self.api.create_commit, what="create_commit", repo_id=self.env.results_repo,
                          repo_type="dataset", operations=ops, commit_message=message)
        if self.env.log_file is not None and any(getattr(o, "path_in_repo", "") == self._remote_log for o in ops):
            mark = commit_mark(self.env.log_file)
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.touch()
        return info.oid

    @property
    def _remote_log(self) -> str:
        return log_path(self.env.run_id, self.env.attempt, self.env.try_index or 0)

    def claim_try(self) -> int:
        """Which try of this attempt the job is, claimed in the results repo so that no try overwrites another's
        log: 0 when the Hub will not retry (``attempts`` 1, nothing written); otherwise one past the highest
        claim already in ``runs/<run_id>/tries/`` for this attempt, committed (with the log so far) before the
        job starts. The platform gives the container no retry counter, so the repo is the counter."""
        from huggingface_hub import CommitOperationAdd

        from ..record import dumps_strict, utc_now

        job = self.job_info()
        allowed = (getattr(job, "retry", None) or 0) + 1
        if allowed == 1:
            return 0
        prefix = f"{self.prefix}/tries/attempt-{self.env.attempt}.try-"

        def claimed() -> list[int]:
            from huggingface_hub.errors import EntryNotFoundError

            try:
                files = self.api.list_repo_tree(self.env.results_repo, path_in_repo=f"{self.prefix}/tries",
                                                repo_type="dataset")
                return [int(f.path[len(prefix):-len(".json")]) for f in files
                        if f.path.startswith(prefix) and f.path.endswith(".json")]
            except EntryNotFoundError:
                return []

        k = max(with_retry(claimed, what="list_repo_tree"), default=-1) + 1
        doc = {"kind": "covtoken.job_try", "run_id": self.env.run_id, "attempt": self.env.attempt, "try": k,
               "attempts_allowed": allowed, "job_id": job.id, "started_at": utc_now(),
               "image_requested": self.env.image, "image": job.docker_image or job.space_id,
               "log": log_path(self.env.run_id, self.env.attempt, k), "state_bucket": self.env.state_bucket}
        ops = [CommitOperationAdd(path_in_repo=try_path(self.env.run_id, self.env.attempt, k),
                                  path_or_fileobj=dumps_strict(doc).encode())]
        f = self.env.log_file
        if f is not None and f.is_file():
            ops.append(CommitOperationAdd(path_in_repo=log_path(self.env.run_id, self.env.attempt, k),
                                          path_or_fileobj=f.read_bytes()))
        self._commit(ops, f"{self.env.run_id}: attempt {self.env.attempt} try {k} of {allowed} started")
        log.info(json.dumps({"event": "try_claimed", "attempt": self.env.attempt, "try": k, "of": allowed}))
        return k

    def _log_ops(self) -> list[Any]:
        """The current log of the job (the launcher's tee file), as an addition; nothing outside a launcher."""
        from huggingface_hub import CommitOperationAdd

        f = self.env.log_file
        if f is None or not f.is_file():
            return []
        return [CommitOperationAdd(path_in_repo=self._remote_log, path_or_fileobj=f.read_bytes())]

    def bank_uploader(self, bank_dir: str | Path) -> Callable[[Path], None]:
        """``on_shard`` for :meth:`TokenBank.build` (and checkpoints): with a state bucket, writes each finished
        shard (then the manifest) into it at once; otherwise queues them for a batched commit to the repo."""
        from huggingface_hub import CommitOperationAdd

        bank_dir = Path(bank_dir)
        if self.state is not None:
            return self._state_writer(bank_dir)
        remote = f"{self.prefix}/bank/{bank_dir.name}"

        def upload(shard_dir: Path) -> None:
            files = sorted(f for f in Path(shard_dir).iterdir() if f.is_file() and not f.name.startswith("."))
            ops = [CommitOperationAdd(path_in_repo=f"{remote}/{shard_dir.name}/{f.name}", path_or_fileobj=str(f))
                   for f in files]
            ops.append(CommitOperationAdd(path_in_repo=f"{remote}/manifest.json",
                                          path_or_fileobj=(bank_dir / "manifest.json").read_bytes()))
            self.batcher.add(ops, f"token-bank {bank_dir.name} {shard_dir.name}")
            log.info(json.dumps({"event": "shard_queued", "shard": shard_dir.name, "files": len(files),
                                 "pending": len(self.batcher.pending)}))

        return upload

    # ------------------------------------------------------------------ state bucket
    def _state_bank(self, name: str) -> Path:
        assert self.state is not None
        return self.state / "bank" / name

    def _state_writer(self, bank_dir: Path) -> Callable[[Path], None]:
        """Copy each finished shard folder into the bucket, file by file, then a new version of the manifest.

        Bucket mounts are object stores: nothing is renamed and no manifest is rewritten in place. Each manifest
        version is a new file ``manifests/<time_ns>.json`` written after the shard files it lists, so a kill at any
        point leaves the newest complete version listing only shards whose files are complete (a torn newest
        version is skipped on restore, and the bank re-verifies every shard by hash anyway).
        """
        dest = self._state_bank(bank_dir.name)

        def save(shard_dir: Path) -> None:
            shard_dir = Path(shard_dir)
            files = sorted(f for f in shard_dir.iterdir() if f.is_file() and not f.name.startswith("."))
            (dest / shard_dir.name).mkdir(parents=True, exist_ok=True)
            for f in files:
                _copy_synced(f, dest / shard_dir.name / f.name)
            versions = dest / "manifests"
            versions.mkdir(parents=True, exist_ok=True)
            _copy_synced(bank_dir / "manifest.json", versions / f"{time.time_ns():020d}.json")
            for old in sorted(versions.glob("*.json"))[:-2]:  # keep the two newest versions
                old.unlink(missing_ok=True)
            log.info(json.dumps({"event": "shard_saved", "shard": shard_dir.name, "files": len(files),
                                 "bucket": self.env.state_bucket, "to": str(dest.relative_to(self.env.state_dir))}))

        return save

    def _restore_from_state(self, bank_dir: Path) -> int:
        """Copy what earlier attempts wrote to the bucket into ``bank_dir``; returns how many shards its newest
        readable manifest lists (the bank verifies each by hash, and recomputes any that fails)."""
        from ..record import loads_strict, sha256_file

        src = self._state_bank(bank_dir.name)
        manifest = None
        for version in sorted(src.glob("manifests/*.json"), reverse=True):
            try:
                manifest = loads_strict(version.read_text(), source=str(version))
                break
            except (OSError, ValueError) as exc:  # a version torn by a kill: the previous one is complete
                log.warning("state manifest %s unreadable (%s); trying the previous version", version, exc)
        n = 0
        if manifest is not None:
            bank_dir.mkdir(parents=True, exist_ok=True)
            for d in sorted(p for p in src.iterdir() if p.is_dir() and p.name != "manifests"):
                for f in sorted(d.iterdir()):
                    if f.is_file():
                        (bank_dir / d.name).mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(f, bank_dir / d.name / f.name)
            (bank_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            shards = manifest.get("shards") or ()
            if isinstance(shards, dict):  # a token bank's: count only the shards whose files verify
                n = sum(all((bank_dir / f"shard-{k}" / f).is_file() and sha256_file(bank_dir / f"shard-{k}" / f) == h
                            for f, h in (v.get("files") or {}).items()) for k, v in shards.items())
            else:  # checkpoints (a list); the pretraining loop verifies each against the manifest
                n = len(shards)
        log.info(json.dumps({"event": "bank_restored", "bank": bank_dir.name, "shards": n, "from": "bucket",
                             "bucket": self.env.state_bucket}))
        return n

    def restore_bank(self, bank_dir: str | Path) -> int:
        """Bring back the shards an earlier attempt saved into ``bank_dir`` (from the state bucket, else from the
        results repo); returns how many shards.

        The bank verifies every shard against its manifest hashes when it is built.
        """
        from huggingface_hub import snapshot_download

        bank_dir = Path(bank_dir)
        if (bank_dir / "manifest.json").exists():
            return 0
        if self.state is not None:
            return self._restore_from_state(bank_dir)
        remote = f"{self.prefix}/bank/{bank_dir.name}"
        bank_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=bank_dir.parent, prefix=".restore-") as tmp:
            with_retry(snapshot_download, self.env.results_repo, what="snapshot_download", repo_type="dataset",
                       allow_patterns=[f"{remote}/**"], local_dir=tmp)
            got = Path(tmp) / remote
            if not (got / "manifest.json").is_file():
                log.info(json.dumps({"event": "bank_restored", "bank": bank_dir.name, "shards": 0}))
                return 0
            bank_dir.mkdir(parents=True, exist_ok=True)
            for f in sorted(got.rglob("*")):
                if f.is_file():
                    dest = bank_dir / f.relative_to(got)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(f), dest)
        n = len(json.loads((bank_dir / "manifest.json").read_text())["shards"])
        log.info(json.dumps({"event": "bank_restored", "bank": bank_dir.name, "shards": n, "from": remote}))
        return n

    def publish_record(self, record_file: str | Path) -> str:
        """Commit the record and its artefacts, with every still-pending shard and the log, in one commit."""
        self.batcher.stop()
        return commit_record(self.api, self.env.results_repo, record_file,
                             extra=self.batcher.flush() + self._log_ops(), on_commit=self._commit)

    def publish_file(self, local: str | Path, rel: str) -> str:
        """Commit one more file of the run (e.g. a calibration run) under ``runs/<run_id>/<rel>``, with the pending."""
        from huggingface_hub import CommitOperationAdd

        self.batcher.stop()
        op = CommitOperationAdd(path_in_repo=f"{self.prefix}/{rel}", path_or_fileobj=str(local))
        return self._commit([*self.batcher.flush(), op, *self._log_ops()], f"{self.env.run_id}: {rel}")

    def upload_log(self, path: str | Path) -> None:
        """Upload the current content of the log file (one commit, retried)."""
        from huggingface_hub import CommitOperationAdd

        op = CommitOperationAdd(path_in_repo=self._remote_log, path_or_fileobj=Path(path).read_bytes())
        self._commit([op], f"{self.env.run_id}: log of attempt {self.env.attempt}")


def _copy_synced(src: Path, dest: Path) -> None:
    """Copy a file and flush it to its storage before returning (a bucket mount uploads on close)."""
    with open(src, "rb") as fi, open(dest, "wb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
        fo.flush()
        os.fsync(fo.fileno())


def commit_record(api: Any, repo: str, record_file: str | Path, *, extra: list[Any] | None = None,
                  on_commit: Callable[[list[Any], str], str] | None = None) -> str:
    """Commit a record and its artefacts (and ``extra`` operations) to ``runs/<run_id>/`` in one commit.

    The artefacts are checked against the record's hashes first, and an existing record is never replaced.
    ``on_commit(ops, message)`` makes the commit (default: ``create_commit`` with retries).
    """
    from huggingface_hub import CommitOperationAdd

    from ..record import read_record, sha256_file

    record_file = Path(record_file)
    rec = read_record(record_file)
    rid = rec["run_id"]
    if with_retry(api.file_exists, repo, record_path(rid), what="file_exists", repo_type="dataset"):
        raise FileExistsError(f"{repo}/{record_path(rid)}: a record exists; records are never overwritten")
    ops = list(extra or [])
    for i, art in enumerate(rec["artefacts"]):
        f = record_file.parent / art["path"]
        if sha256_file(f) != art["sha256"]:
            raise HubSyncError(f"{f}: does not match field artefacts/{i}/sha256 of {record_file}")
        ops.append(CommitOperationAdd(path_in_repo=f"{run_prefix(rid)}/{art['path']}", path_or_fileobj=str(f)))
    ops.append(CommitOperationAdd(path_in_repo=record_path(rid), path_or_fileobj=str(record_file)))
    message = f"{rid}: record ({rec['decision']}) and {len(rec['artefacts'])} artefact(s)" + (
        f" (+{len(extra)} pending file(s))" if extra else "")
    if on_commit is None:
        oid = with_retry(api.create_commit, what="create_commit", repo_id=repo, repo_type="dataset", operations=ops,
                         commit_message=message).oid
    else:
        oid = on_commit(ops, message)
    log.info(json.dumps({"event": "record_uploaded", "path": record_path(rid), "commit": oid}))
    return oid


def run_log_sidecar(sync: HubSync, path: Path, every: float) -> int:
    """Upload ``path`` every ``every`` seconds while it grows, unless the job committed it within the interval;
    once more on SIGTERM. Returns 0."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    last = -1
    mark = commit_mark(path)
    while True:
        stopping = stop.wait(every)
        try:
            size = path.stat().st_size if path.exists() else -1
            recent = mark.exists() and time.time() - mark.stat().st_mtime < every
            if size != last and size >= 0 and (stopping or not recent):
                sync.upload_log(path)
                last = size
        except Exception as exc:  # a failed log upload must not end the sidecar; the next one retries
            log.warning("log upload of %s failed: %s: %s", path, type(exc).__name__, exc)
        if stopping:
            return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m covtoken.hfjobs.hubsync logs --file F [--every S]``: the launcher's log sidecar;
    ``... claim``: print this job's try number (see :meth:`HubSync.claim_try`)."""
    p = argparse.ArgumentParser(prog="python -m covtoken.hfjobs.hubsync", description=main.__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    lg = sub.add_parser("logs", help="upload a log file periodically until SIGTERM")
    lg.add_argument("--file", type=Path, required=True)
    lg.add_argument("--every", type=float, default=None, help="seconds (default COVTOKEN_COMMIT_EVERY_S)")
    sub.add_parser("claim", help="claim this job's try number of its attempt; prints it")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s", stream=sys.stderr)
    env = JobEnv.from_environ()
    if args.command == "claim":
        for name in ("httpx", "httpx2"):
            logging.getLogger(name).setLevel(logging.WARNING)
        print(HubSync(env).claim_try())
        return 0
    return run_log_sidecar(HubSync(env), args.file, args.every or max(env.commit_every_s, SIDECAR_MIN_EVERY_S))


if __name__ == "__main__":
    raise SystemExit(main())
