# /// script
# requires-python = ">=3.11"
# dependencies = []
# ///
"""covtoken job launcher: runs a code bundle's job script on the bundle's own code inside an HF Job.

Shipped in every bundle as ``launch.py`` and started by the job's command::

    python /code/launch.py [JOB ARGS...]

Steps:
  1. verify every bundle file against ``build-info.json`` (the mount is read-only and pinned; this also
     catches a bundle assembled by hand);
  2. unpack the kit wheel into ``<work>/kit`` and put it first on ``PYTHONPATH``, so ``import covtoken`` is
     the bundle's code whatever else the interpreter has installed;
  3. check that the interpreter has the wheel's dependencies at the versions pinned in ``constraints.txt``;
     if not, create ``<work>/venv`` on top of the image's own packages (``--system-site-packages``: the GPU
     image's torch is kept when it is the pinned one) and install the wheel there with those constraints
     (``uv pip install``, else ``pip install``), so only the kit and what the image lacks are installed; log
     which distributions were installed and how many bytes; run the job with that interpreter;
  4. with ``--covtoken-state DIR`` first among the arguments (``covtoken submit --bucket``), check the state
     bucket is mounted read-write at DIR and pass it on as ``COVTOKEN_STATE_DIR``; claim which try of its attempt
     this container is (``python -m covtoken.hfjobs.hubsync claim``: the Hub's own retries rerun the same job,
     and each try's log gets its own name); then
     run ``jobs/<name>.py`` from ``<work>/run`` (holding a copy of the bundle's ``configs/``) with
     ``COVTOKEN_CODE_COMMIT`` / ``_DIRTY`` / ``_DIFF_SHA256`` taken from the build info, tee its output to
     ``<work>/logs/attempt-<n>.log`` with the HF token redacted, while ``python -m covtoken.hfjobs.hubsync logs``
     uploads that file to the results repo when the job has not done so within ``COVTOKEN_COMMIT_EVERY_S``;
  5. exit with the job's exit code.

Standard library only: it runs before anything is installed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import zipfile
from importlib import metadata
from pathlib import Path
from typing import IO

BUILD_INFO = "build-info.json"
STATE_FLAG = "--covtoken-state"  # spec.STATE_FLAG (this file imports nothing from the kit)
PREFIX = "[covtoken-launch]"
REDACTED = "<redacted>"


class LaunchError(RuntimeError):
    """The bundle or the environment is not fit to run the job; the message names the file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(bundle: Path) -> dict:
    """Read ``build-info.json`` and check the sha256 of every file it lists."""
    path = bundle / BUILD_INFO
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LaunchError(f"{path}: unreadable build info ({exc})") from None
    for rel, want in info.get("files", {}).items():
        f = bundle / rel
        if not f.is_file() or _sha256(f) != want:
            raise LaunchError(f"{f}: missing or not matching {BUILD_INFO} field files/{rel}")
    for key in ("commit", "job", "wheel"):
        if key not in info:
            raise LaunchError(f"{path}: field {key}: missing")
        if key != "commit" and info[key] not in info.get("files", {}):
            raise LaunchError(f"{path}: field files: {info[key]} (the {key}) is not listed")
    return info


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_requirements(wheel: Path) -> list[str]:
    """Names of the wheel's unconditional ``Requires-Dist`` entries (extras are skipped)."""
    with zipfile.ZipFile(wheel) as zf:
        meta = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        if len(meta) != 1:
            raise LaunchError(f"{wheel}: expected one .dist-info/METADATA, found {meta}")
        text = zf.read(meta[0]).decode()
    names = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        if ";" in req and "extra" in req.split(";", 1)[1]:
            continue
        m = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req)
        if m:
            names.append(m.group(0))
    return names


def read_pins(constraints: Path) -> dict[str, str]:
    """``name==version`` lines of a constraints file, keyed by normalised name."""
    pins = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_norm(name)] = version.strip()
    return pins


def missing_requirements(requirements: list[str], pins: dict[str, str]) -> list[str]:
    """Requirements this interpreter lacks, or has at another version than the pinned one."""
    out = []
    for name in requirements:
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            out.append(f"{name} (not installed)")
            continue
        want = pins.get(_norm(name))
        if want is not None and have != want:
            out.append(f"{name} ({have} installed, {want} pinned)")
    return out


def unpack_wheel(wheel: Path, dest: Path) -> Path:
    """Unzip a pure-Python wheel into ``dest`` (what an install puts in site-packages)."""
    if dest.exists():
        shutil.rmtree(dest)
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(dest)
    return dest


