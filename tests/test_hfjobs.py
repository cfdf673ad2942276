"""HF Jobs backend pieces that need no job to run: the t interval of a sweep, timeouts and labels, the launcher's
checks, the bundle's verification, the refusal of a dirty tree, and a dry run whose commands are pasted into
the real ``hf`` CLI against the Hub emulator and submit the very spec ``covtoken submit`` would.
"""
from __future__ import annotations

import io
import json
import shlex
import subprocess
import sys
import zipfile
from contextlib import redirect_stdout
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import HfApi
from huggingface_hub.utils import parse_hf_mount
from scipy import stats

from covtoken.hfjobs import launcher
from covtoken.hfjobs.bundle import BundleError, build_bundle, source_state, verify_bundle
from covtoken.hfjobs.errors import HFJobsError
from covtoken.hfjobs.hubsync import HubSync, HubSyncError, JobEnv
from covtoken.hfjobs.spec import make_request, parse_timeout
from covtoken.eval.seed_mean import seed_stats as t_interval
from covtoken.provenance import _dirty_state
from hfjobs_support import (FAKE_TOKEN, G1, NS, covtoken, fake_token, head, hf_cache, hf_cli, jobs_of,  # noqa: F401
                            new_repo, snapshot)
from hub_emulator import HubEmulator, hub  # noqa: F401  (fixture)


# ------------------------------------------------------------------------------------------------ sweep maths
def test_t_interval_is_the_t_based_ci_of_the_mean() -> None:
    x = [0.81, 0.86, 0.79, 0.90]
    st = t_interval(x, 0.95)
    mean, sd = sum(x) / 4, float(np.std(x, ddof=1))
    assert st["k"] == 4 and st["df"] == 3 and st["mean"] == pytest.approx(mean) and st["sd"] == pytest.approx(sd)
    assert st["t_quantile"] == pytest.approx(3.182446305284263)  # t_{0.975, 3} from the tables
    lo, hi = stats.t.interval(0.95, df=3, loc=mean, scale=sd / 2)
    assert st["ci"] == pytest.approx([lo, hi])
    assert (st["ci"][1] - mean) > 1.96 * sd / 2 * 1.5  # far wider than a z interval with 4 seeds
    two = t_interval([0.8, 0.9])
    assert two["ci"][1] - two["mean"] == pytest.approx(12.706204736174698 * np.std([0.8, 0.9], ddof=1) / np.sqrt(2))
    assert t_interval([0.8]) == {"k": 1, "mean": 0.8, "sd": None, "df": None, "t_quantile": None, "ci": None}
    assert t_interval([])["mean"] is None


# ------------------------------------------------------------------------------------------------ spec pieces
def test_timeouts_and_labels() -> None:
    assert [parse_timeout(t) for t in ("90", "90s", "1.5m", "2h", "1d")] == [90, 90, 90, 7200, 86400]
    for bad in ("", "0", "-5m", "2 hours", "h"):
        with pytest.raises(HFJobsError, match="--timeout"):
            parse_timeout(bad)
    req = make_request(run_id="g1-20260101t000000-abcdef", attempt=0, namespace=NS, results_repo=f"{NS}/r",
                       job=G1, job_args=["--smoke"], commit="a" * 40, image="img")
    assert req.labels["run"] == "g1-20260101t000000-abcdef" and req.labels["code"] == "a" * 12
    assert req.labels["gate"] == "g1" and req.labels["name"] == req.run_id
    with pytest.raises(HFJobsError, match="label seed=1.5"):
        make_request(run_id="g1-20260101t000000-abcdef", attempt=0, namespace=NS, results_repo=f"{NS}/r", job=G1,
                     job_args=[], commit="a" * 40, labels={"seed": "1.5"}, image="img")
    with pytest.raises(HFJobsError, match="g<N>_<name>.py"):
        make_request(run_id="x-20260101t000000-abcdef", attempt=0, namespace=NS, results_repo=f"{NS}/r",
                     job="jobs/lesions.py", job_args=[], commit="a" * 40, image="img")
    mount = parse_hf_mount(req.volume("b" * 40).to_uri())
    assert (mount.source.type, mount.source.id, mount.source.revision, mount.source.path_in_repo, mount.mount_path,
            mount.read_only) == ("dataset", f"{NS}/r", "b" * 40, f"runs/{req.run_id}/code", "/code", True)


