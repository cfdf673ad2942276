"""The code bundle an HF Job runs: the kit wheel built at one commit, the job script, the lock, the pins, a launcher.

Layout of a bundle folder (committed to the results dataset repo under ``runs/<run_id>/code/`` and mounted
read-only at ``/code`` in the job, pinned to the commit of that upload)::

    covtoken-<version>-py3-none-any.whl   the kit, ``pip wheel --no-deps`` of the source at the commit
    launch.py                             the stdlib-only launcher (``hfjobs/launcher.py`` of the same source)
    jobs/<name>.py                        the job script
    configs/thresholds.lock.json          the threshold lock, and configs/gates/*.json (gate templates)
    constraints.txt                       the pinned versions the job installs with
    build-info.json                       commit, dirty flag, diff hash, sha256 of every other file

A clean tree is exported with ``git archive <commit>``, so nothing uncommitted can slip in; a dirty tree
(``--allow-dirty`` only) is copied as it is on disk and the bundle says so, with the hash of the diff. The
wheel is built with ``SOURCE_DATE_EPOCH`` set to the commit time, so the same commit gives the same bytes.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..provenance import EXCLUDED_FROM_DIRTY, _dirty_state
from ..record import dumps_strict, loads_strict, sha256_file, write_json_atomic
from .errors import HFJobsError

__all__ = ["BundleError", "SourceState", "source_state", "build_bundle", "read_build_info", "verify_bundle",
           "bundle_digest", "BUILD_INFO", "LAUNCHER"]

log = logging.getLogger(__name__)
BUILD_INFO = "build-info.json"
LAUNCHER = "launch.py"
#: Where the launcher lives in the source tree.
LAUNCHER_SOURCE = "hfjobs/launcher.py"
#: Files of the source tree, besides the job script and the wheel, that every bundle carries.
BUNDLE_CONFIGS = ("configs/thresholds.lock.json", "constraints.txt")
BUNDLE_GLOBS = ("configs/gates/*.json",)


class BundleError(HFJobsError):
    """The bundle cannot be built or does not verify; the message names the file or the git state."""


@dataclass(frozen=True)
class SourceState:
    """The git state a bundle is built from.

    Attributes:
        root: the work tree.
        commit: HEAD (40 hex).
        dirty: uncommitted changes outside results folders.
        diff_sha256: hash of those changes (as ``provenance.code_state`` computes it), None when clean.
        changed: the changed paths (for the error message).
    """

    root: Path
    commit: str
    dirty: bool
    diff_sha256: str | None
    changed: tuple[str, ...]


def _git(root: Path, *args: str) -> str:
    res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise BundleError(f"git {' '.join(args)} failed in {root}: {res.stderr.strip()}")
    return res.stdout


def source_state(path: str | Path) -> SourceState:
    """The git work tree containing ``path``, its HEAD and whether it is dirty.

    Raises:
        BundleError: ``path`` is not in a git work tree with a commit.
    """
    path = Path(path).resolve()
    start = path if path.is_dir() else path.parent
    try:
        root = Path(_git(start, "rev-parse", "--show-toplevel").strip())
        commit = _git(root, "rev-parse", "HEAD").strip()
    except BundleError as exc:
        raise BundleError(f"{path}: not inside a git checkout with a commit; the job must run committed code "
                          f"({exc})") from None
    status = _git(root, "status", "--porcelain", "--untracked-files=all")
    changed = tuple(sorted(ln[3:] for ln in status.splitlines()
                           if ln[3:] and not ln[3:].startswith(EXCLUDED_FROM_DIRTY)))
    dirty, diff_hash = _dirty_state(root) if changed else (False, None)
    return SourceState(root=root, commit=commit, dirty=dirty, diff_sha256=diff_hash, changed=changed)


def _export_source(state: SourceState, dest: Path) -> None:
    """The committed tree (clean) or the files on disk that git does not ignore (dirty) into ``dest``."""
    dest.mkdir(parents=True)
    if not state.dirty:
        tar = subprocess.run(["git", "-C", str(state.root), "archive", "--format=tar", state.commit],
                             capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
            tf.extractall(dest, filter="data")
        return
    listing = _git(state.root, "ls-files", "--cached", "--others", "--exclude-standard", "-z")
    for rel in sorted(p for p in listing.split("\0") if p):
        src = state.root / rel
        if rel.startswith(EXCLUDED_FROM_DIRTY) or not src.is_file():
            continue  # results folders, and tracked files deleted on disk
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)


def _commit_time(state: SourceState) -> int:
    return int(_git(state.root, "show", "-s", "--format=%ct", state.commit).strip())


def _build_wheel(src: Path, out: Path, epoch: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
           "-w", str(out), str(src)]
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=src)
    wheels = sorted(out.glob("covtoken-*.whl"))
    if res.returncode != 0 or len(wheels) != 1:
        tail = (res.stdout + res.stderr).strip().splitlines()[-15:]
        raise BundleError(f"building the kit wheel from {src} failed (exit {res.returncode}; it is built offline "
                          "without build isolation, so setuptools>=75 must be installed here): " + "\n".join(tail))
    return wheels[0]


def _bundle_key(state: SourceState) -> str:
    return state.commit + (f"-dirty-{state.diff_sha256[:16]}" if state.dirty else "")


def build_bundle(state: SourceState, job: str | Path, cache_dir: str | Path) -> Path:
    """Build (or reuse from ``cache_dir``) the bundle of ``job`` at ``state``; returns the bundle folder.

    Args:
        state: from :func:`source_state`.
        job: the job script, relative to the work tree (e.g. ``jobs/g1_lesion_subspace.py``).
        cache_dir: bundles are kept under ``<cache_dir>/<commit>[-dirty-<hash>]/<job stem>/``; a cached one
            is reused only if it verifies.

    Raises:
        BundleError: the job is not part of the exported source, or the wheel does not build.
    """
    job = Path(job).as_posix()
    dest = Path(cache_dir) / _bundle_key(state) / Path(job).stem
    if (dest / BUILD_INFO).is_file():
        try:
            verify_bundle(dest)
            log.info("reusing bundle %s", dest)
            return dest
        except BundleError as exc:
            log.warning("cached bundle %s does not verify (%s); rebuilding", dest, exc)
            shutil.rmtree(dest)
    with tempfile.TemporaryDirectory(prefix="covtoken-bundle-") as tmp:
        src, stage = Path(tmp) / "src", Path(tmp) / "bundle"
        _export_source(state, src)
        if not (src / job).is_file():
            raise BundleError(f"{job}: not in the {'working tree' if state.dirty else f'commit {state.commit[:12]}'}"
                              " (commit the job script before submitting it)")
        if not (src / LAUNCHER_SOURCE).is_file():
            raise BundleError(f"{LAUNCHER_SOURCE}: missing from the source at {state.commit[:12]}")
        epoch = _commit_time(state)
        wheel = _build_wheel(src, Path(tmp) / "wheel", epoch)
        stage.mkdir()
        shutil.copy2(wheel, stage / wheel.name)
        shutil.copy2(src / LAUNCHER_SOURCE, stage / LAUNCHER)
        extra = list(BUNDLE_CONFIGS) + [p.relative_to(src).as_posix()
                                        for g in BUNDLE_GLOBS for p in sorted(src.glob(g))]
        for rel in [job, *extra]:
            if not (src / rel).is_file():
                raise BundleError(f"{rel}: missing from the source at {state.commit[:12]}; every bundle needs it")
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, stage / rel)
        files = {p.relative_to(stage).as_posix(): sha256_file(p) for p in sorted(stage.rglob("*")) if p.is_file()}
        tree = _git(state.root, "rev-parse", f"{state.commit}^{{tree}}").strip() or None
        info = {"kind": "covtoken.code_bundle", "version": 1, "commit": state.commit, "tree": tree,
                "dirty": state.dirty, "diff_sha256": state.diff_sha256, "job": job, "wheel": wheel.name, "launcher": LAUNCHER,
                "source_date_epoch": epoch, "files": files}
        write_json_atomic(stage / BUILD_INFO, info)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp_dest = dest.parent / f".{dest.name}.{os.getpid()}"
        shutil.copytree(stage, tmp_dest)
        os.replace(tmp_dest, dest)
    log.info("built bundle %s (%s, %d files)", dest, wheel.name, len(files) + 1)
    return dest


def read_build_info(bundle: str | Path) -> dict:
    """``build-info.json`` of a bundle folder."""
    path = Path(bundle) / BUILD_INFO
    if not path.is_file():
        raise BundleError(f"{path}: missing; not a covtoken code bundle")
    info = loads_strict(path.read_text(), source=str(path))
    for key in ("commit", "dirty", "job", "wheel", "files"):
        if key not in info:
            raise BundleError(f"{path}: field {key}: missing")
    return info


def verify_bundle(bundle: str | Path) -> dict:
    """Check every file of a bundle against its build info (and that no other file is there)."""
    bundle = Path(bundle)
    info = read_build_info(bundle)
    for rel, want in info["files"].items():
        f = bundle / rel
        if not f.is_file():
            raise BundleError(f"{f}: listed in {BUILD_INFO} but missing")
        if sha256_file(f) != want:
            raise BundleError(f"{f}: sha256 does not match {BUILD_INFO} field files/{rel}")
    present = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    extra = sorted(present - set(info["files"]) - {BUILD_INFO})
    if extra:
        raise BundleError(f"{bundle}: files not listed in {BUILD_INFO}: {extra}")
    return info


def bundle_digest(bundle: str | Path) -> str:
    """sha256 of the canonical build info: one id for the whole bundle."""
    info = read_build_info(bundle)
    return hashlib.sha256(dumps_strict(info).encode()).hexdigest()
