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

import argparse
import copy
import shlex
import tempfile
from datetime import datetime
from itertools import product
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .bundle import build_bundle
from .hffetch import download_run, fetch_and_audit
from .hfjobs import (add_submit_options, cli_command, committed_job, hub_api, jobs_of_run, local_token, namespace_of,
                     out, read_json, results_repo_of, start_job, upload_bundle)
from .hfspec import (DEFAULT_FLAVOR, DEFAULT_IMAGE, DEFAULT_TIMEOUT, HFJobsError, confirm, console, job_gate,
                     label_value, make_request, parse_timeout, price, show_price)
from .hubsync import commit_record
from .lock import ThresholdLock, judge
from .record import ArtefactWriter, dumps_strict, new_run_id, read_record, sha256_file, utc_now, write_record
from .runner import default_lock_path

__all__ = ["t_interval", "plan_cells", "aggregate_group", "register", "CI_LEVEL"]

CI_LEVEL = 0.95


def t_interval(values: Sequence[float], level: float = CI_LEVEL) -> dict[str, Any]:
    """Mean, sd (ddof 1) and the t-based CI of the mean of ``values``.

    Returns:
        ``{"k", "mean", "sd", "df", "t_quantile", "ci"}``; ``sd``, ``df``, ``t_quantile`` and ``ci`` are None
        for fewer than two values, and ``mean`` too for none.
    """
    from covtoken.eval.change_metrics import t_interval as t_ci  # the kit's one t interval

    x = np.asarray(list(values), dtype=float)
    k = int(x.size)
    out_: dict[str, Any] = {"k": k, "mean": float(x.mean()) if k else None, "sd": None, "df": None,
                            "t_quantile": None, "ci": None}
    if k >= 2:
        ti = t_ci(x, level=level)
        out_.update(mean=ti.mean, sd=ti.sd, df=ti.n - 1, t_quantile=ti.t_crit, ci=list(ti.ci))
    return out_


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
    metrics, stats = {}, {}
    for name in sorted(set().union(*(o["record"]["metrics"] for o in ok))):
        used = [(o, o["record"]["metrics"][name]) for o in ok
                if name in o["record"]["metrics"] and o["record"]["metrics"][name]["value"] is not None]
        st = t_interval([m["value"] for _, m in used])
        keys = set.intersection(*(set(m["n"]) for _, m in used)) if used else set(first["metrics"][name]["n"])
        n = {k: int(sum(m["n"][k] for _, m in used)) for k in sorted(keys)}
        sd = "n/a (fewer than 2 seeds)" if st["sd"] is None else f"{st['sd']:.4f}"
        metrics[name] = {"value": st["mean"], "ci": st["ci"], "ci_level": CI_LEVEL,
                         "ci_method": None if st["ci"] is None else (
                             f"t-interval of the mean over {st['k']} seeds (scipy.stats.t, df={st['df']}); "
                             "per-seed values in aggregate.json"),
                         "n": n, "description": f"mean ± sd over {st['k']} seed(s): "
                                                f"{'n/a' if st['mean'] is None else format(st['mean'], '.4f')} ± {sd}"}
        if "unit" in first["metrics"].get(name, {}):
            metrics[name]["unit"] = first["metrics"][name]["unit"]
        stats[name] = {**st, "values": {o["run_id"]: m["value"] for o, m in used}}
    run_id = new_run_id(first["gate_id"])
    cells = [{k: o.get(k) for k in ("run_id", "seed", "dataset", "backbone", "job_id", "attempt", "stage", "message")}
             | {"included": o["record"] is not None,
                "decision": None if o["record"] is None else o["record"]["decision"],
                "record_sha256": o.get("record_sha256")} for o in outcomes]
    art = ArtefactWriter(results_dir, run_id)
    art.json("aggregate.json", {"sweep_id": sweep["sweep_id"], "ci_level": CI_LEVEL,
                                "method": "mean, sd (ddof 1), t-based CI of the mean over seeds", "metrics": stats},
             description="per-seed values, mean, sd and t-based CI of every metric")
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
    record = {"record_type": "covtoken.gate_record", "schema_version": 1, "run_id": run_id,
              "gate_id": first["gate_id"], "claim": entry.claim, "decision": decision,
              "decision_reason": reason + (f"; failed cells not aggregated: {names_failed}" if failed else ""),
              "sample_run": bool(first.get("sample_run", False)), "criteria": criteria, "metrics": metrics,
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
    console.print(f"sweep {sweep_id}: waiting for {len(latest)} job(s)", markup=False)
    try:
        finals = api.wait_for_job([j.id for j in latest], namespace=ns, timeout=timeout)
    except TimeoutError:
        raise HFJobsError(f"sweep {sweep_id}: jobs still running after {timeout} s") from None
    outcomes = []
    for cell, job in zip(plan["cells"], finals):
        rec_path = download_run(api, repo, cell["run_id"], staging)
        outcomes.append({**cell, "job_id": job.id, "attempt": int((job.labels or {}).get("attempt", 0)),
                         "stage": str(job.status.stage), "message": job.status.message,
                         "record": None if rec_path is None else read_record(rec_path),
                         "record_sha256": None if rec_path is None else sha256_file(rec_path)})
    return plan, outcomes


def aggregate_sweep(api: Any, repo: str, sweep_id: str, results: Path, *, timeout: float | None = None) -> int:
    """Collect a sweep, write and upload one aggregate per group, fetch everything into ``results`` and audit."""
    with tempfile.TemporaryDirectory() as tmp:
        plan, outcomes = collect(api, repo, sweep_id, Path(tmp) / "cells", timeout)
        lock = ThresholdLock.load(default_lock_path())
        aggregates, problems = [], []
        groups: dict[tuple, list[dict]] = {}
        for o in outcomes:
            groups.setdefault((o["dataset"], o["backbone"]), []).append(o)
        for key, group in groups.items():
            try:
                path = aggregate_group(group, sweep=plan, lock=lock, results_dir=Path(tmp) / "aggregate",
                                       command=["covtoken", "aggregate", sweep_id, "--results-repo", repo])
            except HFJobsError as exc:
                problems.append(f"group dataset={key[0]} backbone={key[1]}: {exc}")
                continue
            commit_record(api, repo, path)
            rec = read_record(path)
            aggregates.append(rec["run_id"])
            out(rec["run_id"])
            console.print(f"aggregate {rec['run_id']}: [bold]{rec['decision'].upper()}[/bold] over "
                          f"{len(rec['provenance']['backend']['aggregate_of'])} of {len(group)} cell(s)")
    failed = [o for o in outcomes if o["record"] is None]
    for o in failed:
        console.print(f"[red]failed cell[/red] {cell_name(o)}: run {o['run_id']} job {o['job_id']} {o['stage']}"
                      + (f": {o['message']}" if o["message"] else ""), soft_wrap=True)
    for p in problems:
        console.print(f"[red]error:[/red] {p}", soft_wrap=True)
    done = [o["run_id"] for o in outcomes if o["record"] is not None] + aggregates
    rc = fetch_and_audit(api, repo, done, results) if done else 1
    return 1 if failed or problems or rc else 0


@cli_command
def cmd_sweep(args: argparse.Namespace) -> int:
    """``covtoken sweep``: submit every cell, then (unless --detach) wait and aggregate."""
    repo = results_repo_of(args)
    if not repo:
        raise HFJobsError("sweep needs --results-repo <namespace>/<name> (or COVTOKEN_RESULTS_REPO)")
    clash = [a for a in args.job_args if a.split("=", 1)[0] in ("--seed", "--dataset", "--backbone")]
    if clash:
        raise HFJobsError(f"{clash}: the sweep sets --seed/--dataset/--backbone per cell; use --seeds/--datasets/"
                          "--backbones")
    api = hub_api()
    ns = namespace_of(api, args.namespace)
    state, rel = committed_job(args.job, args.allow_dirty)
    cells = plan_cells(args.seeds, args.seed_start, [d for d in (args.datasets or "").split(",") if d],
                       [b for b in (args.backbones or "").split(",") if b])
    timeout_s = parse_timeout(args.timeout or DEFAULT_TIMEOUT)
    sweep_id = new_run_id("sweep")
    gate = job_gate(rel)
    bundle = build_bundle(state, rel, state.root / "results" / "bundles")
    reqs = []
    for cell in cells:
        cell["run_id"] = new_run_id(gate)
        labels = {"sweep": sweep_id, "seed": str(cell["seed"]),
                  **{k: label_value(cell[k]) for k in ("dataset", "backbone") if cell.get(k) is not None}}
        reqs.append(make_request(run_id=cell["run_id"], attempt=0, namespace=ns, results_repo=repo, job=rel,
                                 job_args=[*args.job_args, *cell_args(cell)], commit=state.commit,
                                 image=args.image or DEFAULT_IMAGE, flavor=args.flavor or DEFAULT_FLAVOR,
                                 timeout_s=timeout_s, log_every_s=args.log_every, labels=labels))
    p = price(api, reqs[0].flavor, timeout_s, n_jobs=len(reqs))
    show_price(p)
    plan = {"kind": "covtoken.sweep", "sweep_id": sweep_id, "job": rel, "job_args": list(args.job_args),
            "namespace": ns, "results_repo": repo, "created_at": utc_now(), "code": state.commit, "cells": cells}
    if args.dry_run:
        for req in reqs:
            out(shlex.join(req.hf_command(None)))
        out(dumps_strict(plan))
        return 0
    confirm(f"submit {len(reqs)} job(s) of sweep {sweep_id}?", args.yes)
    token = local_token()
    revision = upload_bundle(api, repo, bundle, [c["run_id"] for c in cells], f"{sweep_id}: code bundle and plan",
                             extra={f"sweeps/{sweep_id}.json": dumps_strict(plan).encode()})
    for req in reqs:
        start_job(api, req, revision, token, p)
    if args.detach:
        console.print(f"aggregate it when done: covtoken aggregate {sweep_id} --results-repo {repo}", markup=False)
        out(sweep_id)
        return 0
    return aggregate_sweep(api, repo, sweep_id, Path(args.results))


@cli_command
def cmd_aggregate(args: argparse.Namespace) -> int:
    """``covtoken aggregate SWEEP_ID``."""
    repo = results_repo_of(args)
    if not repo:
        raise HFJobsError("aggregate needs --results-repo (or COVTOKEN_RESULTS_REPO)")
    return aggregate_sweep(hub_api(), repo, args.sweep_id, Path(args.results), timeout=args.timeout)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``sweep`` and ``aggregate`` to the command line."""
    s = sub.add_parser("sweep", help="one HF Job per seed x dataset x backbone, then an aggregate record")
    add_submit_options(s)
    s.add_argument("--seeds", type=int, required=True, help="number of seeds")
    s.add_argument("--seed-start", type=int, default=0, help="first seed (default 0)")
    s.add_argument("--datasets", help="comma-separated dataset names (default: the job's)")
    s.add_argument("--backbones", help="comma-separated backbone names (default: the job's)")
    s.set_defaults(fn=cmd_sweep)
    a = sub.add_parser("aggregate", help="wait for a sweep's cells and write its aggregate record(s)")
    a.add_argument("sweep_id")
    a.add_argument("--results-repo", help="results dataset repo (default $COVTOKEN_RESULTS_REPO)")
    a.add_argument("--results", default="gate_reports", help="where records are fetched to (default gate_reports)")
    a.add_argument("--timeout", type=float, help="seconds to wait for the cells (default: no limit)")
    a.set_defaults(fn=cmd_aggregate)