# ------------------------------------------------------------------------------------------------ launcher
def _wheel(tmp: Path, requires: list[str]) -> Path:
    w = tmp / "covtoken-0.1.0-py3-none-any.whl"
    meta = "Metadata-Version: 2.1\nName: covtoken\nVersion: 0.1.0\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(w, "w") as zf:
        zf.writestr("covtoken-0.1.0.dist-info/METADATA", meta)
        zf.writestr("covtoken/__init__.py", "")
    return w


def test_launcher_installs_only_when_the_pins_are_not_met(tmp_path: Path) -> None:
    w = _wheel(tmp_path, ["numpy>=2.0", "scipy>=1.13", 'pytest>=8; extra == "dev"', "no-such-package-xyz"])
    assert launcher.wheel_requirements(w) == ["numpy", "scipy", "no-such-package-xyz"]
    c = tmp_path / "constraints.txt"
    c.write_text(f"# pins\nnumpy=={metadata.version('numpy')}\nSciPy==0.0.1\n")
    assert launcher.read_pins(c) == {"numpy": metadata.version("numpy"), "scipy": "0.0.1"}
    missing = launcher.missing_requirements(launcher.wheel_requirements(w), launcher.read_pins(c))
    assert missing == [f"scipy ({metadata.version('scipy')} installed, 0.0.1 pinned)",
                       "no-such-package-xyz (not installed)"]
    # this test environment is what the emulated jobs run in: the real bundle's pins are all met in it
    real = Path(__file__).resolve().parents[1] / "constraints.txt"
    assert launcher.missing_requirements([r.split(">")[0] for r in metadata.requires("covtoken") if "extra" not in r],
                                         launcher.read_pins(real)) == []


def test_launcher_redacts_the_token_from_stdout_and_the_log(tmp_path: Path) -> None:
    log = tmp_path / "attempt-0.log"
    tee = launcher.Tee(log, [FAKE_TOKEN, "short"])
    buf = io.StringIO()
    with redirect_stdout(buf):
        tee.line(f"Authorization: Bearer {FAKE_TOKEN} (short stays)")
        tee.pump(io.BytesIO(f"leak {FAKE_TOKEN}\n".encode()))
    tee.close()
    for text in (buf.getvalue(), log.read_text()):
        assert FAKE_TOKEN not in text and text.count(launcher.REDACTED) == 2 and "short stays" in text


def test_bundle_and_launcher_refuse_a_tampered_bundle(snapshot: Path, tmp_path: Path) -> None:
    bundle = build_bundle(source_state(snapshot / G1), G1, snapshot / "results" / "bundles")
    info = verify_bundle(bundle)
    assert info["commit"] == head(snapshot) and info["dirty"] is False and info["job"] == G1
    assert set(info["files"]) >= {G1, "launch.py", "configs/thresholds.lock.json", "constraints.txt", info["wheel"]}
    with zipfile.ZipFile(bundle / info["wheel"]) as zf:
        names = zf.namelist()
    assert "covtoken/runner.py" in names and "covtoken/hfjobs/hubsync.py" in names
    assert "covtoken/hfjobs/launcher.py" in names
    assert (bundle / "launch.py").read_bytes() == (snapshot / "hfjobs" / "launcher.py").read_bytes()
    copy = tmp_path / "bundle"
    subprocess.run(["cp", "-r", str(bundle), str(copy)], check=True)
    (copy / "configs" / "thresholds.lock.json").write_text("{}")
    with pytest.raises(BundleError, match="thresholds.lock.json: sha256 does not match"):
        verify_bundle(copy)
    with pytest.raises(launcher.LaunchError, match="thresholds.lock.json: missing or not matching"):
        launcher.verify(copy)
    (copy / "configs" / "thresholds.lock.json").write_bytes((bundle / "configs" / "thresholds.lock.json").read_bytes())
    (copy / "extra.py").write_text("print('not in the build info')")
    with pytest.raises(BundleError, match="extra.py"):
        verify_bundle(copy)


