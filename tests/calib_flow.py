"""Calibration -> lock -> judged run of G1 on the embedded default, in-process, for the calibration leak cases."""
from __future__ import annotations

import json
from pathlib import Path

from covtoken.calibration_check import calibration_overlaps
from covtoken.cli import main as cli_main
from covtoken.lock import ThresholdLock
from g1_helpers import copy_lock, load_job

JOB = "g1_lesion_subspace"


def run(base: Path, *extra: str) -> Path:
    """One G1 --smoke run (judged, or calibration with ``--calibration``); returns the file it wrote."""
    results = base / ("cal" if "--calibration" in extra else "judged")
    lock = base / "thresholds.lock.json"
    if not lock.exists():
        copy_lock(base)
    assert load_job(JOB).main(["--smoke", "--results", str(results), "--work-dir", str(base.parent / "work"),
                               "--lock", str(lock), *extra]) == 0
    files = sorted((results / "calibration").glob("*.json")) if "--calibration" in extra else sorted(
        results.glob("*.json"))
    assert len(files) == 1, files
    return files[0]


def calibrate(base: Path, inputs: list[Path]) -> tuple[int, Path]:
    """``covtoken thresholds calibrate --gate G1 --entry embedded <inputs>``; returns (exit status, proposal path)."""
    out = base / "proposal.json"
    rc = cli_main(["thresholds", "calibrate", "--gate", "G1", "--entry", "embedded", "--out", str(out),
                   *map(str, inputs)])
    return rc, out


def lock_and_judge(base: Path, proposal: Path) -> list[str]:
    """Lock the proposal into the run's lock copy, run a judged G1, return the audit's calibration check on it."""
    lock = base / "thresholds.lock.json"
    assert cli_main(["thresholds", "lock", str(proposal), "--lock", str(lock), "--supersede"]) == 0
    record = run(base)
    return calibration_overlaps(ThresholdLock.load(lock), [(str(record), json.loads(record.read_text()))])
