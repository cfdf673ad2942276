"""What an HF Job of the kit is made of: the request ``run_job`` gets, its labels, its timeout, its spec.

``JobRequest`` is the single description of one attempt of one run; ``submit`` sends it with ``run_job``,
``--dry-run`` prints it as the JSON spec and as the equivalent ``hf jobs run`` command line, and the attempt
file ``runs/<run_id>/attempts/<n>.json`` stores it (secret names only) so that ``--resume`` can start the next
attempt on the same bundle with the same arguments. The JSON spec is built here (:meth:`JobRequest.spec`)
from public pieces only (``Volume.to_dict``); tests hold it equal to what the Hub receives from ``run_job``
and from the printed ``hf jobs run`` line.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import HFJobsError

__all__ = ["JobRequest", "make_request", "parse_duration", "parse_timeout", "label_value", "job_gate", "MOUNT",
           "STATE_MOUNT", "STATE_FLAG", "parse_bucket",
           "DEFAULT_FLAVOR", "DEFAULT_TIMEOUT", "RESERVED_LABELS", "RESERVED_ENV"]

MOUNT = "/code"
#: Where an optional read-write bucket volume (``--bucket``) is mounted; the job keeps its bulky intermediate
#: state (token-bank shards, checkpoints) under ``<STATE_MOUNT>/runs/<run_id>/`` as it is produced.
STATE_MOUNT = "/state"
#: The launcher option that tells it where the bucket is mounted (first in the command, before the job's args;
#: an argument, not an env value, so that a mount the emulator relocates is relocated here too).
STATE_FLAG = "--covtoken-state"
_BUCKET = re.compile(r"^(?:hf://buckets/)?([A-Za-z0-9][A-Za-z0-9._-]{0,95})/([A-Za-z0-9][A-Za-z0-9._-]{0,95})/?$")
DEFAULT_FLAVOR = "cpu-basic"
DEFAULT_TIMEOUT = "1h"
DEFAULT_COMMIT_EVERY_S = 300.0
_LABEL_OK = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
RESERVED_LABELS = ("app", "gate", "run", "attempt", "code")
RESERVED_ENV = ("COVTOKEN_BACKEND", "COVTOKEN_RUN_ID", "COVTOKEN_RESULTS_REPO", "COVTOKEN_JOB_NAMESPACE",
                "COVTOKEN_ATTEMPT", "COVTOKEN_TIMEOUT_S", "COVTOKEN_COMMIT_EVERY_S", "COVTOKEN_IMAGE",
                "COVTOKEN_STATE_BUCKET", "COVTOKEN_STATE_DIR", "COVTOKEN_TRY")


def parse_duration(text: str | int | float, flag: str = "--timeout", *, allow_zero: bool = False) -> int:
    """``90``, ``90s``, ``30m``, ``2h``, ``1d`` -> seconds (the ``hf jobs --timeout`` grammar), for every flag."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not m or (float(m.group(1)) <= 0 and not allow_zero):
        raise HFJobsError(f"{flag} {text!r}: expected a positive number with an optional s/m/h/d suffix "
                          "(e.g. 90, 30m, 2h)")
    return int(float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)])


parse_timeout = parse_duration


def parse_bucket(text: str, flag: str = "--bucket") -> str:
    """``NS/NAME`` or ``hf://buckets/NS/NAME`` -> ``NS/NAME`` (a bucket id as ``create_bucket`` takes it)."""
    m = _BUCKET.fullmatch(str(text).strip())
    if not m or ".." in m.group(0):
        raise HFJobsError(f"{flag} {text!r}: expected <namespace>/<bucket name> or hf://buckets/<namespace>/<name>")
    return f"{m.group(1)}/{m.group(2)}"


