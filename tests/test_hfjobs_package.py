"""The HF Jobs backend as one package (issue 11): no import cycle, argparse only in its CLI layer, no private
``huggingface_hub``/``open_clip`` names anywhere in the repo, job script headers that do not name an unpublished
package, an image table that matches constraints.txt, an offline dry run whose ``hf jobs run`` line the real CLI
accepts, one-line errors with exit 2, ``ps``/``status``/``logs -n``/``wait --timeout 2h``, a public results repo
refused, and a fetch that survives a rejected card and an interruption."""
from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from conftest import REPO_ROOT
from covtoken.hfjobs.errors import HFJobsError
from covtoken.hfjobs.images import IMAGES, image_warning
from covtoken.hfjobs.runs import ensure_private_repo
from hfjobs_support import G1, NS, covtoken, fake_token, hf_cache, hf_cli, jobs_of, new_repo, snapshot  # noqa: F401
from hub_emulator import HubEmulator, hub  # noqa: F401  (fixture)

PKG = REPO_ROOT / "hfjobs"
SKIP_DIRS = {".venv", ".git", "results", "gate_reports", "build", ".cache", "node_modules"}


# ------------------------------------------------------------------------------------------------ structure
def _intra_imports(path: Path) -> set[str]:
    """Sibling modules of covtoken.hfjobs that ``path`` imports (anywhere in the file, functions included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    got = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1:
                got |= {mod.split(".")[0]} if mod else {a.name for a in node.names}
            elif node.level == 0 and mod.startswith("covtoken.hfjobs"):
                rest = mod.split(".")[2:]
                got |= {rest[0]} if rest else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            got |= {a.name.split(".")[2] for a in node.names if a.name.startswith("covtoken.hfjobs.")}
    return got & {p.stem for p in PKG.glob("*.py")}


def test_backend_package_has_no_import_cycle_and_argparse_only_in_its_cli() -> None:
    mods = {p.stem: p for p in PKG.glob("*.py") if p.stem != "__init__"}
    assert {"runs", "spec", "bundle", "launcher", "hubsync", "fetch", "sweep", "cli"} <= set(mods)
    graph = {m: _intra_imports(p) - {m, "__init__"} for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, f"import cycle: {' -> '.join(path + [m, n])}"
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
    assert not any("cli" in deps for m, deps in graph.items() if m != "cli"), graph  # the CLI sits on top
    # public names of the library that are also submodule names would be shadowed by the submodule
    import covtoken.hfjobs as pkg

    assert not set(pkg.__all__) & set(mods), set(pkg.__all__) & set(mods)
    assert graph["launcher"] == set()  # shipped as a standalone stdlib file
    for m, p in mods.items():
        text = p.read_text()
        if m not in ("cli", "hubsync"):  # hubsync's `python -m` sidecar entry point has its own tiny parser
            assert "argparse" not in text, f"{p}: argparse below the CLI"
    # the seven old root modules are gone; nothing imports them
    for old in ("hfjobs.py", "hfspec.py", "bundle.py", "launcher.py", "hubsync.py", "hffetch.py", "hfsweep.py"):
        assert not (REPO_ROOT / old).exists()
    stale = re.compile(r"from \.(hfspec|hffetch|hfsweep|hubsync|bundle|launcher) import|covtoken\.(hfspec|hffetch|"
                       r"hfsweep|hubsync|bundle|launcher)\b")
    offenders = [str(p) for p in _py_files() if p.parent == REPO_ROOT or p.parent.name == "tests"
                 if stale.search(p.read_text())]
    assert offenders == []


def _py_files() -> list[Path]:
    out = []
    for root, dirs, files in os.walk(REPO_ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        out += [Path(root) / f for f in files if f.endswith(".py")]
    return out


_PRIVATE_HF = re.compile(r"^\s*(?:from\s+huggingface_hub(?:\.\w+)*\._\w+|import\s+huggingface_hub(?:\.\w+)*\._\w+|"
                         r"from\s+huggingface_hub(?:\.\w+)*\s+import\s+\(?\s*_\w+)", re.M)
_PRIVATE_OC = re.compile(r"^\s*(?:from\s+open_clip(?:\.\w+)*\._\w+|import\s+open_clip(?:\.\w+)*\._\w+|"
                         r"from\s+open_clip(?:\.\w+)*\s+import\s+\(?\s*_\w+)|open_clip(?:\.\w+)*\._[a-z]\w*", re.M)


def _private_uses(pattern: re.Pattern) -> list[str]:
    me = Path(__file__).resolve()
    return [f"{p.relative_to(REPO_ROOT)}: {m.group(0).strip()}" for p in _py_files() if p.resolve() != me
            for m in pattern.finditer(p.read_text(errors="replace"))]


def test_no_private_huggingface_hub_names_anywhere() -> None:
    assert _PRIVATE_HF.search("from huggingface_hub._jobs_api import _create_job_spec")  # the pattern can fail
    assert _PRIVATE_HF.search("from huggingface_hub.utils import _dotenv")
    assert _private_uses(_PRIVATE_HF) == []


def test_no_private_open_clip_names_anywhere() -> None:
    assert _PRIVATE_OC.search("from open_clip.model import _build_vision_tower")
    assert _private_uses(_PRIVATE_OC) == []


def test_job_headers_do_not_name_the_unpublished_kit() -> None:
    block = re.compile(r"^# /// script$\n(.*?)^# ///$", re.M | re.S)
    seen = 0
    for job in sorted((REPO_ROOT / "jobs").glob("*.py")):
        m = block.search(job.read_text())
        if not m:
            continue
        seen += 1
        meta = tomllib.loads("\n".join(ln[2:] if ln.startswith("# ") else ln[1:] for ln in m.group(1).splitlines()))
        names = [re.match(r"[A-Za-z0-9._-]+", d).group(0).lower() for d in meta.get("dependencies", [])]
        assert "covtoken" not in names, f"{job.name}: a bare `covtoken` is not on the package index"
    assert seen >= 7


def test_image_table_matches_the_pins_and_warns_when_unverified() -> None:
    pins = dict(ln.split("==") for ln in (REPO_ROOT / "constraints.txt").read_text().split() if "==" in ln)
    gpu = IMAGES["gpu"]
    assert gpu.torch == pins["torch"] and gpu.torch in gpu.name  # the GPU image carries the pinned torch
    for e in IMAGES.values():
        assert e.as_of and e.source
        assert e.verified == bool(e.digest and re.fullmatch(r"sha256:[0-9a-f]{64}", e.digest))
        warn = image_warning(e.name)
        assert (warn is None) == e.verified and (warn is None or "--image" in warn)
    assert image_warning("img@sha256:" + "a" * 64) is None


# ------------------------------------------------------------------------------------------------ offline dry run
def _offline_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HOME=str(tmp / "hf_home"), HF_ENDPOINT="http://127.0.0.1:9", COVTOKEN_HUB_RETRY_MAX_S="0",
               COLUMNS="400", MY_SECRET="s3cr3t-value-never-printed")
    return env


def _parse_hf_dry_run(text: str) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    key = None
    for line in text.splitlines():
        m = re.match(r"^  (\w+)\s{2,}(.*)$", line)
        if m:
            key = m.group(1)
            fields[key] = [m.group(2).strip()]
        elif key and re.match(r"^\s{4,}\S", line):
            fields[key].append(line.strip())
        else:
            key = None
    return fields


@pytest.mark.slow
def test_dry_run_needs_no_token_and_no_network(snapshot: Path, tmp_path: Path) -> None:
    env = _offline_env(tmp_path)
    cmd = [sys.executable, "-m", "covtoken.cli", "submit", G1, "--results-repo", "someorg/covtoken-results",
           "--flavor", "t4-small", "--timeout", "2h", "--attempts", "2", "-e", "EXTRA=1", "-s", "MY_SECRET",
           "--name", "probe-1", "-l", "team=vision", "--dry-run", "--", "--smoke"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=snapshot, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    err = res.stderr
    assert "price table shipped with the kit, as of" in err and "$0.40/hour" in err
    assert "worst case  $1.60" in err and "x 2 attempts" in err  # 2 h x $0.40 x 2 attempts
    assert "not pinned by digest" in err and "--image" in err  # the unverified image table says so
    assert "s3cr3t-value-never-printed" not in res.stdout + err
    run_line = next(ln for ln in res.stdout.splitlines() if ln.startswith("hf jobs run "))
    spec = json.loads(res.stdout[res.stdout.index("{"):])
    assert spec["attempts"] == 2 and spec["labels"]["name"] == "probe-1" and spec["labels"]["team"] == "vision"
    assert spec["environment"]["EXTRA"] == "1" and sorted(spec["secrets"]) == ["HF_TOKEN", "MY_SECRET"]
    assert "--namespace YOUR-NAMESPACE" in run_line  # a placeholder: no whoami
    assert spec["dockerImage"] == IMAGES["gpu"].name and spec["flavor"] == "t4-small"

    # the real `hf jobs run --dry-run` parses the printed line and resolves the same job (offline too)
    argv = shlex.split(run_line)
    hf = subprocess.run([*hf_cli(), "jobs", "run", "--dry-run", *argv[3:]], capture_output=True, text=True,
                        env={**env, "HF_TOKEN": "hf_user_token_of_the_machine"}, timeout=120)
    assert hf.returncode == 0, hf.stdout + hf.stderr
    got = _parse_hf_dry_run(hf.stdout)
    assert got["image"] == [spec["dockerImage"]] and got["flavor"] == [spec["flavor"]]
    assert got["command"] == [" ".join(spec["command"])]
    assert got["timeout"] == [str(spec["timeoutSeconds"])] and got["attempts"] == ["2"]
    assert sorted(got["env"]) == sorted(f"{k}={v}" for k, v in spec["environment"].items())
    assert sorted(got["secrets"]) == ["HF_TOKEN=***", "MY_SECRET=***"]
    assert sorted(got["labels"]) == sorted(f"{k}={v}" for k, v in spec["labels"].items())
    assert got["namespace"] == ["YOUR-NAMESPACE"]
    vol = spec["volumes"][0]
    assert got["volumes"] == [f"hf://datasets/{vol['source']}/{vol['path']}:{vol['mountPath']}:ro"]

    # and the Hub unreachable without --dry-run: one line, exit 2, before any upload
    env["HF_TOKEN"] = "hf_user_token_of_the_machine"
    down = subprocess.run(cmd[:-3] + ["--yes", "--", "--smoke"], capture_output=True, text=True, cwd=snapshot,
                          env=env, timeout=300)
    assert down.returncode == 2, down.stdout + down.stderr
    last = down.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot reach the Hub at http://127.0.0.1:9") and "retry" in last


# ------------------------------------------------------------------------------------------------ one-line errors
def _one_line_error(res, *needles: str) -> None:  # noqa: ANN001
    lines = [ln for ln in res.err.strip().splitlines() if ln.strip()]
    assert res.rc == 2, res.text
    assert len(lines) == 1 and lines[0].startswith("error: "), res.err
    for n in needles:
        assert n in lines[0], lines[0]


def test_not_logged_in_is_one_line_exit_2(hub: HubEmulator, tmp_path: Path, monkeypatch, snapshot: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("COLUMNS", "400")
    for argv in (["status", "g1-x"], ["logs", "g1-x"], ["wait", "g1-x"], ["cancel", "g1-x"], ["fetch", "g1-x"],
                 ["ps"], ["submit", "--resume", "g1-x", "--results-repo", f"{NS}/r"],
                 ["submit", G1, "--results-repo", f"{NS}/r", "--yes", "--", "--smoke"]):
        _one_line_error(covtoken(*argv, cwd=snapshot), "not logged in", "hf auth login")
    # with a namespace the request goes out without a token: the Hub's 401 becomes the same kind of line
    _one_line_error(covtoken("status", "g1-x", "--namespace", NS, cwd=snapshot), "401", "hf auth login")


def test_no_permission_and_unknown_run_are_one_line(hub: HubEmulator, fake_token: str, snapshot: Path) -> None:
    _one_line_error(covtoken("status", "g1-x", "--namespace", "someone-else", cwd=snapshot), "no permission",
                    "403")
    _one_line_error(covtoken("logs", "g1-nosuchrun", cwd=snapshot), "no job labelled run=g1-nosuchrun")
    _one_line_error(covtoken("fetch", "--all", "--results-repo", f"{NS}/does-not-exist", cwd=snapshot),
                    "no records yet")
    _one_line_error(covtoken("wait", "g1-x", "--timeout", "2 hours", cwd=snapshot), "--timeout '2 hours'")


def test_public_results_repo_is_refused(hub: HubEmulator, fake_token: str, snapshot: Path) -> None:
    api = HfApi()
    repo = new_repo()
    api.create_repo(repo, repo_type="dataset", private=False)
    with pytest.raises(HFJobsError, match="public dataset repo.*--public"):
        ensure_private_repo(api, repo, public=False)
    ensure_private_repo(api, repo, public=True)
    res = covtoken("submit", G1, "--results-repo", repo, "--yes", "--detach", "--", "--smoke", cwd=snapshot)
    _one_line_error(res, repo, "--public")
    assert not any(f.startswith("runs/") for f in api.list_repo_files(repo, repo_type="dataset"))  # nothing sent
    fresh = new_repo()
    ensure_private_repo(api, fresh, public=False)
    assert api.repo_info(fresh, repo_type="dataset").private is True


# ------------------------------------------------------------------------------------------------ ps / status / logs
def test_ps_status_logs_and_wait(hub: HubEmulator, fake_token: str, snapshot: Path) -> None:
    api = HfApi()
    tag = uuid.uuid4().hex[:6]
    done_id, live_id = f"g1-20260101t000000-{tag}", f"g4-20260101t000000-{tag}"
    labels = {"app": "covtoken", "code": "a" * 12}
    done = api.run_job(image="img", command=["python", "-c", "print('one'); print('two')"], namespace=NS,
                       labels={**labels, "run": done_id, "gate": "g1", "attempt": "0"}, timeout=60)
    live = api.run_job(image="img", command=["python", "-c", "import time; time.sleep(60)"], namespace=NS,
                       labels={**labels, "run": live_id, "gate": "g4", "attempt": "0"}, flavor="t4-small",
                       timeout=120)
    try:
        hub.wait_job(done.id)
        every = covtoken("ps", "-a", "--json", cwd=snapshot)
        assert every.rc == 0, every.text
        rows = {r["run_id"]: r for r in json.loads(every.out)}
        assert rows[done_id]["gate"] == "G1" and rows[done_id]["state"] == "COMPLETED"
        assert rows[done_id]["url"].endswith(done.id) and rows[done_id]["job_id"] == done.id
        assert rows[live_id]["gate"] == "G4" and rows[live_id]["flavor"] == "t4-small"
        running = covtoken("ps", cwd=snapshot)
        assert running.rc == 0 and live_id in running.out and done_id not in running.out  # live runs by default
        table = covtoken("ps", "-a", cwd=snapshot).out
        assert any(done_id in ln and done.id in ln and "COMPLETED" in ln for ln in table.splitlines())
        st = covtoken("status", done_id, cwd=snapshot)
        assert st.rc == 0 and done.id in st.out and done.url in st.out  # the full job id and the URL
        js = json.loads(covtoken("status", done_id, "--json", cwd=snapshot).out)
        assert js["jobs"][0]["job_id"] == done.id and js["jobs"][0]["url"] == done.url
        tail = covtoken("logs", done_id, "-n", "1", cwd=snapshot)
        assert tail.rc == 0 and tail.out.strip().splitlines() == ["two"]
        w = covtoken("wait", done_id, "--timeout", "2h", cwd=snapshot)
        assert w.rc == 0 and "ended COMPLETED" in w.err
        short = covtoken("wait", live_id, "--timeout", "1s", cwd=snapshot)
        _one_line_error(short, "still running after 1 s")
    finally:
        api.cancel_job(job_id=live.id, namespace=NS)


# ------------------------------------------------------------------------------------------------ fetch
def _seed_record(api: HfApi, repo: str) -> str:
    src = REPO_ROOT / "gate_reports"
    rec = sorted(src.glob("g1-*.json"))[0]
    rid = rec.stem
    api.create_repo(repo, repo_type="dataset", private=True)
    api.upload_folder(repo_id=repo, repo_type="dataset", folder_path=src / "artefacts" / rid,
                      path_in_repo=f"runs/{rid}/artefacts/{rid}")
    api.upload_file(repo_id=repo, repo_type="dataset", path_or_fileobj=str(rec), path_in_repo=f"runs/{rid}/{rid}.json")
    return rid


def test_fetch_survives_a_rejected_card_and_an_interruption(hub: HubEmulator, fake_token: str, snapshot: Path,
                                                            tmp_path: Path, monkeypatch) -> None:
    api = HfApi()
    repo = new_repo()
    rid = _seed_record(api, repo)
    dest = tmp_path / "reports"
    # a local run pushed to a repo: the destination is the folder whose ledger started it (the audit after the
    # fetch requires a start entry for a local-backend run)
    from covtoken.runstore import append_ledger, read_ledger

    for entry in read_ledger(REPO_ROOT / "gate_reports"):
        if entry["run_id"] == rid:
            append_ledger(dest, entry)

    # interrupted while writing the record: nothing partial left, no 0-byte record
    from covtoken import runstore

    real = runstore.atomic_copy

    def crash_on_record(src: Path, target: Path) -> None:
        if target.name == f"{rid}.json":
            raise KeyboardInterrupt("interrupted")
        real(src, target)

    monkeypatch.setattr(runstore, "atomic_copy", crash_on_record)
    with pytest.raises(KeyboardInterrupt):
        covtoken("fetch", "--allow-unproven-prereg", rid, "--results-repo", repo, "--results", str(dest), "--no-card", cwd=snapshot)
    monkeypatch.setattr(runstore, "atomic_copy", real)
    assert not (dest / f"{rid}.json").exists()
    assert not [p for p in dest.rglob("*") if p.is_file() and (p.name.endswith(".part") or p.stat().st_size == 0)]

    # fetching again works; the Hub rejecting the card's YAML is a warning, not a failed fetch
    hub.validate_yaml_error = "Invalid metadata in README.md (emulated)"
    try:
        res = covtoken("fetch", "--allow-unproven-prereg", rid, "--results-repo", repo, "--results", str(dest), cwd=snapshot)
    finally:
        hub.validate_yaml_error = None
    assert res.rc == 0, res.text
    assert "warning:" in res.err and "dataset card not updated" in res.err
    assert json.loads((dest / f"{rid}.json").read_text())["run_id"] == rid
    assert "README.md" not in api.list_repo_files(repo, repo_type="dataset")
    again = covtoken("fetch", "--allow-unproven-prereg", rid, "--results-repo", repo, "--results", str(dest), cwd=snapshot)
    assert again.rc == 0 and f"run {rid}: already in" in again.err
    assert "dataset card regenerated" in again.err  # validation passes now: the card is written
    shutil.rmtree(dest)


def test_env_and_secret_flags_parse_like_hf_jobs(tmp_path: Path, monkeypatch) -> None:
    from covtoken.hfjobs.cli import parse_env, parse_labels, parse_secrets

    f = tmp_path / "job.env"
    f.write_text('# comment\nexport A=1\nB="two words"  # trailing\nC=\'x#y\'\nFROM_HERE\n')
    monkeypatch.setenv("FROM_HERE", "local-value")
    monkeypatch.setenv("MY_SECRET", "s3cret")
    assert parse_env(["B=override", "D=4"], str(f)) == {"A": "1", "B": "override", "C": "x#y",
                                                         "FROM_HERE": "local-value", "D": "4"}
    assert parse_secrets(["MY_SECRET", "HF_TOKEN", "OTHER=v"], None) == {"MY_SECRET": "s3cret", "OTHER": "v"}
    monkeypatch.delenv("FROM_HERE")
    with pytest.raises(HFJobsError, match="-e/--env FROM_HERE: no value given"):
        parse_env(None, str(f))
    with pytest.raises(HFJobsError, match="--secrets-file .*not found"):
        parse_secrets(None, str(tmp_path / "missing.env"))
    with pytest.raises(HFJobsError, match="-l team: expected KEY=VALUE"):
        parse_labels(["team"])
    # the kit's own variables and the token are not the user's to set
    from covtoken.hfjobs.spec import make_request

    base = dict(run_id="g1-20260101t000000-abcdef", attempt=0, namespace=NS, results_repo=f"{NS}/r", job=G1,
                job_args=[], commit="a" * 40, image="img")
    with pytest.raises(HFJobsError, match="COVTOKEN_RUN_ID: set by the kit"):
        make_request(**base, env={"COVTOKEN_RUN_ID": "x"})
    with pytest.raises(HFJobsError, match="HF_TOKEN: a token never goes in the environment"):
        make_request(**base, env={"HF_TOKEN": "hf_x"})
    with pytest.raises(HFJobsError, match="-l/--label run: set by the kit"):
        make_request(**base, labels={"run": "x"})
    req = make_request(**base, env={"E": "1"}, secret_names=("HF_TOKEN", "MY_SECRET"), name="nice-name", attempts=3)
    assert req.labels["name"] == "nice-name" and req.spec("r")["attempts"] == 3
    assert req.spec("r", placeholder="<s>")["secrets"] == {"HF_TOKEN": "<s>", "MY_SECRET": "<s>"}
    with pytest.raises(HFJobsError, match="secrets"):
        req.run_job_kwargs("r", {"HF_TOKEN": "t"})  # every named secret needs its value
