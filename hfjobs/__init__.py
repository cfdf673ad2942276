"""The Hugging Face Jobs backend of covtoken, as a library (``covtoken.hfjobs``) with a thin CLI on top.

Library (plain values in, plain values out; nothing here reads ``argparse``)::

    from covtoken import hfjobs
    h = hfjobs.submit(hfjobs.SubmitRequest(job="jobs/g1_lesion_subspace.py", results_repo="org/results",
                                           job_args=("--smoke",), flavor="t4-small", timeout="2h"))
    hfjobs.status(h.run_id); hfjobs.wait(h.run_id); hfjobs.fetch_runs(api, "org/results", [h.run_id], dest)
    sweep_id, handles = hfjobs.run_sweep(hfjobs.SweepRequest(base=..., seeds=5))

Modules (imports go one way, top to bottom; tests/test_hfjobs_package.py checks there is no cycle):

    errors    HFJobsError (user error, exit 2) and one-line messages for Hub failures
    retry     retries on 429/5xx/transport errors honouring Retry-After
    prices    flavors, live prices (list_jobs_hardware) and the dated offline table (--dry-run)
    images    the pinned job images (GPU: PyTorch CUDA runtime; CPU: slim uv image)
    spec      JobRequest: labels, env, the JSON spec, the `hf jobs run` line
    hubsync   inside the job: batched, retried commits of shards, logs and the record
    launcher  inside the job: stdlib-only bundle launcher (shipped as launch.py)
    bundle    the code bundle of a commit
    query     Hub look-ups (a run's jobs and files)
    fetch     records and artefacts into a results folder; the repo's dataset card
    runs      SubmitRequest/ResumeRequest -> Plan -> launch -> RunHandle; status, ps, logs, wait, cancel
    sweep     seeds x datasets x backbones, aggregate records
    cli       the `covtoken` subcommands (the only module that sees argparse)
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "HFJobsError": "errors", "with_retry": "retry", "JobRequest": "spec", "make_request": "spec",
    "parse_duration": "spec", "SubmitRequest": "runs", "ResumeRequest": "runs", "RunHandle": "runs",
    "Plan": "runs", "plan_submit": "runs", "plan_resume": "runs", "launch": "runs", "submit": "runs",
    "resume": "runs", "status": "runs", "list_runs": "runs", "cancel": "runs", "wait": "runs",
    "logs": "runs", "dry_run_lines": "runs", "fetch_runs": "fetch", "publish_card": "fetch",
    "SweepRequest": "sweep", "plan_sweep": "sweep", "run_sweep": "sweep", "aggregate_sweep": "sweep",
    "HubSync": "hubsync",
    "IMAGES": "images", "PRICE_TABLE": "prices",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Load the submodule of a public name on first use (``import covtoken.hfjobs.hubsync`` stays light)."""
    if name in _EXPORTS:
        mod = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
