"""A job killed at any stage boundary resumes under its own run id to an identical record, nothing left behind.

G1 (every stage) and G4 (the stages of its own code: its label-free scores and conformal certificates) on the
embedded default run as subprocesses; each is SIGKILLed right after each of those stages ends, then rerun with the same ``--run-id``. The resumed record must carry the same metrics, criteria and decision as an
uninterrupted run, the results folder must hold exactly one record and one artefact folder, no staging
leftover, and the audit must pass (the ledger shows the start and the resume).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from covtoken.audit import audit_folder
from covtoken.record import new_run_id
from covtoken.runner import Run
from covtoken.runstore import STAGING, commit_run, read_ledger

LOCK = REPO_ROOT / "configs" / "thresholds.lock.json"
#: gate -> (job script, the stages it is killed after, in order): every stage G1 announces; for G4 the stages its
#: own code runs (the first three are the runner's, the same code as G1's, so killing there again tests nothing new)
JOBS = {"G1": ("g1_lesion_subspace", ("load_data", "data_checks", "backbone", "label_free_scores", "evaluate")),
        "G4": ("g4_conformal_retention", ("label_free_scores", "certificates"))}
COMPARED = ("metrics", "criteria", "decision", "decision_reason")


def _cmd(gate: str, results: Path, work: Path, run_id: str) -> list[str]:
    job = REPO_ROOT / "jobs" / f"{JOBS[gate][0]}.py"
    return [sys.executable, str(job), "--smoke", "--results", str(results), "--work-dir", str(work), "--lock", str(LOCK),
            "--run-id", run_id]


def _run(gate: str, results: Path, work: Path, run_id: str, *, kill_after: str | None = None) -> int:
    proc = subprocess.Popen(_cmd(gate, results, work, run_id), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    marker = f'"event": "stage_end", "stage": "{kill_after}"'
    seen = False
    for line in proc.stderr:
        if kill_after and marker in line:
            os.kill(proc.pid, signal.SIGKILL)
            seen = True
            break
    proc.stderr.close()
    rc = proc.wait(timeout=600)
    assert seen or not kill_after, f"{gate} never announced the end of stage {kill_after!r} (exit {rc})"
    return rc


_REFERENCES: dict[str, tuple[dict, Path]] = {}


@pytest.fixture
def reference(request, tmp_path_factory) -> tuple[dict, Path]:  # noqa: ANN001
    """The gate's uninterrupted run (made once per session) and its token-bank folder."""
    gate = request.node.callspec.params["gate"]
    if gate not in _REFERENCES:
        base = tmp_path_factory.mktemp(f"kill-{gate}")
        rid = new_run_id(gate)
        assert _run(gate, base / "ref", base / "work", rid) == 0
        _REFERENCES[gate] = json.loads((base / "ref" / f"{rid}.json").read_text()), base / "work"
    return _REFERENCES[gate]


@pytest.mark.slow
@pytest.mark.parametrize(("gate", "stage"), [(g, st) for g, (_, stages) in JOBS.items() for st in stages])
def test_killed_after_stage_resumes_identically(gate, stage, reference, tmp_path):
    ref, work = reference
    results = tmp_path / "results"
    rid = new_run_id(gate)
    assert _run(gate, results, work, rid, kill_after=stage) == -signal.SIGKILL
    assert not (results / f"{rid}.json").exists()
    assert not (results / "artefacts" / rid).exists(), "artefacts appeared without their record"
    assert _run(gate, results, work, rid) == 0, "the killed run did not resume under its run id"
    rec = json.loads((results / f"{rid}.json").read_text())
    for k in COMPARED:
        assert rec[k] == ref[k], k
    assert sorted(p.name for p in results.glob("*.json")) == [f"{rid}.json"]
    assert sorted(p.name for p in (results / "artefacts").iterdir()) == [rid]
    assert not (results / STAGING).exists(), "staging leftovers"
    events = [(e["run_id"], e["event"]) for e in read_ledger(results)]
    assert events == [(rid, "start"), (rid, "resume")]
    rep = audit_folder(results, lock_path=LOCK, allow_dirty=rec["provenance"]["code"]["dirty"])
    assert rep.ok, rep.all_problems()


def test_interrupted_commit_is_completed_on_resume(tmp_path):
    """Killed between moving the artefacts into place and linking the record: rerunning finishes the commit."""
    from covtoken.runner import JobConfig

    results = tmp_path / "r"
    rid = new_run_id("G1")
    run = Run(gate_id="G1", results_dir=results, lock_entry="G1/embedded", lock_path=LOCK, config=JobConfig(), seed=0,
              run_id=rid)
    run.artefacts.json("a.json", {"x": 1}, description="test")
    staged = run.staging
    (staged / f"{rid}.json").write_text("{}")
    (results / "artefacts").mkdir()
    os.rename(staged / "artefacts" / rid, results / "artefacts" / rid)  # the kill came after this rename
    with pytest.raises(FileExistsError, match="interrupted commit"):
        Run(gate_id="G1", results_dir=results, lock_entry="G1/embedded", lock_path=LOCK, config=JobConfig(), seed=0,
            run_id=rid)
    assert (results / f"{rid}.json").is_file() and (results / "artefacts" / rid / "a.json").is_file()
    assert not (results / STAGING).exists()


def test_staged_artefacts_never_appear_before_the_record(tmp_path):
    from covtoken.runner import JobConfig

    results = tmp_path / "r"
    rid = new_run_id("G1")
    run = Run(gate_id="G1", results_dir=results, lock_entry="G1/embedded", lock_path=LOCK, config=JobConfig(), seed=0,
              run_id=rid)
    run.artefacts.json("a.json", {"x": 1}, description="test")
    assert not (results / "artefacts").exists()
    assert (results / STAGING / rid / "artefacts" / rid / "a.json").is_file()
    # a rerun under the same id discards the partial attempt and logs a resume
    Run(gate_id="G1", results_dir=results, lock_entry="G1/embedded", lock_path=LOCK, config=JobConfig(), seed=0,
        run_id=rid)
    assert not (results / STAGING / rid / "artefacts").exists()
    assert [e["event"] for e in read_ledger(results)] == ["start", "resume"]
    with pytest.raises(FileNotFoundError):
        commit_run(results, rid)  # nothing staged to commit: never a record without its run
