"""Where a run came from: code commit and dirty flag, package versions, Python/torch/CUDA, device, timing.

The code commit is read from git when the kit runs from a checkout, or from the bundle an HF Job installs
from (``COVTOKEN_CODE_COMMIT`` / ``COVTOKEN_CODE_DIRTY`` set by the job launcher). If neither is available
the run fails: a record never says "unknown".
"""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

__all__ = ["ProvenanceError", "code_state", "package_versions", "runtime", "git", "repo_root", "EXCLUDED_FROM_DIRTY"]

#: Paths that change while a run is in progress (its own results) and so do not make the code dirty.
EXCLUDED_FROM_DIRTY = ("gate_reports/", "paper/build/", "results/")
PACKAGES = ("covtoken", "torch", "torchvision", "timm", "open_clip_torch", "transformers", "huggingface_hub",
            "datasets", "numpy", "scipy", "scikit-learn", "jsonschema", "nibabel", "pydicom", "matplotlib",
            "safetensors", "pillow")


class ProvenanceError(RuntimeError):
    """The origin of the code cannot be established."""


def repo_root() -> Path | None:
    """The git work tree the kit is imported from, or None when installed from a wheel."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    top = Path(out.stdout.strip()).resolve()
    return top if top == here else None


def git(root: Path, *args: str, check: bool = True) -> str:
    """Run a git command in ``root`` and return stdout."""
    res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise ProvenanceError(f"git {' '.join(args)} failed in {root}: {res.stderr.strip()}")
    return res.stdout


def _dirty_state(root: Path) -> tuple[bool, str | None]:
    status = git(root, "status", "--porcelain", "--untracked-files=all")
    changed = [ln[3:] for ln in status.splitlines() if ln[3:] and not ln[3:].startswith(EXCLUDED_FROM_DIRTY)]
    if not changed:
        return False, None
    h = hashlib.sha256()
    excludes = [f":(exclude){p}" for p in EXCLUDED_FROM_DIRTY]
    h.update(subprocess.run(["git", "-C", str(root), "diff", "HEAD", "--binary", "--", ".", *excludes],
                            capture_output=True, check=True).stdout)
    for rel in sorted(changed):
        f = root / rel
        h.update(rel.encode())
        if f.is_file():
            h.update(f.read_bytes())
    return True, h.hexdigest()


def code_state() -> dict:
    """``{"commit", "dirty", "diff_sha256", "source", "tree"}`` for the running code (``tree``: the commit's git
    tree id, which the audit checks against the commit; None when a bundle does not say).

    Raises:
        ProvenanceError: when neither a git checkout nor a bundle commit is available.
    """
    root = repo_root()
    if root is not None:
        commit = git(root, "rev-parse", "HEAD", check=False).strip()
        if len(commit) == 40:
            dirty, diff_hash = _dirty_state(root)
            tree = git(root, "rev-parse", f"{commit}^{{tree}}", check=False).strip() or None
            return {"commit": commit, "dirty": dirty, "diff_sha256": diff_hash, "source": "git", "tree": tree}
    commit = os.environ.get("COVTOKEN_CODE_COMMIT", "")
    if len(commit) == 40:
        dirty = os.environ.get("COVTOKEN_CODE_DIRTY", "0") == "1"
        return {"commit": commit, "dirty": dirty, "diff_sha256": os.environ.get("COVTOKEN_CODE_DIFF_SHA256") or None,
                "source": "bundle", "tree": os.environ.get("COVTOKEN_CODE_TREE") or None}
    raise ProvenanceError("cannot establish the code commit: not a git checkout with a commit, and "
                          "COVTOKEN_CODE_COMMIT is not set by a job bundle")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def cpu_model() -> str | None:
    """The CPU's model name (Linux ``/proc/cpuinfo``, else ``platform.processor()``); None when unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return platform.processor() or None


def runtime(device: str) -> dict:
    """Python, torch, CUDA and device fields of a record."""
    import torch

    dev = {"type": "cpu", "name": platform.processor() or platform.machine() or "cpu"}
    cuda = torch.version.cuda if torch.cuda.is_available() else None
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ProvenanceError("device 'cuda' requested but no CUDA device is available")
        dev = {"type": "cuda", "name": torch.cuda.get_device_name(torch.device(device)),
               "count": torch.cuda.device_count()}
    dev["cpu_count"] = os.cpu_count() or 0
    dev["platform"] = platform.platform()
    model = cpu_model()
    if model:
        dev["cpu_model"] = model  # float kernels (BLAS, oneDNN) differ by CPU: part of "same host" for reproduction
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": cuda, "device": dev}