def label_value(value: str) -> str:
    """A label value the Jobs API accepts: ``[A-Za-z0-9_-]``, at most 100 characters."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", str(value))[:100] or "-"


def job_gate(job: str) -> str:
    """``jobs/g1_lesion_subspace.py`` -> ``G1``."""
    stem = Path(job).stem.split("_", 1)[0].upper()
    if not re.fullmatch(r"G[0-9]+[A-Z]?", stem):
        raise HFJobsError(f"{job}: job scripts are named g<N>_<name>.py")
    return stem


@dataclass(frozen=True)
class JobRequest:
    """Everything ``run_job`` receives for one attempt of one run, except secret values.

    ``volume`` is the ``/code`` mount without its revision; the revision is the commit of the bundle upload.
    """

    run_id: str
    attempt: int
    namespace: str
    results_repo: str
    image: str
    flavor: str
    timeout_s: int
    job: str
    job_args: tuple[str, ...]
    attempts: int = 1
    env: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    secret_names: tuple[str, ...] = ("HF_TOKEN",)
    state_bucket: str | None = None

    @property
    def command(self) -> list[str]:
        state = [STATE_FLAG, STATE_MOUNT] if self.state_bucket else []
        return ["python", f"{MOUNT}/launch.py", *state, *self.job_args]

    def volume(self, revision: str | None) -> Any:
        from huggingface_hub import Volume

        return Volume(type="dataset", source=self.results_repo, mount_path=MOUNT, revision=revision,
                      read_only=True, path=f"runs/{self.run_id}/code")

    def volumes(self, revision: str | None) -> list[Any]:
        """The read-only code volume, then the read-write state bucket when there is one (buckets are
        read-write by default; ``readOnly`` is left out so that the ``hf jobs run -v`` form posts the same)."""
        from huggingface_hub import Volume

        out = [self.volume(revision)]
        if self.state_bucket:
            out.append(Volume(type="bucket", source=self.state_bucket, mount_path=STATE_MOUNT))
        return out

    def run_job_kwargs(self, revision: str | None, secrets: Mapping[str, str]) -> dict[str, Any]:
        """Keyword arguments of ``HfApi.run_job``; ``secrets`` must hold exactly :attr:`secret_names`."""
        if sorted(secrets) != sorted(self.secret_names):
            raise HFJobsError(f"secrets {sorted(secrets)} given, the request names {sorted(self.secret_names)}")
        return {"image": self.image, "command": self.command, "env": dict(self.env), "secrets": dict(secrets),
                "flavor": self.flavor, "timeout": self.timeout_s, "labels": dict(self.labels),
                "volumes": self.volumes(revision), "attempts": self.attempts, "namespace": self.namespace}

    def spec(self, revision: str | None, placeholder: str = "<secret>") -> dict[str, Any]:
        """The JSON spec ``run_job`` POSTs to ``/api/jobs/<namespace>``, secret values replaced by ``placeholder``.

        Built from the documented payload (hf_jobs_api.md section 3): command, arguments, environment, flavor,
        secrets, timeoutSeconds, attempts, labels, volumes, dockerImage.
        """
        return {"command": self.command, "arguments": [], "environment": dict(self.env), "flavor": self.flavor,
                "secrets": {k: placeholder for k in self.secret_names}, "timeoutSeconds": int(self.timeout_s),
                "attempts": int(self.attempts), "labels": dict(self.labels),
                "volumes": [v.to_dict() for v in self.volumes(revision)], "dockerImage": self.image}

    def hf_command(self, revision: str | None) -> list[str]:
        """The equivalent ``hf jobs run`` command line; secrets by name only (``-s NAME`` reads the local value)."""
        cmd = ["hf", "jobs", "run", "--flavor", self.flavor, "--timeout", str(self.timeout_s),
               "--attempts", str(self.attempts), "--namespace", self.namespace]
        for name in self.secret_names:
            cmd += ["-s", name]
        for k, v in self.env.items():
            cmd += ["-e", f"{k}={v}"]
        for k, v in self.labels.items():
            cmd += ["-l", f"{k}={v}"]
        for v in self.volumes(revision):
            cmd += ["-v", v.to_uri()]
        cmd += ["--detach", "--", self.image, *self.command]
        return cmd


def make_request(*, run_id: str, attempt: int, namespace: str, results_repo: str, job: str, job_args: list[str],
                 commit: str, image: str, flavor: str = DEFAULT_FLAVOR, timeout_s: int = 3600, attempts: int = 1,
                 commit_every_s: float = DEFAULT_COMMIT_EVERY_S, labels: Mapping[str, str] | None = None,
                 env: Mapping[str, str] | None = None, secret_names: tuple[str, ...] = ("HF_TOKEN",),
                 name: str | None = None, bucket: str | None = None) -> JobRequest:
    """The request of attempt ``attempt`` of run ``run_id`` (public env and labels only); ``bucket`` (NS/NAME)
    adds the read-write state volume at :data:`STATE_MOUNT`."""
    if attempts < 1:
        raise HFJobsError(f"--attempts {attempts}: at least 1 (the first run counts)")
    user_env = dict(env or {})
    clash = sorted(set(user_env) & set(RESERVED_ENV))
    if clash:
        raise HFJobsError(f"-e/--env {', '.join(clash)}: set by the kit itself; choose other names")
    if "HF_TOKEN" in user_env:
        raise HFJobsError("-e/--env HF_TOKEN: a token never goes in the environment (it is shown in clear by "
                          "`hf jobs inspect`); it is passed as the secret HF_TOKEN")
    kit_env = {"COVTOKEN_BACKEND": "hf-jobs", "COVTOKEN_RUN_ID": run_id, "COVTOKEN_RESULTS_REPO": results_repo,
               "COVTOKEN_JOB_NAMESPACE": namespace, "COVTOKEN_ATTEMPT": str(attempt),
               "COVTOKEN_TIMEOUT_S": str(timeout_s), "COVTOKEN_COMMIT_EVERY_S": f"{commit_every_s:g}",
               "COVTOKEN_IMAGE": image}
    bucket = parse_bucket(bucket) if bucket else None
    if bucket:
        kit_env["COVTOKEN_STATE_BUCKET"] = bucket
    user_labels = dict(labels or {})
    clash = sorted(set(user_labels) & set(RESERVED_LABELS))
    if clash:
        raise HFJobsError(f"-l/--label {', '.join(clash)}: set by the kit itself; choose other keys")
    if name is not None and "name" in user_labels:
        raise HFJobsError("--name and -l name=...: give the name once")
    lab = {"app": "covtoken", "gate": job_gate(job).lower(), "run": run_id, "attempt": str(attempt),
           "code": commit[:12], "name": name or user_labels.pop("name", None) or run_id, **user_labels}
    for k, v in lab.items():
        if not _LABEL_OK.match(k) or not _LABEL_OK.match(v):
            raise HFJobsError(f"label {k}={v}: keys and values must match [A-Za-z0-9_-]{{1,100}}")
    return JobRequest(run_id=run_id, attempt=attempt, namespace=namespace, results_repo=results_repo, image=image,
                      flavor=flavor, timeout_s=timeout_s, job=job, job_args=tuple(job_args), attempts=attempts,
                      env={**kit_env, **user_env}, labels=lab, secret_names=tuple(secret_names), state_bucket=bucket)
