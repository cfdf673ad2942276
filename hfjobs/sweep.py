"""``covtoken sweep``: one HF Job per (dataset, backbone, seed) cell, then one aggregate gate record per
(dataset, backbone) over the seeds.

    covtoken sweep jobs/g1_lesion_subspace.py --seeds 5 --datasets a,b --backbones x,y --results-repo org/res \\
        --flavor a10g-small --timeout 2h -- --device cuda
    covtoken aggregate SWEEP_ID --results-repo org/res       # wait for the cells of a (detached) sweep, aggregate

Every cell is a normal run (its own run id, record and code folder, labels ``sweep``, ``seed``, ``dataset``,
``backbone``); all cells mount the same bundle commit. The aggregate of a (dataset, backbone) group is a gate
record judged under the cells' lock entry: each metric is the mean over the seeds whose cell produced it, with
the t-based confidence interval of the mean (``mean ± t_{(1+level)/2, k-1} · sd / sqrt(k)``, scipy.stats.t;
never z) as its CI, so a criterion judged on a CI bound is judged on the seed-to-seed interval. With fewer than
two seeds there is no sd and no CI. Cells whose job failed are named in the aggregate's decision reason,
notes, config and ``cells.json`` artefact; they are never dropped silently, and the command exits 1.
"""
from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from itertools import product
from pathlib import Path
from typing import Any


from ..eval.recompute import canonical, evaluate, pack_arrays, unpack_arrays
from ..eval.seed_mean import seed_mean_inputs
from ..lock import ThresholdLock, judge
from ..record import (ArtefactWriter, dumps_strict, new_run_id, read_record, sealed_fields, sha256_file, utc_now,
                      write_record)
from ..runner import default_lock_path
from .bundle import build_bundle
from .errors import HFJobsError
from .fetch import download_run
from .hubsync import commit_record
from .query import hub_api, hub_call, jobs_of_run, namespace_of, read_json
from .runs import (PLACEHOLDER_NAMESPACE, Plan, SubmitRequest, _check_repo_id, _image, _secret_names, committed_job,
                     refuse_public_bucket, refuse_public_repo)
from .prices import live_price, offline_price
from .spec import job_gate, label_value, make_request, parse_bucket, parse_duration

__all__ = ["plan_cells", "aggregate_group", "SweepRequest", "plan_sweep", "sweep_commit_every",
           "aggregate_sweep", "AggregateResult", "run_sweep", "CI_LEVEL", "COMMIT_BUDGET_PER_HOUR"]

CI_LEVEL = 0.95
#: Periodic commits (token-bank batches, logs) a whole sweep may make per hour in its shared results repo:
#: half of the 128 per hour a public Hub 429 message quotes, leaving room for records, logs and other runs.
COMMIT_BUDGET_PER_HOUR = 64


def plan_cells(seeds: int, seed_start: int, datasets: list[str], backbones: list[str]) -> list[dict[str, Any]]:
    """Every (dataset, backbone, seed) cell; ``None`` for an axis that is not swept."""
    if seeds < 1:
        raise HFJobsError(f"--seeds {seeds}: need at least one seed")
    return [{"dataset": d, "backbone": b, "seed": s}
            for d, b, s in product(datasets or [None], backbones or [None], range(seed_start, seed_start + seeds))]


def cell_name(cell: dict[str, Any]) -> str:
    """``seed=1 dataset=x backbone=y`` (swept axes only)."""
    return " ".join(f"{k}={cell[k]}" for k in ("seed", "dataset", "backbone") if cell.get(k) is not None)


def cell_args(cell: dict[str, Any]) -> list[str]:
    """The job arguments a cell adds to the sweep's own."""
    args = ["--seed", str(cell["seed"])]
    for k in ("dataset", "backbone"):
        if cell.get(k) is not None:
            args += [f"--{k}", cell[k]]
    return args


