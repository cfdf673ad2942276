"""Jobs half of the local Hugging Face Hub emulator (see tests/hub_emulator.py).

Jobs run as local subprocesses (own process group, cwd `jobs_dir/<id>/work`):
- repo volumes (model/dataset/space) are copied from the emulator's repo store at the pinned revision and `path`
  subfolder into `jobs_dir/<id>/mounts/<i>` and made read-only by permission bits (not enforced when running as
  root); each mountPath in `command` + `arguments` is rewritten to that folder (whole path components only, also
  after `=`), so scripts should locate their siblings from `__file__` or arguments, not from a literal `/code`;
- `uv run [uv options] X ...` becomes `sys.executable X ...` (dependencies are NOT installed); anything else runs as
  is, with the current interpreter's bin folder first on PATH; `dockerImage`/`spaceId` and `flavor` are ignored;
- the environment is a clean one: a few passthrough variables (PATH, LANG, ...), HOME/HF_HOME/TMPDIR inside the
  job folder, PYTHONUNBUFFERED=1, then the spec's `environment`, then `secrets`, then HF_ENDPOINT = the emulator;
  the test process's own HF_TOKEN does not leak in;
- merged stdout/stderr lines, timestamped, are the job log (memory + `logs.jsonl`), served as SSE with a
  `===== Job started ... =====` marker first, replayed in full on every request, open while the job runs.
Stages: SCHEDULING (`scheduling_delay_s`) -> RUNNING -> COMPLETED | ERROR (`Job failed with exit code: N`, timeout,
failed mount, `kill`) | CANCELED. `attempts` > 1 reruns a failing command (same job, same log, stays RUNNING)
in a fresh `work/` folder, as a new container would start; `kill_attempt` SIGKILLs one attempt so the next runs.
A bucket volume (`type: bucket`) is the emulator's bucket folder itself, mounted read-write (no copy): what a job
writes there is there for the next attempt, the next job and the test, as on the Hub, where a bucket outlives
the containers that mount it (`readOnly: true` mounts a read-only copy instead). Only the standard library is
used. Xet/bucket staging of local scripts, expose/ssh/networks and scheduled jobs are not emulated.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

logger = logging.getLogger("hub_emulator.jobs")

TERMINAL_STAGES = frozenset({"COMPLETED", "CANCELED", "ERROR", "DELETED"})
REDACTED = "<redacted>"
DEFAULT_TIMEOUT_S = 30 * 60  # the Hub's default when no timeoutSeconds is sent
_LABEL_KEY = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9_-]{0,100}$")
# `uv run` options that take a value; other options are flags. Used to drop `uv run [opts]` from a command.
_UV_VALUE_OPTS = {"--with", "--with-requirements", "--with-editable", "--python", "-p", "--index", "--index-url",
                  "--extra-index-url", "--project", "--directory", "--env-file", "--group", "--extra"}
DEFAULT_ENV_PASSTHROUGH = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH", "VIRTUAL_ENV")

# (name, prettyName, vCPU, RAM GB, storage GB, accelerator (model, count, vram GB per GPU) or None, USD per hour).
# cpu-basic/cpu-upgrade/cpu-xl/cpu-performance/t4-* follow the Hub pricing docs quoted in the reference; a100-large
# and h200 use the reference's indicative prices; every other price and size is indicative only.
_FLAVORS: list[tuple[str, str, int, int, int, tuple[str, int, int] | None, float]] = [
    ("cpu-basic", "CPU Basic", 2, 16, 50, None, 0.01),
    ("cpu-upgrade", "CPU Upgrade", 8, 32, 50, None, 0.03),
    ("cpu-performance", "CPU Performance", 32, 256, 500, None, 1.90),
    ("cpu-xl", "CPU XL", 16, 124, 500, None, 1.00),
    ("t4-small", "Nvidia T4 - small", 4, 15, 50, ("T4", 1, 16), 0.40),
    ("t4-medium", "Nvidia T4 - medium", 8, 30, 100, ("T4", 1, 16), 0.60),
    ("l4x1", "1x Nvidia L4", 8, 30, 400, ("L4", 1, 24), 0.80),
    ("l4x4", "4x Nvidia L4", 48, 186, 3200, ("L4", 4, 24), 3.80),
    ("l40sx1", "1x Nvidia L40S", 8, 62, 380, ("L40S", 1, 48), 1.80),
    ("l40sx4", "4x Nvidia L40S", 48, 382, 3200, ("L40S", 4, 48), 8.30),
    ("l40sx8", "8x Nvidia L40S", 192, 1534, 6500, ("L40S", 8, 48), 23.50),
    ("a10g-small", "Nvidia A10G - small", 4, 15, 110, ("A10G", 1, 24), 1.00),
    ("a10g-large", "Nvidia A10G - large", 12, 46, 200, ("A10G", 1, 24), 1.50),
    ("a10g-largex2", "2x Nvidia A10G - large", 24, 92, 1000, ("A10G", 2, 24), 3.00),
    ("a10g-largex4", "4x Nvidia A10G - large", 48, 184, 2000, ("A10G", 4, 24), 5.00),
    ("a100-large", "Nvidia A100 - large", 12, 142, 1000, ("A100", 1, 80), 2.50),
    ("a100x4", "4x Nvidia A100", 48, 568, 4000, ("A100", 4, 80), 10.00),
    ("a100x8", "8x Nvidia A100", 96, 1136, 8000, ("A100", 8, 80), 20.00),
    ("h200", "Nvidia H200", 23, 256, 3000, ("H200", 1, 141), 5.00),
    ("h200x2", "2x Nvidia H200", 46, 512, 6000, ("H200", 2, 141), 10.00),
    ("h200x4", "4x Nvidia H200", 92, 1024, 12000, ("H200", 4, 141), 20.00),
    ("h200x8", "8x Nvidia H200", 184, 2048, 24000, ("H200", 8, 141), 40.00),
    ("rtx-pro-6000", "Nvidia RTX PRO 6000", 12, 96, 1000, ("RTX PRO 6000", 1, 96), 2.00),
    ("rtx-pro-6000x2", "2x Nvidia RTX PRO 6000", 24, 192, 2000, ("RTX PRO 6000", 2, 96), 4.00),
    ("rtx-pro-6000x4", "4x Nvidia RTX PRO 6000", 48, 384, 4000, ("RTX PRO 6000", 4, 96), 8.00),
    ("rtx-pro-6000x8", "8x Nvidia RTX PRO 6000", 96, 768, 8000, ("RTX PRO 6000", 8, 96), 16.00),
]


def hardware_list() -> list[dict[str, Any]]:
    """The `GET /api/jobs/hardware` payload: one entry per flavor, priced per minute like the Hub."""
    out = []
    for name, pretty, cpu, ram, disk, acc, per_hour in _FLAVORS:
        micro = round(per_hour / 60 * 1e6)
        out.append({"name": name, "prettyName": pretty, "cpu": f"{cpu} vCPU", "ram": f"{ram} GB",
                    "ephemeralStorage": f"{disk} GB",
                    "accelerator": None if acc is None else {
                        "type": "gpu", "model": acc[0], "quantity": str(acc[1]), "vram": f"{acc[1] * acc[2]} GB",
                        "manufacturer": "Nvidia"},
                    "unitCostMicroUSD": micro, "unitCostUSD": micro / 1e6, "unitLabel": "minute"})
    return out


def iso(ts: float | None) -> str | None:
    """Hub-style UTC timestamp with milliseconds and the trailing `Z` the client requires."""
    if ts is None:
        return None
    dt = datetime.fromtimestamp(ts, timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


class HubHTTPError(Exception):
    """An HTTP error reply; `error_code` goes to `X-Error-Code` (e.g. RepoNotFound, EntryNotFound)."""

    def __init__(self, status: int, message: str, error_code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code
        self.headers = dict(headers or {})


@dataclass
class Reply:
    """A response: JSON-able or bytes `body`, or a `stream` of already-encoded chunks (sent chunked)."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    stream: Iterator[bytes] | None = None
    content_type: str = "application/json"


