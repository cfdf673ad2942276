"""Inside an HF Job: put results into ``runs/<run_id>/`` of the results dataset repo as they are made.

Layout of a run folder in the results repo (the same names are used by submit, fetch and resume)::

    runs/<run_id>/code/                  the code bundle the job ran (mounted read-only at /code)
    runs/<run_id>/attempts/<n>.json      the job spec of attempt n (secret names only) and its job id
    runs/<run_id>/bank/<bank>/           token-bank manifest and finished shards, one commit per shard
    runs/<run_id>/logs/attempt-<n>.log   the job's log, uploaded every COVTOKEN_LOG_EVERY_S seconds and at the end
    runs/<run_id>/<run_id>.json          the gate record, committed last together with
    runs/<run_id>/artefacts/<run_id>/    its artefacts (a results folder, as ``covtoken fetch`` expects)

:class:`Run` (runner.py) creates a :class:`HubSync` when ``COVTOKEN_BACKEND=hf-jobs``; the launcher runs
``python -m covtoken.hubsync logs --file F`` beside the job for the log. The job finds its own job id by its
labels (``run``, ``attempt``), never from a platform variable. The HF token comes from the job secret
``HF_TOKEN`` and is read by ``huggingface_hub`` itself; nothing here writes it anywhere.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["HubSyncError", "JobEnv", "HubSync", "run_prefix", "record_path", "attempt_path", "log_path",
           "hardware_summary", "commit_record", "main"]

log = logging.getLogger(__name__)
DEFAULT_LOG_EVERY_S = 120.0
MOUNT = "/code"


class HubSyncError(RuntimeError):
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


def log_path(run_id: str, attempt: int) -> str:
    """The uploaded log of one attempt."""
    return f"{run_prefix(run_id)}/logs/attempt-{attempt}.log"


def hardware_summary(hw: Any) -> dict:
    """A ``JobHardwareInfo`` as a plain dict, with the price per hour derived from its unit."""
    per_hour = {"second": 3600.0, "minute": 60.0, "hour": 1.0}.get(str(hw.unit_label).lower())
    if per_hour is None:
        raise HubSyncError(f"hardware {hw.name}: unknown price unit {hw.unit_label!r}")
    acc = hw.accelerator
    return {"name": hw.name, "pretty_name": hw.pretty_name, "cpu": hw.cpu, "ram": hw.ram,
            "accelerator": None if acc is None else {"model": acc.model, "quantity": acc.quantity, "vram": acc.vram,
                                                      "manufacturer": acc.manufacturer},
            "unit_cost_usd": hw.unit_cost_usd, "unit_label": hw.unit_label,
            "usd_per_hour": round(hw.unit_cost_usd * per_hour, 6)}


@dataclass(frozen=True)
class JobEnv:
    """What ``covtoken submit`` puts in the job's environment (public values only; the token is a secret)."""

    run_id: str
    results_repo: str
    namespace: str
    attempt: int
    timeout_s: int | None
    log_every_s: float
    kit_dir: Path | None

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
            every = float(env.get("COVTOKEN_LOG_EVERY_S") or DEFAULT_LOG_EVERY_S)
        except ValueError as exc:
            raise HubSyncError(f"COVTOKEN_ATTEMPT / COVTOKEN_TIMEOUT_S / COVTOKEN_LOG_EVERY_S: {exc}") from None
        kit = env.get("COVTOKEN_KIT_DIR")
        return cls(run_id=env["COVTOKEN_RUN_ID"], results_repo=env["COVTOKEN_RESULTS_REPO"],
                   namespace=env["COVTOKEN_JOB_NAMESPACE"], attempt=attempt, timeout_s=timeout, log_every_s=every,
                   kit_dir=Path(kit) if kit else None)