def _ts(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def aggregate_group(outcomes: list[dict[str, Any]], *, sweep: dict[str, Any], lock: ThresholdLock,
                    results_dir: Path, command: list[str]) -> Path:
    """Write the aggregate record of one (dataset, backbone) group of cells into ``results_dir``.

    Args:
        outcomes: one per cell: the plan's cell fields plus ``run_id``, ``job_id``, ``attempt``, ``stage``,
            ``message`` and ``record`` (the cell's record, or None when it has none).
        sweep: the sweep plan (``sweeps/<id>.json``).
        lock: the threshold lock; the cells' entry must have the digest they were judged under.
        results_dir: where the record and its artefacts are written.
        command: the command line that aggregates.

    Raises:
        HFJobsError: no cell has a record, or the cells disagree on the gate, lock entry or code.
    """
    ok = [o for o in outcomes if o["record"] is not None]
    failed = [o for o in outcomes if o["record"] is None]
    if not ok:
        raise HFJobsError("every cell of the group failed: " + "; ".join(
            f"{cell_name(o)} ({o['stage']}: {o['message']})" for o in failed))
    first = ok[0]["record"]
    for o in ok[1:]:
        r = o["record"]
        for fld, a, b in (("gate_id", r["gate_id"], first["gate_id"]), ("lock/entry_digest", r["lock"]["entry_digest"],
                          first["lock"]["entry_digest"]), ("provenance/code", r["provenance"]["code"],
                                                           first["provenance"]["code"])):
            if a != b:
                raise HFJobsError(f"run {o['run_id']}: field {fld} differs from run {ok[0]['run_id']}; not aggregated")
    entry = lock.entry(first["lock"]["entry"])
    if entry.digest != first["lock"]["entry_digest"]:
        raise HFJobsError(f"{lock.source}: entry {entry.key} is {entry.digest}, the cells were judged under "
                          f"{first['lock']['entry_digest']}")
    per_metric, values_by_run = {}, {}
    for name in sorted(set().union(*(o["record"]["metrics"] for o in ok))):
        used = [(o, o["record"]["metrics"][name]) for o in ok
                if name in o["record"]["metrics"] and o["record"]["metrics"][name]["value"] is not None]
        keys = set.intersection(*(set(m["n"]) for _, m in used)) if used else set(first["metrics"][name]["n"])
        per_metric[name] = {"values": [m["value"] for _, m in used],
                            "n": {k: int(sum(m["n"][k] for _, m in used)) for k in sorted(keys)},
                            "unit": first["metrics"].get(name, {}).get("unit")}
        values_by_run[name] = {o["run_id"]: m["value"] for o, m in used}
    arrays, args = seed_mean_inputs(per_metric, CI_LEVEL)
    packed = pack_arrays(arrays)
    ev = evaluate("sweep.seed_mean", unpack_arrays(packed), args)  # exactly what the audit recomputes
    metrics = ev.metrics
    stats = {name: {**ev.extras["stats"][name], "values": values_by_run[name]} for name in metrics}
    run_id = new_run_id(first["gate_id"])
    cells = [{k: o.get(k) for k in ("run_id", "seed", "dataset", "backbone", "job_id", "attempt", "stage", "message")}
             | {"included": o["record"] is not None,
                "decision": None if o["record"] is None else o["record"]["decision"],
                "record_sha256": o.get("record_sha256")} for o in outcomes]
    art = ArtefactWriter(results_dir, run_id)
    art.json("aggregate.json", {"sweep_id": sweep["sweep_id"], "ci_level": CI_LEVEL,
                                "method": "mean, sd (ddof 1), t-based CI of the mean over seeds", "metrics": stats},
             description="per-seed values, mean, sd and t-based CI of every metric")
    from ..evidence import tier_of

    art.json("cells.json", cells, description="every cell of the group: run, job, stage, whether it is included")
    decision, criteria, reason = judge(entry.criteria, metrics)
    names_failed = ", ".join(f"{cell_name(o)} (run {o['run_id']})" for o in failed)
    started, finished = sweep["created_at"], utc_now()
    prov = copy.deepcopy(first["provenance"])
    prov.update(
        started_at=started, finished_at=finished, wall_seconds=round((_ts(finished) - _ts(started)).total_seconds(), 3),
        command=command, seed=ok[0]["seed"],
        backend={"name": "hf-jobs", "job_id": ",".join(o["job_id"] for o in outcomes if o.get("job_id")),
                 "sweep_id": sweep["sweep_id"], "results_repo": sweep["results_repo"],
                 "namespace": sweep["namespace"], "aggregate_of": [o["run_id"] for o in ok]},
        config={"sweep_id": sweep["sweep_id"], "job": sweep["job"], "job_args": sweep["job_args"],
                "aggregation": "mean over seeds, t-based CI of the mean", "ci_level": CI_LEVEL, "cells": cells})
    prov["dataset"] = {**prov["dataset"], "sweep": {
        "seeds": [o["seed"] for o in ok], "n_patients_per_cell": {o["run_id"]: o["record"]["provenance"]["dataset"]
                                                                  ["n_patients"] for o in ok}}}
    notes = [f"aggregate of sweep {sweep['sweep_id']}: {len(ok)} of {len(outcomes)} cell(s) "
             f"({', '.join(cell_name(o) for o in ok)}); metric = mean over seeds, CI = t-based "
             f"{CI_LEVEL:.0%} CI of the mean (df = k - 1)"]
    notes += [f"failed cell {cell_name(o)}: run {o['run_id']}, job {o.get('job_id')} (attempt {o.get('attempt')}) "
              f"ended {o['stage']}" + (f": {o['message']}" if o.get("message") else "") + "; not in the aggregate"
              for o in failed]
    evidence = tier_of({"provenance": prov})
    art.bytes("eval_inputs-0.npz", packed, description="evaluation inputs of recipe sweep.seed_mean: the per-seed "
              "values of every metric (eval-only; the audit recomputes the aggregate from them)")
    art.json("evaluation.json", {
        "kind": "covtoken.evaluation",
        "evaluations": [{"recipe": "sweep.seed_mean", "args": canonical(args), "inputs": "eval_inputs-0.npz",
                         "metrics": sorted(metrics)}],
        "notes": list(notes),
        "sealed": sealed_fields(prov, evidence=evidence, entry=first["lock"]["entry"])},
        description="how every metric was computed (recipe sweep.seed_mean), the notes and provenance as written")
    record = {"record_type": "covtoken.gate_record", "schema_version": 1, "run_id": run_id,
              "gate_id": first["gate_id"], "claim": entry.claim, "decision": decision,
              "decision_reason": reason + (f"; failed cells not aggregated: {names_failed}" if failed else ""),
              "evidence": evidence, "criteria": criteria, "metrics": metrics,
              "lock": lock.record_stamp(entry.key, first["lock"]["path"]), "provenance": prov,
              "artefacts": art.entries, "notes": notes}
    return write_record(record, results_dir)


def collect(api: Any, repo: str, sweep_id: str, staging: Path, timeout: float | None) -> tuple[dict, list[dict]]:
    """Wait for every cell's latest job, then download the records that exist; returns (plan, outcomes)."""
    plan = read_json(api, repo, f"sweeps/{sweep_id}.json")
    ns = plan["namespace"]
    latest = []
    for cell in plan["cells"]:
        jobs = jobs_of_run(api, ns, cell["run_id"])
        if not jobs:
            raise HFJobsError(f"sweep {sweep_id}: no job for cell {cell_name(cell)} (run {cell['run_id']})")
        latest.append(jobs[-1])
    try:
        finals = hub_call(api.wait_for_job, [j.id for j in latest], what="wait_for_job", namespace=ns,
                          timeout=timeout)
    except TimeoutError:
        raise HFJobsError(f"sweep {sweep_id}: jobs still running after {timeout:g} s; run `covtoken aggregate "
                          f"{sweep_id}` again later") from None
    outcomes = []
    for cell, job in zip(plan["cells"], finals):
        rec_path = download_run(api, repo, cell["run_id"], staging)
        outcomes.append({**cell, "job_id": job.id, "attempt": int((job.labels or {}).get("attempt", 0)),
                         "stage": str(job.status.stage), "message": job.status.message,
                         "record": None if rec_path is None else read_record(rec_path),
                         "record_sha256": None if rec_path is None else sha256_file(rec_path)})
    return plan, outcomes


@dataclass
class AggregateResult:
    """What an aggregation did: the aggregate run ids (with decision), the failed cells and the problems."""

    aggregates: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # run id -> (decision, used, cells)
    failed: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)  # cell runs with a record, then the aggregates


