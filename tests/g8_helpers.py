"""Shared by the G8 job tests (2-D and 3-D): a lock whose entry runs a tiny protocol, and the kill-and-resume run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from covtoken.lock import ThresholdLock, lock_entry, write_lock
from g1_helpers import copy_lock


def tiny_lock(dest: Path, entry: str, parameters: dict) -> Path:
    """A copy of the lock whose ``G8/<entry>`` runs ``parameters`` (3-shot kNN as the primary criterion), locked
    through the kit's own function."""
    path = copy_lock(dest)
    doc = json.loads(path.read_text())
    e = ThresholdLock(doc).entry(f"G8/{entry}")
    criteria = [dict(c, metric="knn3_balanced_accuracy_gain") if c["metric"].startswith("knn") else dict(c)
                for c in e.criteria]
    new = lock_entry(doc, gate_id="G8", claim=e.claim, name=entry, criteria=criteria, parameters=parameters,
                     calibration={"method": "test fixture"}, supersede=True)
    write_lock(new, path)
    return path


def kill_and_resume(cmd: Callable[[Path, Path, str], list[str]], tmp: Path, *, run_id: str, unbroken_id: str,
                    poll: float = 0.05) -> tuple[list[dict], Path]:
    """Run ``cmd(results, work, run_id)``, SIGKILL it once its first checkpoint is in the manifest, run the same
    command again (the rerun of a killed run keeps its id: the ledger sees a resume), and run an unbroken copy in
    ``results2``/``work2``. Returns the checkpoints the killed attempt had written and the manifest's path."""
    results, work = tmp / "results", tmp / "work"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd(results, work, run_id), cwd=tmp, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    manifest = None
    while time.time() < deadline and proc.poll() is None:
        found = list(work.glob("lejepa/*/manifest.json"))
        if found and json.loads(found[0].read_text())["shards"]:
            manifest = found[0]
            break
        time.sleep(poll)
    assert manifest is not None, "the job never wrote a checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = json.loads(manifest.read_text())["shards"]
    assert not list(results.glob("*.json")), "a killed run must leave no record"
    for out, rid in ((results, run_id), (tmp / "results2", unbroken_id)):
        rc = subprocess.run(cmd(out, out.parent / out.name.replace("results", "work"), rid), cwd=tmp, env=env,
                            capture_output=True, text=True)
        assert rc.returncode == 0, rc.stderr[-3000:]
    return first, manifest


def assert_resumed_like_unbroken(tmp: Path, first: list[dict], manifest: Path) -> tuple[dict, dict]:
    """The resumed run kept what the killed attempt wrote, ends with the unbroken run's checkpoints, and says it
    resumed; returns both records (resumed, unbroken)."""
    from covtoken.record import read_record

    resumed = json.loads(manifest.read_text())["shards"]
    unbroken = json.loads(next((tmp / "work2").glob("lejepa/*/manifest.json")).read_text())["shards"]
    assert resumed[:len(first)] == first  # what the killed attempt wrote is kept, not redone
    assert [c["sha256"] for c in resumed] == [c["sha256"] for c in unbroken]
    a = read_record(next((tmp / "results").glob("*.json")))
    assert any("resumed from the checkpoint" in n for n in a["notes"])
    return a, read_record(next((tmp / "results2").glob("*.json")))


def assert_blind_to_masks(outputs: Callable, data, ref: dict, tmp: Path) -> None:  # noqa: ANN001 (LoadedDataset)
    """``outputs(data, folder)`` is bit-identical to ``ref`` with the masks permuted and with them zeroed."""
    import numpy as np

    from test_label_leak import with_masks

    for how in ("permuted", "zeroed"):
        out = outputs(with_masks(data, how), tmp / how)
        assert out.keys() == ref.keys()
        for k in ref:
            assert np.array_equal(out[k], ref[k]), f"{k} changed with {how} masks"


def stage_setting(dataset: str, parameters: dict, **cfg: object) -> tuple:
    """``(job, data, splits, parameters, config)`` for calling a G8 label-free stage directly (seed-5 phantoms)."""
    from dataclasses import replace

    from covtoken.data.catalog import load_dataset
    from covtoken.data.splits import split_patients
    from g1_helpers import load_job

    job = load_job("g8_lejepa_pretrain")
    data = load_dataset(dataset, seed=5, **parameters["dataset_options"])
    splits = split_patients([it.patient_id for it in data.items], fractions=parameters["split_fractions"], seed=0)
    return job, data, splits, parameters, replace(job.G8Config(), **cfg)