class Tee:
    """Writes lines to stdout and a log file, replacing each secret value with ``<redacted>``."""

    def __init__(self, log_path: Path, secrets: list[str]) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.fh: IO[str] = open(log_path, "a", encoding="utf-8")
        self.secrets = [s for s in secrets if s and len(s) >= 8]
        self.lock = threading.Lock()

    def line(self, text: str) -> None:
        for s in self.secrets:
            text = text.replace(s, REDACTED)
        with self.lock:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
            self.fh.write(text + "\n")
            self.fh.flush()

    def say(self, text: str) -> None:
        self.line(f"{PREFIX} {text}")

    def pump(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            self.line(raw.decode("utf-8", "replace").rstrip("\r\n"))

    def close(self) -> None:
        self.fh.close()


_CHILDREN: list[subprocess.Popen] = []


def run_logged(tee: Tee, cmd: list[str], **kw) -> int:
    """Run ``cmd`` with its merged output going through ``tee``; returns the exit code."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
    _CHILDREN.append(proc)
    try:
        assert proc.stdout is not None
        tee.pump(proc.stdout)
        return proc.wait()
    finally:
        _CHILDREN.remove(proc)


def forward_sigterm(signum: int, _frame: object) -> None:
    """The container's stop signal reaches the launcher (PID 1) only: pass it to the job, which commits its
    pending shards and exits; the launcher then uploads the log and ends with the job's exit code."""
    for proc in list(_CHILDREN):
        if proc.poll() is None:
            proc.send_signal(signum)


def installed_distributions(venv: Path) -> dict[str, int]:
    """``name-version`` -> bytes of every distribution installed in ``venv`` itself (not the image's)."""
    out = {}
    for sp in sorted(venv.glob("lib/python*/site-packages")):
        for dist in sorted(sp.glob("*.dist-info")):
            size = 0
            record = dist / "RECORD"
            if record.is_file():
                for line in record.read_text(errors="replace").splitlines():
                    rel = line.split(",", 1)[0]
                    f = sp / rel
                    if rel and f.is_file():
                        size += f.stat().st_size
            out[dist.name[:-len(".dist-info")]] = size
    return out


def install_environment(tee: Tee, wheel: Path, constraints: Path, venv: Path) -> Path:
    """Create ``venv`` over the image's packages and install ``wheel`` with ``constraints``; returns its python.

    The image's own distributions stay visible (``--system-site-packages``), so the installer adds only what
    is missing or not at the pinned version. What it installed, and how many bytes, is logged.
    """
    uv = shutil.which("uv")
    python = venv / "bin" / "python"
    if venv.exists():  # a Hub-native retry in the same container: start clean
        shutil.rmtree(venv)
    if uv:
        steps = [[uv, "venv", "--system-site-packages", "--python", sys.executable, str(venv)],
                 [uv, "pip", "install", "--python", str(python), "--constraint", str(constraints), str(wheel)]]
    else:
        steps = [[sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                 [str(python), "-m", "pip", "install", "--constraint", str(constraints), str(wheel)]]
    for cmd in steps:
        tee.say("$ " + " ".join(cmd))
        rc = run_logged(tee, cmd)
        if rc != 0:
            raise LaunchError(f"installing {wheel.name} with {constraints.name} failed: {cmd[:3]} exited {rc}")
    dists = installed_distributions(venv)
    dists = {k: v for k, v in dists.items() if not k.split("-")[0] in ("pip", "setuptools", "wheel")}
    total = sum(dists.values())
    tee.say(f"installed {len(dists)} distribution(s), {total} bytes ({total / 1e6:.1f} MB) into {venv}: "
            + ", ".join(f"{k} ({v} B)" for k, v in dists.items()))
    tee.say(json.dumps({"event": "install_done", "distributions": len(dists), "bytes": total,
                        "installed": sorted(dists)}))
    return python


def work_dir() -> Path:
    """``$COVTOKEN_WORK_DIR``, else ``./covtoken-run`` when writable, else the temp folder."""
    if os.environ.get("COVTOKEN_WORK_DIR"):
        return Path(os.environ["COVTOKEN_WORK_DIR"])
    here = Path.cwd()
    return (here if os.access(here, os.W_OK) else Path(tempfile.gettempdir())) / "covtoken-run"


def claim_try(tee: Tee, python: Path, env: dict[str, str]) -> int:
    """``python -m covtoken.hfjobs.hubsync claim``: which try of its attempt this container is (the Hub's own
    retries, ``--attempts``, rerun the same job with the same environment), so that each try uploads its log
    under its own name and none overwrites another's."""
    cmd = [str(python), "-m", "covtoken.hfjobs.hubsync", "claim"]
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    for line in proc.stderr.splitlines():
        tee.line(line)
    lines = proc.stdout.split()
    if proc.returncode != 0 or not lines or not lines[-1].isdigit():
        raise LaunchError(f"could not claim this job's try in the results repo ({' '.join(cmd[1:])} exited "
                          f"{proc.returncode}); the log of this try would overwrite another's")
    k = int(lines[-1])
    tee.say(f"attempt {env.get('COVTOKEN_ATTEMPT', '?')} try {k}" + (" (a retry by the Hub: its log is uploaded "
                                                                       "under its own name)" if k else ""))
    return k


def start_log_sidecar(tee: Tee, python: Path, log_path: Path, env: dict[str, str]) -> subprocess.Popen | None:
    """``python -m covtoken.hfjobs.hubsync logs`` uploading ``log_path`` periodically (HF backend only)."""
    if env.get("COVTOKEN_BACKEND") != "hf-jobs" or not env.get("COVTOKEN_RESULTS_REPO"):
        tee.say("no results repo configured: logs stay in the job")
        return None
    cmd = [str(python), "-m", "covtoken.hfjobs.hubsync", "logs", "--file", str(log_path)]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    threading.Thread(target=tee.pump, args=(proc.stdout,), daemon=True).start()
    return proc


def stop_log_sidecar(tee: Tee, proc: subprocess.Popen | None) -> None:
    """SIGTERM the sidecar (it uploads the log one last time) and wait for it."""
    if proc is None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        tee.say("log sidecar did not finish its last upload in 120 s; killed")


def split_state(argv: list[str]) -> tuple[Path | None, list[str]]:
    """``--covtoken-state DIR JOB ARGS...`` -> (DIR, JOB ARGS): where the state bucket is mounted, when it leads."""
    if argv[:1] == [STATE_FLAG]:
        if len(argv) < 2:
            raise LaunchError(f"{STATE_FLAG} needs the bucket's mount path")
        return Path(argv[1]), argv[2:]
    return None, argv


def main(argv: list[str] | None = None) -> int:
    """Run the bundle's job with ``argv`` as its arguments; returns its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    bundle = Path(__file__).resolve().parent
    work = work_dir()
    attempt = os.environ.get("COVTOKEN_ATTEMPT", "0")
    log_path = work / "logs" / f"attempt-{attempt}.log"
    tee = Tee(log_path, [os.environ.get("HF_TOKEN", "")])
    sidecar = None
    signal.signal(signal.SIGTERM, forward_sigterm)
    try:
        state, argv = split_state(argv)
        info = verify(bundle)
        tee.say(f"bundle {bundle}: commit {info['commit']} dirty={info.get('dirty')} job {info['job']} "
                f"(sha256 {info['files'][info['job']]}); {len(info['files'])} files verified")
        tee.say(f"image {os.environ.get('COVTOKEN_IMAGE') or '(COVTOKEN_IMAGE not set)'} (as launched; the "
                "registry checked any digest when the image was pulled)")
        kit = unpack_wheel(bundle / info["wheel"], work / "kit")
        missing = missing_requirements(wheel_requirements(bundle / info["wheel"]),
                                       read_pins(bundle / "constraints.txt"))
        if missing:
            tee.say(f"installing the kit's dependencies into {work / 'venv'}: missing or not at the pinned "
                    f"version: {', '.join(missing)}")
            python = install_environment(tee, bundle / info["wheel"], bundle / "constraints.txt", work / "venv")
        else:
            python = Path(sys.executable)
            tee.say(f"{python} already has every dependency at its pinned version; nothing to install "
                    "(installed 0 distribution(s), 0 bytes)")
        run_dir = work / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        if (run_dir / "configs").exists():
            shutil.rmtree(run_dir / "configs")
        shutil.copytree(bundle / "configs", run_dir / "configs")
        env = dict(os.environ)
        env.update(COVTOKEN_CODE_COMMIT=info["commit"], COVTOKEN_CODE_DIRTY="1" if info.get("dirty") else "0",
                   COVTOKEN_CODE_DIFF_SHA256=info.get("diff_sha256") or "", COVTOKEN_CODE_TREE=info.get("tree") or "",
                   COVTOKEN_KIT_DIR=str(kit),
                   COVTOKEN_BUNDLE_DIR=str(bundle), COVTOKEN_LOG_FILE=str(log_path), PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(kit), *filter(None, [os.environ.get("PYTHONPATH")])]))
        if state is not None:
            if not state.is_dir() or not os.access(state, os.W_OK):
                raise LaunchError(f"{STATE_FLAG} {state}: the state bucket is not mounted there read-write")
            env["COVTOKEN_STATE_DIR"] = str(state.resolve())
            tee.say(f"state bucket {os.environ.get('COVTOKEN_STATE_BUCKET', '?')} mounted read-write at {state}: "
                    "token-bank shards and checkpoints are written there as they are made")
        if env.get("COVTOKEN_BACKEND") == "hf-jobs" and env.get("COVTOKEN_RESULTS_REPO"):
            env["COVTOKEN_TRY"] = str(claim_try(tee, python, env))
        sidecar = start_log_sidecar(tee, python, log_path, env)
        cmd = [str(python), str(bundle / info["job"]), *argv]
        tee.say(f"running {info['job']} {' '.join(argv)} in {run_dir} with {python}")
        rc = run_logged(tee, cmd, env=env, cwd=run_dir)
        tee.say(f"{info['job']} exited with code {rc}")
        return rc if rc >= 0 else 128 - rc
    except LaunchError as exc:
        tee.say(f"error: {exc}")
        return 2
    finally:
        stop_log_sidecar(tee, sidecar)
        tee.close()


if __name__ == "__main__":
    raise SystemExit(main())