def aggregate_sweep(api: Any, repo: str, sweep_id: str, *, timeout: float | None = None) -> AggregateResult:
    """Collect a sweep, write and upload one aggregate record per (dataset, backbone) group."""
    res = AggregateResult()
    with tempfile.TemporaryDirectory() as tmp:
        plan, outcomes = collect(api, repo, sweep_id, Path(tmp) / "cells", timeout)
        lock = ThresholdLock.load(default_lock_path())
        groups: dict[tuple, list[dict]] = {}
        for o in outcomes:
            groups.setdefault((o["dataset"], o["backbone"]), []).append(o)
        for key, group in groups.items():
            try:
                path = aggregate_group(group, sweep=plan, lock=lock, results_dir=Path(tmp) / "aggregate",
                                       command=["covtoken", "aggregate", sweep_id, "--results-repo", repo])
            except HFJobsError as exc:
                res.problems.append(f"group dataset={key[0]} backbone={key[1]}: {exc}")
                continue
            commit_record(api, repo, path)
            rec = read_record(path)
            res.aggregates[rec["run_id"]] = (rec["decision"], len(rec["provenance"]["backend"]["aggregate_of"]),
                                             len(group))
    res.failed = [o for o in outcomes if o["record"] is None]
    res.done = [o["run_id"] for o in outcomes if o["record"] is not None] + list(res.aggregates)
    return res


