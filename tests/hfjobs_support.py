"""Shared pieces of the HF Jobs backend tests: a committed snapshot of the working tree, the CLI in-process, a
recognisable fake token.

The snapshot is a throwaway git repository holding the files of this working tree (what git does not ignore)
in one commit, so ``covtoken submit`` sees a clean tree and the job must report that commit, which exists
nowhere else. Jobs run in the Hub emulator (tests/hub_emulator.py) as local subprocesses.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
import uuid
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import REPO_ROOT

#: The token every HF Jobs test submits with; it must never appear in anything the round trip leaves behind.
FAKE_TOKEN = "hf_covtokenFAKEtokenDoNotLeak7c1d9e2b5a"
NS = "testuser"
G1 = "jobs/g1_lesion_subspace.py"
_SKIP = ("gate_reports/", "results/", "paper/build/")
_CACHE: dict[str, Path] = {}


def snapshot_repo(base: Path) -> Path:
    """A git repo with the working tree's files in one commit (made once per process)."""
    if "repo" in _CACHE:
        return _CACHE["repo"]
    dest = base / "repo"
    listing = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", "--cached", "--others", "--exclude-standard",
                              "-z"], capture_output=True, check=True, text=True).stdout
    for rel in (p for p in listing.split("\0") if p):
        src = REPO_ROOT / rel
        if rel.startswith(_SKIP) or not src.is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    git = ["git", "-C", str(dest), "-c", "user.name=covtoken-test", "-c", "user.email=test@example.invalid"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "test snapshot of the working tree"], check=True)
    _CACHE["repo"] = dest
    return dest


def head(repo: Path, rev: str = "HEAD") -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", rev], capture_output=True, text=True,
                          check=True).stdout.strip()


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def covtoken(*argv: str, cwd: Path) -> Result:
    """Run the ``covtoken`` command line in-process from ``cwd``; returns exit code, stdout and stderr."""
    from covtoken.cli import main

    o, e = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with redirect_stdout(o), redirect_stderr(e):
            rc = main(list(argv))
    finally:
        os.chdir(old)
    return Result(rc, o.getvalue(), e.getvalue())


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HF download cache of this module's client calls (kept out of ~/.cache, and grepped for the token)."""
    return tmp_path_factory.mktemp("hf_cache")


@pytest.fixture(scope="module")
def fake_token(hub: Any, hf_cache: Path) -> Iterator[str]:
    """The emulator and the client use FAKE_TOKEN for the whole module (restored afterwards)."""
    from huggingface_hub import constants

    mp = pytest.MonkeyPatch()
    mp.setattr(hub, "token", FAKE_TOKEN)
    mp.setenv("HF_TOKEN", FAKE_TOKEN)
    mp.setattr(constants, "HF_HUB_CACHE", str(hf_cache))
    mp.setenv("COLUMNS", "400")  # rich wraps long lines at 80 columns without a terminal
    try:
        yield FAKE_TOKEN
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return snapshot_repo(tmp_path_factory.mktemp("snapshot"))


def new_repo() -> str:
    return f"{NS}/covtoken-results-{uuid.uuid4().hex[:8]}"


def jobs_of(hub: Any, run_id: str) -> list[Any]:
    """Emulator-side jobs labelled ``run=<run_id>``, by attempt."""
    jobs = [j for j in list(hub.job_manager.jobs.values()) if (j.spec.get("labels") or {}).get("run") == run_id]
    return sorted(jobs, key=lambda j: int(j.spec["labels"]["attempt"]))


def wait_until(cond: Any, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout} s")
        time.sleep(0.1)


def grep_tree(root: Path, needle: bytes) -> list[str]:
    """Files under ``root`` whose bytes contain ``needle``."""
    return [str(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


def hf_cli() -> list[str]:
    """argv prefix of the real ``hf`` CLI of this interpreter (its script, or its console entry point)."""
    import sys

    script = Path(sys.executable).parent / "hf"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys, importlib.metadata as m; "
            "(ep,) = m.entry_points(group='console_scripts', name='hf'); sys.argv[0] = 'hf'; sys.exit(ep.load()())"]


def attempt_logs(hub: Any, job_id: str) -> list[list[str]]:
    """A job's log split at the emulator's restart markers: one list of lines per try."""
    parts: list[list[str]] = [[]]
    for _, text in hub.job_manager.jobs[job_id].logs:
        if text.startswith("===== Job started again"):
            parts.append([])
        elif not text.startswith("===== Job started"):
            parts[-1].append(text)
    return parts


def log_events(lines: list[str], name: str) -> list[dict]:
    """The JSON events named ``name`` in log lines."""
    return [json.loads(ln[ln.index("{"):]) for ln in lines if f'"event": "{name}"' in ln]