class _SetupError(Exception):
    """A job could not be started (volume missing...); the job ends in ERROR with this message."""


@dataclass
class Job:
    """Server-side state of one job. `spec` keeps the secrets; they are never echoed back."""

    id: str
    namespace: str
    owner: dict[str, str]
    spec: dict[str, Any]
    initiator: dict[str, Any]
    dir: Path
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    stage: str = "SCHEDULING"
    message: str | None = None
    logs: list[tuple[str, str]] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    cancel_requested: bool = False
    kill_message: str | None = None
    timed_out: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)


class JobManager:
    """Runs, tracks and streams emulated jobs. All state changes go through `job.cond` and wake SSE readers."""

    def __init__(self, jobs_dir: Path, *, endpoint: str, materialise: Callable[[dict, Path], None],
                 scheduling_delay_s: float = 0.2, keepalive_s: float = 30.0, kill_grace_s: float = 1.0,
                 env_passthrough: tuple[str, ...] = DEFAULT_ENV_PASSTHROUGH,
                 bucket_dir: Callable[[str], Path] | None = None) -> None:
        self.jobs_dir, self.endpoint, self.materialise = jobs_dir, endpoint, materialise
        self.bucket_dir = bucket_dir  # bucket id -> its live folder (HubHTTPError 404 when there is none)
        self.scheduling_delay_s, self.keepalive_s, self.kill_grace_s = scheduling_delay_s, keepalive_s, kill_grace_s
        self.env_passthrough = env_passthrough
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._flavors = {h["name"]: h for h in hardware_list()}

    # ----------------------------------------------------------------- lifecycle
    def submit(self, namespace: str, owner: dict[str, str], spec: dict[str, Any],
               initiator: dict[str, Any] | None = None) -> Job:
        """Validate a job spec, store it and start its runner thread."""
        if not isinstance(spec.get("command"), list) or not spec["command"]:
            raise HubHTTPError(400, "`command` must be a non-empty list of strings")
        if spec.get("flavor", "cpu-basic") not in self._flavors:
            raise HubHTTPError(400, f"Invalid flavor {spec.get('flavor')!r}")
        _validate_labels(spec.get("labels") or {})
        for vol in spec.get("volumes") or []:
            if vol.get("type") not in ("model", "dataset", "space", "bucket"):
                raise HubHTTPError(400, f"Volume type {vol.get('type')!r} is not supported by the emulator")
            if not str(vol.get("mountPath", "")).startswith("/"):
                raise HubHTTPError(400, "Volume mountPath must be absolute")
        job_id = f"{int(time.time()):08x}{uuid.uuid4().hex[:16]}"
        job = Job(id=job_id, namespace=namespace, owner=owner, spec=dict(spec), dir=self.jobs_dir / job_id,
                  initiator=initiator or {"type": owner["type"], "id": owner["id"], "name": owner["name"]})
        for sub in ("work", "home", "tmp", "mounts"):
            (job.dir / sub).mkdir(parents=True)
        public = {k: v for k, v in spec.items() if k != "secrets"}
        public["secrets"] = sorted(spec.get("secrets") or {})
        (job.dir / "spec.json").write_text(json.dumps(public, indent=2))
        with self._lock:
            self.jobs[job_id] = job
        self._write_status(job)
        threading.Thread(target=self._run, args=(job,), name=f"job-{job_id}", daemon=True).start()
        logger.info("job %s submitted: %s", job_id, spec["command"])
        return job

    def get(self, namespace: str, job_id: str) -> Job:
        """Look a job up in its namespace (404 otherwise)."""
        job = self.jobs.get(job_id)
        if job is None or job.namespace != namespace:
            raise HubHTTPError(404, f"Job {job_id} not found")
        return job

    def cancel(self, job: Job) -> None:
        """Cancel: SIGTERM the process group, SIGKILL after the grace period; no-op on a terminal job."""
        with job.cond:
            if job.stage in TERMINAL_STAGES:
                return
            job.cancel_requested = True
            if job.proc is None:
                self._finish(job, "CANCELED", None)
                return
            proc = job.proc
        _killpg(proc, signal.SIGTERM)
        threading.Timer(self.kill_grace_s, _killpg, args=(proc, signal.SIGKILL)).start()

    def kill(self, job_id: str, message: str, wait_s: float = 10.0) -> Job:
        """Test helper: SIGKILL a job's process group abruptly and mark it ERROR with `message`."""
        job = self.jobs[job_id]
        with job.cond:
            if job.stage in TERMINAL_STAGES:
                return job
            job.kill_message = message
            if job.proc is None:
                self._finish(job, "ERROR", message)
                return job
            proc = job.proc
        _killpg(proc, signal.SIGKILL)
        self.wait(job_id, wait_s)
        return job

    def kill_attempt(self, job_id: str) -> None:
        """Test helper: SIGKILL the running attempt of a job (a node failure); with attempts left it reruns."""
        job = self.jobs[job_id]
        with job.cond:
            proc = job.proc
        if proc is not None:
            _killpg(proc, signal.SIGKILL)

    def wait(self, job_id: str, timeout: float) -> Job:
        """Block until the job is terminal (TimeoutError otherwise)."""
        job = self.jobs[job_id]
        deadline = time.monotonic() + timeout
        with job.cond:
            while job.stage not in TERMINAL_STAGES:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {job_id} still {job.stage} after {timeout}s")
                job.cond.wait(left)
        return job

    def shutdown(self) -> None:
        """Kill every live job (used when the emulator stops) and make mounted folders writable again."""
        self._stopping.set()
        for job in list(self.jobs.values()):
            with job.cond:
                job.cond.notify_all()
                proc = job.proc if job.stage not in TERMINAL_STAGES else None
                if proc is not None:
                    job.kill_message = "Emulator stopped"
            if proc is not None:
                _killpg(proc, signal.SIGKILL)
        for job in list(self.jobs.values()):
            _make_writable(job.dir / "mounts")

    # ------------------------------------------------------------------- runner
    def _run(self, job: Job) -> None:
        try:
            with job.cond:
                job.cond.wait_for(lambda: job.cancel_requested or self._stopping.is_set(), self.scheduling_delay_s)
            argv, env = self._prepare(job)
        except _SetupError as err:
            with job.cond:
                if job.stage not in TERMINAL_STAGES:
                    self._finish(job, "ERROR", str(err))
            return
        attempts = max(1, int(job.spec.get("attempts") or 1))
        timeout = float(job.spec.get("timeoutSeconds") or DEFAULT_TIMEOUT_S)
        rc = None
        for attempt in range(attempts):
            rc = self._run_once(job, argv, env, timeout)
            if rc is None:  # canceled before start
                return
            if rc == 0 or job.cancel_requested or job.kill_message or job.timed_out or attempt + 1 == attempts:
                break
            self._append_log(job, f"===== Job started again (attempt {attempt + 2}/{attempts}) =====")
            _make_writable(job.dir / "work")  # a retry starts in a fresh container: nothing on disk survives
            shutil.rmtree(job.dir / "work", ignore_errors=True)
            (job.dir / "work").mkdir()
        with job.cond:
            if job.kill_message:
                self._finish(job, "ERROR", job.kill_message)
            elif job.cancel_requested:
                self._finish(job, "CANCELED", None)
            elif job.timed_out:
                self._finish(job, "ERROR", f"Job timed out after {int(timeout)} seconds (timeoutSeconds)")
            elif rc == 0:
                self._finish(job, "COMPLETED", None)
            else:
                self._finish(job, "ERROR", f"Job failed with exit code: {rc}")

    def _prepare(self, job: Job) -> tuple[list[str], dict[str, str]]:
        mounts: list[tuple[str, Path]] = []
        for i, vol in enumerate(job.spec.get("volumes") or []):
            dest = job.dir / "mounts" / str(i)
            try:
                if vol.get("type") == "bucket" and not vol.get("readOnly"):
                    if self.bucket_dir is None:
                        raise HubHTTPError(400, "buckets are not served by this emulator")
                    dest = self.bucket_dir(vol["source"])  # the live folder, read-write, shared by every attempt
                    sub = (vol.get("path") or "").strip("/")
                    if sub:
                        dest = dest / sub
                        dest.mkdir(parents=True, exist_ok=True)
                    mounts.append((vol["mountPath"].rstrip("/") or "/", dest))
                    continue
                if vol.get("type") == "bucket":
                    if self.bucket_dir is None:
                        raise HubHTTPError(400, "buckets are not served by this emulator")
                    src = self.bucket_dir(vol["source"]) / (vol.get("path") or "").strip("/")
                    shutil.copytree(src, dest, dirs_exist_ok=True)
                else:
                    self.materialise(vol, dest)
            except HubHTTPError as err:
                raise _SetupError(f"Failed to mount volume {vol.get('source')} at {vol.get('mountPath')}: "
                                  f"{err.message}") from err
            _make_read_only(dest)
            mounts.append((vol["mountPath"].rstrip("/") or "/", dest))
        argv = _strip_uv_run([str(a) for a in job.spec["command"]]) + [str(a) for a in job.spec.get("arguments") or []]
        for mount, dest in sorted(mounts, key=lambda m: -len(m[0])):
            pattern = re.compile(r"(?<![\w.\-/])" + re.escape(mount) + r"(?=/|$|[^\w.\-])")
            argv = [pattern.sub(lambda _m, d=str(dest): d, a) for a in argv]
        env = {k: os.environ[k] for k in self.env_passthrough if k in os.environ}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
        env.update(HOME=str(job.dir / "home"), HF_HOME=str(job.dir / "home" / ".cache" / "huggingface"),
                   TMPDIR=str(job.dir / "tmp"), PYTHONUNBUFFERED="1", HF_HUB_DISABLE_TELEMETRY="1")
        env.update({str(k): str(v) for k, v in (job.spec.get("environment") or {}).items()})
        env.update({str(k): str(v) for k, v in (job.spec.get("secrets") or {}).items()})
        if env.get("HF_ENDPOINT", self.endpoint) != self.endpoint:
            logger.warning("job %s: HF_ENDPOINT=%s overridden by the emulator", job.id, env["HF_ENDPOINT"])
        env["HF_ENDPOINT"] = self.endpoint
        return argv, env

    def _run_once(self, job: Job, argv: list[str], env: dict[str, str], timeout: float) -> int | None:
        with job.cond:
            if job.cancel_requested or job.stage in TERMINAL_STAGES:
                return None
            try:
                proc = subprocess.Popen(argv, cwd=job.dir / "work", env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as err:
                proc = None
                start_error = f"exec {argv[0]}: {err}"
            job.proc = proc
            if job.started is None:
                job.started = time.time()
                job.stage = "RUNNING"
                self._write_status(job)
                self._append_log(job, f"===== Job started at {iso(job.started)} =====")
        if proc is None:
            self._append_log(job, start_error)
            return 127
        reader = threading.Thread(target=self._pump, args=(job, proc.stdout), daemon=True)
        reader.start()
        deadline = job.started + timeout
        while True:
            try:
                rc = proc.wait(timeout=max(0.01, min(0.2, deadline - time.time())))
                break
            except subprocess.TimeoutExpired:
                if time.time() >= deadline and not job.timed_out:
                    job.timed_out = True
                    self._append_log(job, f"Job exceeded its timeout of {int(timeout)}s: killing it")
                    _killpg(proc, signal.SIGKILL)
        reader.join(timeout=5)
        return 128 - rc if rc < 0 else rc  # killed by signal N -> 128+N, like a container runtime

    def _pump(self, job: Job, stream: Any) -> None:
        with stream:
            for raw in iter(stream.readline, b""):
                self._append_log(job, raw.decode("utf-8", "replace").rstrip("\r\n"))

    def _append_log(self, job: Job, line: str) -> None:
        with job.cond:
            entry = (iso(time.time()), line)
            job.logs.append(entry)
            with open(job.dir / "logs.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"timestamp": entry[0], "data": line}) + "\n")
            job.cond.notify_all()

    def _finish(self, job: Job, stage: str, message: str | None) -> None:
        """Set a terminal stage (caller holds job.cond)."""
        job.stage, job.message, job.finished = stage, message, time.time()
        self._write_status(job)
        job.cond.notify_all()
        logger.info("job %s -> %s %s", job.id, stage, message or "")

    def _write_status(self, job: Job) -> None:
        (job.dir / "status.json").write_text(json.dumps(self.info(job)["status"]))

    # ------------------------------------------------------------------ views
    def info(self, job: Job) -> dict[str, Any]:
        """The JobInfo payload; secrets come back as their names with redacted values."""
        spec, now = job.spec, time.time()
        end = job.finished or now
        out: dict[str, Any] = {
            "id": job.id, "createdAt": iso(job.created), "command": spec["command"],
            "arguments": spec.get("arguments") or [], "environment": spec.get("environment") or {},
            "secrets": {k: REDACTED for k in spec.get("secrets") or {}}, "flavor": spec.get("flavor", "cpu-basic"),
            "labels": spec.get("labels") or {}, "status": {"stage": job.stage, "message": job.message},
            "durations": {"schedulingSecs": int((job.started or end) - job.created),
                          "runningSecs": None if job.started is None else int(end - job.started),
                          "totalSecs": int(end - job.created)},
            "owner": job.owner, "initiator": job.initiator}
        for key in ("volumes", "expose", "network"):
            if spec.get(key):
                out[key] = spec[key]
        if job.started:
            out["startedAt"] = iso(job.started)
        if job.finished:
            out["finishedAt"] = iso(job.finished)
        out["spaceId" if "spaceId" in spec else "dockerImage"] = spec.get("spaceId") or spec.get("dockerImage")
        if spec.get("attempts") is not None:
            out["retry"] = int(spec["attempts"]) - 1
        return out

    def log_stream(self, job: Job, tail: int | None) -> Iterator[bytes]:
        """SSE log replay from the start (or the last `tail` lines), live while running, ends once terminal."""
        with job.cond:
            idx = max(0, len(job.logs) - tail) if tail is not None else 0
        last_sent = time.monotonic()
        while not self._stopping.is_set():
            with job.cond:
                pending, idx = job.logs[idx:], len(job.logs)
                done = job.stage in TERMINAL_STAGES
                if not pending and not done:
                    job.cond.wait(timeout=min(1.0, self.keepalive_s))
            if pending:
                yield b"".join(f"data: {json.dumps({'data': text, 'timestamp': ts})}\n\n".encode()
                               for ts, text in pending)
                last_sent = time.monotonic()
            elif done:
                return
            elif time.monotonic() - last_sent >= self.keepalive_s:
                yield b": keep-alive\n\n"
                last_sent = time.monotonic()

    def metrics_stream(self, job: Job) -> Iterator[bytes]:
        """One `event: metric` per second while running (CPU/RSS of the job's main process from /proc)."""
        ram = self._flavors.get(job.spec.get("flavor", "cpu-basic"), {}).get("ram", "16 GB")
        total = int(ram.split()[0]) * 1024 ** 3
        prev: tuple[float, float] | None = None
        while not self._stopping.is_set():
            with job.cond:
                if job.stage in TERMINAL_STAGES:
                    return
                proc = job.proc
                if proc is None:
                    job.cond.wait(0.5)
                    continue
            cpu_s, rss = _proc_usage(proc.pid)
            now = time.monotonic()
            pct = 0.0 if prev is None else max(0.0, (cpu_s - prev[1]) / max(now - prev[0], 1e-6) * 100)
            prev = (now, cpu_s)
            sample = {"cpu_usage_pct": round(pct, 1), "cpu_millicores": int(pct * 10), "memory_used_bytes": rss,
                      "memory_total_bytes": total, "rx_bps": 0, "tx_bps": 0, "gpus": {}, "replica": job.id[-5:]}
            yield f"event: metric\ndata: {json.dumps(sample)}\n\n".encode()
            with job.cond:
                job.cond.wait_for(lambda: job.stage in TERMINAL_STAGES, 1.0)

    def logs(self, job_id: str) -> list[str]:
        """Log lines of a job as the client yields them (start markers dropped)."""
        return [t for _, t in self.jobs[job_id].logs if not t.startswith("===== Job started")]


def route_jobs(mgr: JobManager, method: str, segs: list[str], query: dict[str, list[str]], body: bytes,
               owner_for: Callable[[str], dict[str, str]]) -> Reply:
    """Dispatch `/api/jobs/...` (segments after `jobs`)."""
    if segs == ["hardware"] and method == "GET":
        return Reply(body=hardware_list())
    if not segs:
        raise HubHTTPError(404, "Not found")
    ns, rest = segs[0], segs[1:]
    owner = owner_for(ns)
    if not rest:
        if method == "POST":
            return Reply(body=mgr.info(mgr.submit(ns, owner, json_body(body))))
        if method == "GET":
            stages = {s.upper() for s in query.get("stage", [])}
            wanted = [tuple(lab.split("=", 1)) if "=" in lab else (lab, None) for lab in query.get("label", [])]
            jobs = [j for j in list(mgr.jobs.values()) if j.namespace == ns and (not stages or j.stage in stages)
                    and all(k in (j.spec.get("labels") or {}) and (v is None or j.spec["labels"][k] == v)
                            for k, v in wanted)]
            return Reply(body=[mgr.info(j) for j in sorted(jobs, key=lambda j: j.created)])
        raise HubHTTPError(405, "Method not allowed")
    job = mgr.get(ns, rest[0])
    action = rest[1] if len(rest) > 1 else None
    if action is None and method == "GET":
        return Reply(body=mgr.info(job))
    if action == "cancel" and method == "POST":
        mgr.cancel(job)
        return Reply(body={})
    if action == "duplicate" and method == "POST":
        new = mgr.submit(ns, owner, job.spec, initiator={"type": "duplicated-job", "id": job.id})
        return Reply(body=mgr.info(new))
    if action == "labels" and method == "PUT":
        labels = json_body(body).get("labels") or {}
        _validate_labels(labels)
        with job.cond:
            job.spec["labels"] = dict(labels)
        return Reply(body=mgr.info(job))
    if action == "logs" and method == "GET":
        tail = int(query["tail"][0]) if query.get("tail") else None
        return Reply(stream=mgr.log_stream(job, tail), content_type="text/event-stream",
                     headers={"Cache-Control": "no-cache"})
    if action == "metrics" and method == "GET":
        if job.stage in TERMINAL_STAGES:
            raise HubHTTPError(406, f"Job {job.id} is not running anymore")
        return Reply(stream=mgr.metrics_stream(job), content_type="text/event-stream")
    raise HubHTTPError(404, f"Unknown jobs route {method} {'/'.join(segs)}")


def json_body(body: bytes) -> dict[str, Any]:
    """Parse a JSON object request body (400 otherwise)."""
    try:
        data = json.loads(body or b"{}")
    except ValueError as err:
        raise HubHTTPError(400, f"Invalid JSON body: {err}") from err
    if not isinstance(data, dict):
        raise HubHTTPError(400, "JSON body must be an object")
    return data


def _validate_labels(labels: dict[str, Any]) -> None:
    for key, value in labels.items():
        if not _LABEL_KEY.match(str(key)) or not _LABEL_VALUE.match(str(value)):
            raise HubHTTPError(400, f"Invalid label {key}={value}: keys and values must match [A-Za-z0-9_-]{{,100}}")


def _strip_uv_run(argv: list[str]) -> list[str]:
    """`uv run [uv options] X ...` -> `sys.executable X ...` (dependencies are not installed)."""
    if argv[:2] != ["uv", "run"]:
        return argv
    i = 2
    while i < len(argv) and argv[i].startswith("-"):
        i += 1 if "=" in argv[i] or argv[i] not in _UV_VALUE_OPTS else 2
    rest = argv[i:]
    if rest and rest[0] in ("python", "python3"):
        rest = rest[1:]
    return [sys.executable, *rest]


def _killpg(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:  # never signal a group whose leader is gone (its id could be reused)
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _proc_usage(pid: int) -> tuple[float, int]:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks, rss_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0.0, 0


def _make_read_only(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o444)
        os.chmod(dirpath, 0o555)


def _make_writable(root: Path) -> None:
    if not root.exists():
        return
    os.chmod(root, 0o755)
    for dirpath, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o644)