# ------------------------------------------------------------------------------------------------ submit checks
def test_dirty_tree_is_refused_unless_allowed(hub: HubEmulator, fake_token: str, snapshot: Path) -> None:
    target = snapshot / "record.py"
    original = target.read_bytes()
    target.write_bytes(original + b"\n# an uncommitted edit\n")
    try:
        res = covtoken("submit", G1, "--results-repo", new_repo(), "--dry-run", "--", "--smoke", cwd=snapshot)
        assert res.rc == 2 and "uncommitted changes (record.py)" in res.err and "--allow-dirty" in res.err
        res = covtoken("submit", G1, "--results-repo", new_repo(), "--dry-run", "--allow-dirty", "--", "--smoke",
                       cwd=snapshot)
        assert res.rc == 0, res.text
        diff = _dirty_state(snapshot)[1]
        assert f"DIRTY (diff sha256 {diff})" in res.err
        bundle = Path(shlex.split(res.out.splitlines()[2])[3])
        info = verify_bundle(bundle)
        assert info["dirty"] is True and info["diff_sha256"] == diff and info["commit"] == head(snapshot)
        with zipfile.ZipFile(bundle / info["wheel"]) as zf:
            assert zf.read("covtoken/record.py").endswith(b"# an uncommitted edit\n")  # the code that would run
    finally:
        target.write_bytes(original)
    assert not source_state(snapshot / G1).dirty


