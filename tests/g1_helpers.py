"""Run the real G1 job in-process for tests (the embedded default), and load job scripts as modules."""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

from conftest import REPO_ROOT


def load_job(name: str) -> ModuleType:
    """Import ``jobs/<name>.py`` as a module (job scripts are not part of the installed package)."""
    path = REPO_ROOT / "jobs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"covtoken_job_{name}", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def run_job_smoke(job_name: str, results: Path, work: Path, lock: Path, *extra: str) -> Path:
    """Run ``jobs/<job_name>.py --smoke`` in-process into ``results``; return the one new record."""
    before = set(results.glob("*.json")) if results.exists() else set()
    rc = load_job(job_name).main(["--smoke", "--results", str(results), "--work-dir", str(work), "--lock", str(lock),
                                  *extra])
    assert rc == 0
    new = sorted(set(results.glob("*.json")) - before)
    assert len(new) == 1, new
    return new[0]


def run_g1_smoke(results: Path, work: Path, lock: Path, *extra: str) -> Path:
    """Run G1 on the embedded default into ``results``; return the record path."""
    return run_job_smoke("g1_lesion_subspace", results, work, lock, *extra)


def copy_lock(dest_dir: Path) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(REPO_ROOT / "configs" / "thresholds.lock.json", dest_dir / "thresholds.lock.json"))