@dataclass(frozen=True)
class SweepRequest:
    """One job over seeds x datasets x backbones; ``base`` carries the job and how each cell runs."""

    base: SubmitRequest
    seeds: int
    seed_start: int = 0
    datasets: tuple[str, ...] = ()
    backbones: tuple[str, ...] = ()


def sweep_commit_every(n_cells: int, base_s: float, budget_per_hour: int = COMMIT_BUDGET_PER_HOUR) -> float:
    """The commit interval of each cell so that all cells together make at most ``budget_per_hour`` periodic
    commits per hour in their shared repo (never below ``base_s``)."""
    return float(max(base_s, math.ceil(n_cells * 3600 / budget_per_hour)))


def plan_sweep(req: SweepRequest, *, offline: bool = False, api: Any = None) -> tuple[Plan, dict[str, Any]]:
    """Every cell's request on one bundle, the sweep plan (``sweeps/<id>.json``), the price of all cells."""
    base = req.base
    repo = _check_repo_id(base.results_repo)
    image, warnings = _image(base.flavor, base.image)  # a malformed --image digest fails here, before any work
    clash = [a for a in base.job_args if a.split("=", 1)[0] in ("--seed", "--dataset", "--backbone")]
    if clash:
        raise HFJobsError(f"{clash}: the sweep sets --seed/--dataset/--backbone per cell; use --seeds/--datasets/"
                          "--backbones")
    if offline:
        ns = base.namespace or PLACEHOLDER_NAMESPACE
    else:
        api = api or hub_api()
        ns = namespace_of(api, base.namespace)
        refuse_public_repo(api, repo, base.public)
        if base.bucket:
            refuse_public_bucket(api, parse_bucket(base.bucket), base.public)
    state, rel = committed_job(base.job, base.allow_dirty)
    cells = plan_cells(req.seeds, req.seed_start, list(req.datasets), list(req.backbones))
    timeout_s = parse_duration(base.timeout)
    sweep_id = new_run_id("sweep")
    gate = job_gate(rel)
    every = sweep_commit_every(len(cells), base.commit_every_s)
    reqs = []
    for cell in cells:
        cell["run_id"] = new_run_id(gate)
        labels = {**base.labels, "sweep": sweep_id, "seed": str(cell["seed"]),
                  **{k: label_value(cell[k]) for k in ("dataset", "backbone") if cell.get(k) is not None}}
        reqs.append(make_request(run_id=cell["run_id"], attempt=0, namespace=ns, results_repo=repo, job=rel,
                                 job_args=[*base.job_args, *cell_args(cell)], commit=state.commit, image=image,
                                 flavor=base.flavor, timeout_s=timeout_s, attempts=base.attempts,
                                 commit_every_s=every, labels=labels, env=base.env,
                                 secret_names=_secret_names(base.secrets), name=base.name, bucket=base.bucket))
    price = (offline_price if offline else lambda *a, **k: live_price(api, *a, **k))(
        base.flavor, timeout_s, n_jobs=len(reqs), attempts=base.attempts)
    bundle = build_bundle(state, rel, state.root / "results" / "bundles")  # the expensive step, after every check
    plan = {"kind": "covtoken.sweep", "sweep_id": sweep_id, "job": rel, "job_args": list(base.job_args),
            "namespace": ns, "results_repo": repo, "created_at": utc_now(), "code": state.commit,
            "commit_every_s": every, "cells": cells}
    warnings.append(f"sweep {sweep_id}: {len(cells)} cell(s) share {repo}; each commits at most once every "
                    f"{every:g} s (at most {COMMIT_BUDGET_PER_HOUR} periodic commits per hour together)")
    return Plan(requests=tuple(reqs), price=price, warnings=tuple(warnings), bundle=bundle, state=state,
                extra_files={f"sweeps/{sweep_id}.json": dumps_strict(plan).encode()}, offline=offline), plan


def run_sweep(req: SweepRequest, *, api: Any = None) -> tuple[str, list]:
    """Plan and launch every cell of a sweep (no confirmation: the caller has priced it); returns the sweep id
    and the cells' :class:`~covtoken.hfjobs.runs.RunHandle`."""
    from .runs import launch

    api = api or hub_api()
    plan, doc = plan_sweep(req, api=api)
    return doc["sweep_id"], launch(plan, secrets=req.base.secrets, public=req.base.public, api=api)