def test_dry_run_prints_a_spec_and_commands_that_paste(hub: HubEmulator, fake_token: str, snapshot: Path) -> None:
    repo = new_repo()
    res = covtoken("submit", G1, "--results-repo", repo, "--flavor", "t4-small", "--timeout", "2h", "--dry-run",
                   "--namespace", NS, "--", "--smoke", cwd=snapshot)
    assert res.rc == 0, res.text
    assert "t4-small" in res.err and "$0.40/hour" in res.err and "worst case  $0.80" in res.err
    assert FAKE_TOKEN not in res.text
    lines = res.out.splitlines()
    upload = shlex.split(next(ln for ln in lines if ln.startswith("hf upload ")))
    run = shlex.split(next(ln for ln in lines if ln.startswith("hf jobs run ")))
    spec = json.loads(res.out[res.out.index("{"):])
    rid = spec["environment"]["COVTOKEN_RUN_ID"]
    assert spec["command"] == ["python", "/code/launch.py", "--smoke"] and spec["flavor"] == "t4-small"
    assert spec["timeoutSeconds"] == 7200 and spec["labels"]["run"] == rid
    assert FAKE_TOKEN not in json.dumps(spec["secrets"])
    assert spec["volumes"] == [{"type": "dataset", "source": repo, "mountPath": "/code", "readOnly": True,
                                "path": f"runs/{rid}/code", "revision": "<commit of the bundle upload>"}]
    api = HfApi()
    assert not api.repo_exists(repo, repo_type="dataset") and jobs_of(hub, rid) == []  # nothing was submitted

    # paste both commands into the real `hf` CLI: the emulator receives the spec that was printed
    api.create_repo(repo, repo_type="dataset", private=True)
    for cmd in (upload, run):
        r = subprocess.run([*hf_cli(), *cmd[1:]], capture_output=True, text=True, cwd=snapshot, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
    (job,) = jobs_of(hub, rid)
    api.cancel_job(job_id=job.id, namespace=NS)
    sent = dict(job.spec)
    assert sorted(sent.pop("secrets")) == ["HF_TOKEN"]
    spec.pop("secrets")
    for s in (spec, sent):
        s["volumes"] = [{k: v for k, v in vol.items() if k != "revision"} for vol in s["volumes"]]
    assert sent == spec
    assert api.file_exists(repo, f"runs/{rid}/code/build-info.json", repo_type="dataset")


def test_submit_asks_before_spending(hub: HubEmulator, fake_token: str, snapshot: Path) -> None:
    repo = new_repo()
    res = covtoken("submit", G1, "--results-repo", repo, "--flavor", "a10g-small", "--timeout", "30m", "--", "--smoke",
                   cwd=snapshot)
    assert res.rc == 2 and "pass --yes" in res.err and "worst case  $0.50" in res.err
    assert not HfApi().repo_exists(repo, repo_type="dataset")
    bad = covtoken("submit", G1, "--results-repo", repo, "--flavor", "a10g-tiny", "--yes", cwd=snapshot)
    assert bad.rc == 2 and "--flavor 'a10g-tiny' is not offered" in bad.err and "a10g-small" in bad.err
    assert "hf jobs hardware" in bad.err and len(bad.err.strip().splitlines()) == 1


def _project(root: Path, name: str, deps: list[str]) -> Path:
    (root / name.replace("-", "_")).mkdir(parents=True)
    (root / name.replace("-", "_") / "__init__.py").write_text(f"NAME = {name!r}\n")
    (root / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{name}"\nversion = "1.0"\ndependencies = {json.dumps(deps)}\n'
        f'[tool.setuptools]\npackages = ["{name.replace("-", "_")}"]\n')
    return root


@pytest.mark.slow
def test_launcher_installs_the_wheel_with_the_constraints(tmp_path: Path, monkeypatch) -> None:
    """The install path of a fresh job image, offline: a venv, then pip with the bundle's constraints."""
    wheels = tmp_path / "wheels"
    for name, deps in (("covtoken-fakedep", []), ("covtoken-fakekit", ["covtoken-fakedep"])):
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(wheels), str(_project(tmp_path / name, name, deps))],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    kit = next(wheels.glob("covtoken_fakekit-*.whl"))
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("covtoken-fakedep==1.0\n")
    assert launcher.missing_requirements(launcher.wheel_requirements(kit), launcher.read_pins(constraints)) == \
        ["covtoken-fakedep (not installed)"]
    monkeypatch.setattr(launcher.shutil, "which", lambda name: None)  # no uv on this machine: the pip branch
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    tee = launcher.Tee(tmp_path / "install.log", [])
    with redirect_stdout(io.StringIO()):
        python = launcher.install_environment(tee, kit, constraints, tmp_path / "venv")
    tee.close()
    got = subprocess.run([str(python), "-c", "import covtoken_fakekit, covtoken_fakedep, importlib.metadata as m;"
                          "print(m.version('covtoken-fakedep'), covtoken_fakekit.__file__)"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert got[0] == "1.0" and str(tmp_path / "venv") in got[1]
    text = (tmp_path / "install.log").read_text()
    assert "--constraint" in text and "--system-site-packages" in text  # the image's own packages are kept
    done = json.loads(next(ln for ln in text.splitlines() if '"event": "install_done"' in ln).split(" ", 1)[1])
    assert done["installed"] == ["covtoken_fakedep-1.0", "covtoken_fakekit-1.0"] and done["bytes"] > 0
    assert f"installed 2 distribution(s), {done['bytes']} bytes" in text


def test_a_job_refuses_to_record_code_that_is_not_the_bundle(tmp_path: Path, monkeypatch) -> None:
    env = {"COVTOKEN_RUN_ID": "g1-20260101t000000-abcdef", "COVTOKEN_RESULTS_REPO": f"{NS}/r",
           "COVTOKEN_JOB_NAMESPACE": NS, "COVTOKEN_ATTEMPT": "0"}
    with pytest.raises(HubSyncError, match="COVTOKEN_JOB_NAMESPACE, COVTOKEN_ATTEMPT not set"):
        JobEnv.from_environ({k: v for k, v in env.items() if k in ("COVTOKEN_RUN_ID", "COVTOKEN_RESULTS_REPO")})
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("COVTOKEN_KIT_DIR", raising=False)
    with pytest.raises(HubSyncError, match="COVTOKEN_KIT_DIR not set"):
        HubSync.from_environment()
    monkeypatch.setenv("COVTOKEN_KIT_DIR", str(tmp_path / "kit"))  # this process imports covtoken from the checkout
    with pytest.raises(HubSyncError, match="not from the bundle's wheel"):
        HubSync.from_environment()
    monkeypatch.setenv("COVTOKEN_BACKEND", "hf-jobs")  # so a job under HF Jobs never writes a record from stray code
    from covtoken.runner import Run

    with pytest.raises(HubSyncError, match="not from the bundle's wheel"):
        Run(gate_id="G1", results_dir=tmp_path / "r", lock_entry="G1/embedded",
            lock_path=Path(__file__).resolve().parents[1] / "configs" / "thresholds.lock.json", config=None, seed=0)
    assert not (tmp_path / "r").exists()
