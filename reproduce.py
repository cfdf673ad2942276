"""``covtoken reproduce RECORD``: rerun a record from its provenance and compare every metric bit for bit.

The record names its code commit, seed, config (dataset, data root, backbone, options) and lock entry. The
rerun uses exactly that: the job script of the record's command, at the record's commit, with the record's
config as a ``--config`` file (results, work folder and run id replaced), judged under the lock of that commit.
It runs in the current checkout only when that checkout is the record's commit with a clean tree; otherwise
``--worktree`` checks the commit out into a temporary git worktree and runs from there (the current checkout
is never touched). A dirty-tree record cannot be reproduced from a commit and is refused.

Comparison: metrics, criteria and decision must be identical as JSON values (tolerance 0: every float bit
for bit). Hardware can make bits differ (another CPU's vector reductions, or CUDA kernels); the report then
lists each differing field with both values, and the command exits 1. The locked entry digest, the dataset
provenance and the backbone weights digest must be identical too.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .provenance import code_state, git, repo_root
from .record import RecordError, dumps_strict, iter_record_paths, read_record

__all__ = ["ReproduceError", "Reproduction", "reproduce", "compare_records", "protocol_differences", "register_cli"]

#: Record fields compared between the original and the rerun (times, run id, artefact hashes excluded).
COMPARED = (("metrics",), ("criteria",), ("decision",), ("decision_reason",), ("lock", "entry_digest"),
            ("provenance", "dataset"), ("provenance", "backbone", "weights_digest"), ("provenance", "seed"),
            ("provenance", "parameters"), ("provenance", "code", "commit"))


class ReproduceError(ValueError):
    """The record cannot be reproduced as asked (a user error: names the record, flag or commit)."""


@dataclass
class Reproduction:
    original: Path
    rerun: Path | None
    differences: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return self.rerun is not None and not self.differences


def _get(doc: dict, path: tuple[str, ...]) -> object:
    for k in path:
        if not isinstance(doc, dict) or k not in doc:
            return "<absent>"
        doc = doc[k]
    return doc


#: Config keys that say where a run writes or which lock file it read, not what it computes.
PLACE_KEYS = frozenset({"results", "run_id", "work_dir", "lock"})
#: config keys whose value a rerun resolves explicitly (``--lock-entry``: the record's entry, which may have been the
#: default); the resolved value itself is compared (``lock/entry``)
RESOLVED_KEYS = frozenset({"lock_entry"})


def _set_on_command_line(rec: dict, key: str) -> bool:
    """True when ``rec``'s command sets config ``key`` (``--key`` or ``--key=...``) or reads a ``--config`` file (which
    may set anything)."""
    flag = "--" + key.replace("_", "-")
    return any(arg in (flag, "--config") or arg.startswith((flag + "=", "--config="))
               for arg in rec["provenance"]["command"])


def compare_records(a: dict, b: dict, *, fields: tuple[tuple[str, ...], ...] = COMPARED) -> list[str]:
    """Differences between two records in ``fields`` (default :data:`COMPARED`), exact (one line each)."""
    from .eval.recompute import canonical

    out = []
    for path in fields:
        x, y = canonical(_get(a, path)), canonical(_get(b, path))
        if x != y:
            where = "/".join(path)
            if isinstance(x, dict) and isinstance(y, dict):
                keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
                out += [f"{where}/{k}: original {x.get(k)!r}, rerun {y.get(k)!r}" for k in keys]
            else:
                out.append(f"{where}: original {x!r}, rerun {y!r}")
    return out


def protocol_differences(a: dict, b: dict) -> list[str]:
    """Ways two records were not run under the same protocol (job script, config but for places, seed, lock entry).

    A rerun whose protocol differs reproduces nothing, whatever its metrics: callers check this first.
    """
    out = []
    if a["provenance"]["command"][:1] != b["provenance"]["command"][:1]:
        out.append(f"provenance/command: job {a['provenance']['command'][:1]} vs {b['provenance']['command'][:1]}")
    ca, cb = a["provenance"]["config"], b["provenance"]["config"]
    for k in sorted((set(ca) | set(cb)) - PLACE_KEYS - RESOLVED_KEYS):
        if k not in ca and not _set_on_command_line(b, k):
            continue  # an option added after the original was made, left at its default: the compared results say
            # whether that default kept the original behaviour
        if ca.get(k, "<absent>") != cb.get(k, "<absent>"):
            out.append(f"provenance/config/{k}: original {ca.get(k, '<absent>')!r}, rerun {cb.get(k, '<absent>')!r}")
    for path in (("provenance", "seed"), ("lock", "entry"), ("gate_id",)):
        if _get(a, path) != _get(b, path):
            out.append(f"{'/'.join(path)}: original {_get(a, path)!r}, rerun {_get(b, path)!r}")
    return out


def _code_dir(commit: str, *, worktree: bool, tmp: Path) -> Path:
    root = repo_root()
    if root is None:
        raise ReproduceError("covtoken is not running from a git checkout; reproduce needs the record's commit")
    if git(root, "cat-file", "-t", commit, check=False).strip() != "commit":
        raise ReproduceError(f"commit {commit[:12]} is not in this clone's history (fetch it, or a deeper clone)")
    here = code_state()
    if here["commit"] == commit and not here["dirty"]:
        return root
    if not worktree:
        state = f"{here['commit'][:12]}{' (dirty)' if here['dirty'] else ''}"
        raise ReproduceError(f"this checkout is at {state}, the record was made at {commit[:12]}: check out that "
                             "commit with a clean tree, or pass --worktree")
    dest = tmp / "covtoken"  # the package is the repository root: its folder must be named covtoken
    git(root, "worktree", "add", "--detach", str(dest), commit)
    return dest


def reproduce(record_path: str | Path, *, results: str | Path | None = None, work_dir: str | Path | None = None,
              worktree: bool = False, python: str = sys.executable, timeout: float | None = None) -> Reproduction:
    """Rerun ``record_path`` from its provenance and compare; see the module docstring.

    Args:
        record_path: the record to reproduce.
        results: where the rerun's record goes (default: a temporary folder, removed afterwards).
        work_dir: token-bank folder of the rerun (default: a fresh temporary one, so nothing cached is reused).
        worktree: run from a temporary git worktree of the record's commit when the checkout is elsewhere.
        python: interpreter of the rerun.
        timeout: seconds before the rerun is abandoned.
    """
    record_path = Path(record_path)
    rec = read_record(record_path)
    prov = rec["provenance"]
    if prov["code"]["dirty"]:
        raise ReproduceError(f"{record_path}: made from a dirty tree (diff {str(prov['code'].get('diff_sha256'))[:12]}); "
                             "a commit cannot reproduce it")
    script = prov["command"][0]
    if not script.startswith("jobs/") or not script.endswith(".py"):
        raise ReproduceError(f"{record_path}: field provenance/command: {script!r} is not a job script")
    with tempfile.TemporaryDirectory(prefix="covtoken-reproduce-") as t:
        tmp = Path(t)
        code = _code_dir(prov["code"]["commit"], worktree=worktree, tmp=tmp)
        try:
            out = Path(results) if results else tmp / "results"
            cfg = {**prov["config"], "results": str(out.resolve()), "run_id": None}
            if "lock" in cfg:  # judged under the lock of the record's commit, same entry
                cfg["lock"] = str(code / "configs" / "thresholds.lock.json")
            if "lock_entry" in cfg:
                cfg["lock_entry"] = rec["lock"]["entry"]
            if "work_dir" in cfg:
                cfg["work_dir"] = str(Path(work_dir).resolve()) if work_dir else str(tmp / "work")
            (tmp / "config.json").write_text(dumps_strict(cfg))
            before = {p.name for p in iter_record_paths(out)} if out.is_dir() else set()
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code.parent), os.environ.get("PYTHONPATH", "")]),
                   "PYTHONHASHSEED": "0"}
            proc = subprocess.run([python, str(code / script), "--config", str(tmp / "config.json")], cwd=code,
                                  env=env, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
                return Reproduction(record_path, None, [f"the rerun exited {proc.returncode}:\n{tail}"])
            new = [p for p in iter_record_paths(out) if p.name not in before and p.parent == out]
            if len(new) != 1:
                return Reproduction(record_path, None, [f"the rerun wrote {len(new)} records in {out}, expected 1"])
            try:
                rerun = read_record(new[0])
            except RecordError as exc:
                return Reproduction(record_path, new[0], [str(exc)])
            return Reproduction(record_path, new[0], compare_records(rec, rerun))
        finally:
            if code != repo_root():
                root = repo_root()
                if root is not None:
                    git(root, "worktree", "remove", "--force", str(code), check=False)
                shutil.rmtree(code, ignore_errors=True)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    try:
        rep = reproduce(args.record, results=args.results, work_dir=args.work_dir, worktree=args.worktree)
    except (ReproduceError, RecordError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    if rep.identical:
        console.print(f"[green]reproduced[/green] {rep.original}: metrics, criteria and decision identical bit for bit"
                      + (f" (rerun: {rep.rerun})" if args.results else ""))
        return 0
    console.print(f"[red]not reproduced[/red] {rep.original}:")
    for d in rep.differences:
        console.print(f"  {d}", soft_wrap=True)
    return 1


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="rerun a record from its provenance and compare every metric bit for bit")
    p.add_argument("record", help="the record (<run_id>.json) to reproduce")
    p.add_argument("--worktree", action="store_true", help="run from a temporary git worktree of the record's commit")
    p.add_argument("--results", help="keep the rerun's record here (default: a temporary folder)")
    p.add_argument("--work-dir", help="token-bank folder of the rerun (default: fresh, nothing cached)")
    p.set_defaults(fn=cmd_reproduce)
