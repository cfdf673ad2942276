"""What an HF Job of the kit is made of: the request ``run_job`` gets, its labels, its timeout and its price.

``JobRequest`` is the single description of one attempt of one run; ``covtoken submit`` sends it with
``run_job``, ``--dry-run`` prints it as the JSON spec and as the equivalent ``hf jobs run`` command line, and
the attempt file ``runs/<run_id>/attempts/<n>.json`` stores it (secret names only) so that ``--resume`` can
start the next attempt on the same bundle with the same arguments.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from .hubsync import MOUNT, hardware_summary

__all__ = ["HFJobsError", "JobRequest", "make_request", "parse_timeout", "label_value", "job_gate", "price",
           "show_price", "usd", "confirm", "console", "DEFAULT_IMAGE", "DEFAULT_FLAVOR", "DEFAULT_TIMEOUT"]

console = Console(stderr=True, highlight=False)
#: The job image. Pinned by tag only: its digest could not be resolved offline when this was written; pass
#: ``--image ghcr.io/astral-sh/uv@sha256:<digest>`` to pin it by digest.
DEFAULT_IMAGE = "ghcr.io/astral-sh/uv:python3.11-bookworm"
DEFAULT_FLAVOR = "cpu-basic"
DEFAULT_TIMEOUT = "1h"
_LABEL_OK = re.compile(r"^[A-Za-z0-9_-]{1,100}$")


class HFJobsError(RuntimeError):
    """A submission or a job query that cannot go on; the message says why and what to do."""


def parse_timeout(text: str | int) -> int:
    """``90``, ``90s``, ``30m``, ``2h``, ``1d`` -> seconds (the ``hf jobs --timeout`` grammar)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise HFJobsError(f"--timeout {text!r}: expected a positive number with an optional s/m/h/d suffix")
    return int(float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)])


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
    """Everything ``run_job`` receives for one attempt of one run, except the token.

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
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def command(self) -> list[str]:
        return ["uv", "run", f"{MOUNT}/launch.py", *self.job_args]

    def volume(self, revision: str | None) -> Any:
        from huggingface_hub import Volume

        return Volume(type="dataset", source=self.results_repo, mount_path=MOUNT, revision=revision,
                      read_only=True, path=f"runs/{self.run_id}/code")

    def run_job_kwargs(self, revision: str | None, token: str) -> dict[str, Any]:
        """Keyword arguments of ``HfApi.run_job``."""
        return {"image": self.image, "command": self.command, "env": dict(self.env), "secrets": {"HF_TOKEN": token},
                "flavor": self.flavor, "timeout": self.timeout_s, "labels": dict(self.labels),
                "volumes": [self.volume(revision)], "namespace": self.namespace}

    def spec(self, revision: str | None) -> dict[str, Any]:
        """The job spec ``run_job`` POSTs, with the secret's value replaced by a placeholder."""
        from huggingface_hub._jobs_api import _create_job_spec

        kw = self.run_job_kwargs(revision, "<your HF token, sent as a secret>")
        kw.pop("namespace")
        return _create_job_spec(**kw)

    def hf_command(self, revision: str | None) -> list[str]:
        """The equivalent ``hf jobs run`` command line (``-s HF_TOKEN`` reads the local token)."""
        cmd = ["hf", "jobs", "run", "--flavor", self.flavor, "--timeout", str(self.timeout_s),
               "--namespace", self.namespace, "-s", "HF_TOKEN"]
        for k, v in self.env.items():
            cmd += ["-e", f"{k}={v}"]
        for k, v in self.labels.items():
            cmd += ["-l", f"{k}={v}"]
        cmd += ["-v", self.volume(revision).to_uri(), "--detach", "--", self.image, *self.command]
        return cmd


def make_request(*, run_id: str, attempt: int, namespace: str, results_repo: str, job: str, job_args: list[str],
                 commit: str, image: str = DEFAULT_IMAGE, flavor: str = DEFAULT_FLAVOR, timeout_s: int = 3600,
                 log_every_s: float = 120.0, labels: dict[str, str] | None = None) -> JobRequest:
    """The request of attempt ``attempt`` of run ``run_id`` (public env and labels only)."""
    env = {"COVTOKEN_BACKEND": "hf-jobs", "COVTOKEN_RUN_ID": run_id, "COVTOKEN_RESULTS_REPO": results_repo,
           "COVTOKEN_JOB_NAMESPACE": namespace, "COVTOKEN_ATTEMPT": str(attempt),
           "COVTOKEN_TIMEOUT_S": str(timeout_s), "COVTOKEN_LOG_EVERY_S": f"{log_every_s:g}"}
    lab = {"app": "covtoken", "gate": job_gate(job).lower(), "run": run_id, "attempt": str(attempt),
           "code": commit[:12], "name": run_id, **(labels or {})}
    for k, v in lab.items():
        if not _LABEL_OK.match(k) or not _LABEL_OK.match(v):
            raise HFJobsError(f"label {k}={v}: keys and values must match [A-Za-z0-9_-]{{1,100}}")
    return JobRequest(run_id=run_id, attempt=attempt, namespace=namespace, results_repo=results_repo, image=image,
                      flavor=flavor, timeout_s=timeout_s, job=job, job_args=tuple(job_args), env=env, labels=lab)


def price(api: Any, flavor: str, timeout_s: int, n_jobs: int = 1) -> dict[str, Any]:
    """The flavor's hardware entry, its hourly price and the worst-case cost of ``n_jobs`` hitting the timeout."""
    hw = {h.name: h for h in api.list_jobs_hardware()}
    if flavor not in hw:
        raise HFJobsError(f"--flavor {flavor!r} is not offered; choose one of {', '.join(sorted(hw))}")
    summary = hardware_summary(hw[flavor])
    worst = summary["usd_per_hour"] * timeout_s / 3600 * n_jobs
    return {"hardware": summary, "timeout_s": timeout_s, "jobs": n_jobs, "worst_case_usd": round(worst, 4)}


def show_price(p: dict[str, Any]) -> None:
    """Flavor, hourly price and worst-case cost, on stderr."""
    hw = p["hardware"]
    acc = hw["accelerator"]
    kit = f"{hw['cpu']}, {hw['ram']}" + (f", {acc['quantity']}x {acc['model']} ({acc['vram']})" if acc else "")
    jobs = f" x {p['jobs']} jobs" if p["jobs"] > 1 else ""
    console.print(f"flavor      {hw['name']} ({hw['pretty_name']}: {kit})\n"
                  f"price       {usd(hw['usd_per_hour'])}/hour ({usd(hw['unit_cost_usd'])} per {hw['unit_label']})\n"
                  f"timeout     {p['timeout_s']} s\n"
                  f"worst case  {usd(p['worst_case_usd'])} (every job running until its timeout{jobs})",
                  markup=False)


def usd(x: float) -> str:
    """Dollars with cents, or with four significant digits below a cent."""
    return f"${x:.2f}" if x >= 0.01 or x == 0 else f"${x:.4g}"


def confirm(question: str, yes: bool) -> None:
    """Ask on the terminal unless ``--yes``; no terminal and no ``--yes`` is an error."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise HFJobsError("no terminal to confirm the cost on: pass --yes")
    from rich.prompt import Confirm

    if not Confirm.ask(question, console=console):
        raise HFJobsError("not submitted")