class HubSync:
    """Uploads of one run, from inside its job.

    Args:
        env: the job's :class:`JobEnv`.
        api: an ``HfApi`` (default: a new one; the token comes from the ``HF_TOKEN`` secret).
    """

    def __init__(self, env: JobEnv, api: Any = None) -> None:
        from huggingface_hub import HfApi

        self.env = env
        self.api = api or HfApi()
        self.prefix = run_prefix(env.run_id)
        self._job: Any = None

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
        return cls(env)

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
            jobs = list(self.api.list_jobs(labels=labels, namespace=self.env.namespace))
            if len(jobs) != 1:
                raise HubSyncError(f"expected one job labelled {labels} in namespace {self.env.namespace}, "
                                   f"found {[j.id for j in jobs]}")
            self._job = jobs[0]
        return self._job

    def backend(self) -> dict:
        """The record's ``provenance.backend``: job id, flavor, image, hardware, bundle, results repo."""
        job = self.job_info()
        hw = next((h for h in self.api.list_jobs_hardware() if h.name == str(job.flavor)), None)
        vol = next((v for v in job.volumes or [] if v.mount_path == MOUNT), None)
        return {"name": "hf-jobs", "job_id": job.id, "namespace": self.env.namespace, "url": job.url,
                "flavor": str(job.flavor), "image": job.docker_image or job.space_id,
                "timeout_s": self.env.timeout_s, "attempt": self.env.attempt, "results_repo": self.env.results_repo,
                "run_folder": self.prefix,
                "bundle": None if vol is None else {"repo": vol.source, "path": vol.path, "revision": vol.revision},
                "hardware": None if hw is None else hardware_summary(hw)}

    # ------------------------------------------------------------------ uploads
    def _commit(self, ops: list[Any], message: str) -> str:
        info = self.api.create_commit(repo_id=self.env.results_repo, repo_type="dataset", operations=ops,
                                      commit_message=message)
        return info.oid

    def bank_uploader(self, bank_dir: str | Path) -> Callable[[Path], None]:
        """``on_shard`` for :meth:`TokenBank.build`: commits each finished shard with the manifest."""
        from huggingface_hub import CommitOperationAdd

        bank_dir = Path(bank_dir)
        remote = f"{self.prefix}/bank/{bank_dir.name}"

        def upload(shard_dir: Path) -> None:
            files = sorted(f for f in Path(shard_dir).iterdir() if f.is_file() and not f.name.startswith("."))
            ops = [CommitOperationAdd(path_in_repo=f"{remote}/{shard_dir.name}/{f.name}", path_or_fileobj=str(f))
                   for f in files]
            ops.append(CommitOperationAdd(path_in_repo=f"{remote}/manifest.json",
                                          path_or_fileobj=(bank_dir / "manifest.json").read_bytes()))
            oid = self._commit(ops, f"{self.env.run_id}: token-bank {bank_dir.name} {shard_dir.name}")
            log.info(json.dumps({"event": "shard_uploaded", "shard": shard_dir.name, "files": len(files),
                                 "commit": oid}))

        return upload

    def restore_bank(self, bank_dir: str | Path) -> int:
        """Download the shards an earlier attempt uploaded into ``bank_dir``; returns how many shards.

        The bank verifies every shard against its manifest hashes when it is built.
        """
        from huggingface_hub import snapshot_download

        bank_dir = Path(bank_dir)
        if (bank_dir / "manifest.json").exists():
            return 0
        remote = f"{self.prefix}/bank/{bank_dir.name}"
        bank_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=bank_dir.parent, prefix=".restore-") as tmp:
            snapshot_download(self.env.results_repo, repo_type="dataset", allow_patterns=[f"{remote}/**"],
                              local_dir=tmp)
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
        """Commit the record and its artefacts in one commit, after everything else; never overwrites."""
        return commit_record(self.api, self.env.results_repo, record_file)

    def publish_file(self, local: str | Path, rel: str) -> str:
        """Commit one more file of the run (e.g. a calibration run) under ``runs/<run_id>/<rel>``."""
        from huggingface_hub import CommitOperationAdd

        op = CommitOperationAdd(path_in_repo=f"{self.prefix}/{rel}", path_or_fileobj=str(local))
        return self._commit([op], f"{self.env.run_id}: {rel}")

    def upload_log(self, path: str | Path) -> None:
        """Upload the current content of the log file."""
        data = Path(path).read_bytes()
        self.api.upload_file(path_or_fileobj=data, path_in_repo=log_path(self.env.run_id, self.env.attempt),
                             repo_id=self.env.results_repo, repo_type="dataset",
                             commit_message=f"{self.env.run_id}: log of attempt {self.env.attempt}")


def commit_record(api: Any, repo: str, record_file: str | Path) -> str:
    """Commit a record and its artefacts to ``runs/<run_id>/`` of ``repo`` in one commit; returns its oid.

    The artefacts are checked against the record's hashes first, and an existing record is never replaced.
    """
    from huggingface_hub import CommitOperationAdd

    from .record import read_record, sha256_file

    record_file = Path(record_file)
    rec = read_record(record_file)
    rid = rec["run_id"]
    if api.file_exists(repo, record_path(rid), repo_type="dataset"):
        raise FileExistsError(f"{repo}/{record_path(rid)}: a record exists; records are never overwritten")
    ops = []
    for i, art in enumerate(rec["artefacts"]):
        f = record_file.parent / art["path"]
        if sha256_file(f) != art["sha256"]:
            raise HubSyncError(f"{f}: does not match field artefacts/{i}/sha256 of {record_file}")
        ops.append(CommitOperationAdd(path_in_repo=f"{run_prefix(rid)}/{art['path']}", path_or_fileobj=str(f)))
    ops.append(CommitOperationAdd(path_in_repo=record_path(rid), path_or_fileobj=str(record_file)))
    oid = api.create_commit(repo_id=repo, repo_type="dataset", operations=ops,
                            commit_message=f"{rid}: record ({rec['decision']}) and {len(ops) - 1} artefact(s)").oid
    log.info(json.dumps({"event": "record_uploaded", "path": record_path(rid), "commit": oid}))
    return oid


def run_log_sidecar(sync: HubSync, path: Path, every: float) -> int:
    """Upload ``path`` every ``every`` seconds while it grows, and once more on SIGTERM; returns 0."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    last = -1
    while True:
        stopping = stop.wait(every)
        try:
            size = path.stat().st_size if path.exists() else -1
            if size != last and size >= 0:
                sync.upload_log(path)
                last = size
        except Exception as exc:  # a failed log upload must not end the sidecar; the next one retries
            log.warning("log upload of %s failed: %s: %s", path, type(exc).__name__, exc)
        if stopping:
            return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m covtoken.hubsync logs --file F [--every S]``: the launcher's log sidecar."""
    p = argparse.ArgumentParser(prog="python -m covtoken.hubsync", description=main.__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    lg = sub.add_parser("logs", help="upload a log file periodically until SIGTERM")
    lg.add_argument("--file", type=Path, required=True)
    lg.add_argument("--every", type=float, default=None, help="seconds (default COVTOKEN_LOG_EVERY_S)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s", stream=sys.stderr)
    env = JobEnv.from_environ()
    return run_log_sidecar(HubSync(env), args.file, args.every or env.log_every_s)


if __name__ == "__main__":
    raise SystemExit(main())
