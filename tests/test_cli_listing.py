"""CLI niceties: --version, backbones/datasets listings, thresholds help, job help, exit status, default folders."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from covtoken import cli
from covtoken.backbone.registry import get_spec, list_backbones


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "covtoken.cli", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120)


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("covtoken ") and len(out.split()) >= 2


def test_backbones_json_lists_every_entry_with_revision_and_licence(capsys) -> None:
    assert cli.main(["backbones", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(list_backbones())
    for name, row in rows.items():
        spec = get_spec(name)
        assert row["revision"] == spec.revision and row["hub_id"] == spec.hub_id and row["licence"]
    assert cli.main(["backbones"]) == 0  # the table


def test_datasets_json_has_licences(capsys) -> None:
    assert cli.main(["datasets", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert "phantom-ct" in rows and rows["busi"]["licence"].startswith("CC0")
    assert all(r["licence"] and r["revision"] for r in rows.values())


def test_thresholds_help_names_every_subcommand() -> None:
    out = run_cli("thresholds", "--help").stdout
    for sub in ("calibrate", "lock", "verify", "show"):
        assert sub in out
    assert "check the lock" in out and "print the locked thresholds" in out


def test_run_job_help_prints_the_jobs_help_and_runs_nothing(tmp_path) -> None:
    r = run_cli("run", "jobs/g1_lesion_subspace.py", "--results", str(tmp_path), "--", "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: g1_lesion_subspace.py" in r.stdout and "--dataset" in r.stdout
    assert "record" not in r.stderr.lower() and not list(tmp_path.iterdir())


def test_run_help_documents_exit_status_and_fail_on() -> None:
    out = run_cli("run", "--help").stdout
    assert "--fail-on" in out and "Exit status" in out and "results/" in out


@pytest.mark.parametrize("decision, fail_on, rc", [
    ("pass", None, 0), ("fail", None, 0), ("inconclusive", None, 0),
    ("pass", "fail", 0), ("fail", "fail", 1), ("inconclusive", "fail", 0),
    ("pass", "inconclusive", 0), ("fail", "inconclusive", 1), ("inconclusive", "inconclusive", 1)])
def test_exit_status_for_decision(decision: str, fail_on: str | None, rc: int) -> None:
    assert cli._exit_for_decision(decision, fail_on) == rc


def test_runs_default_to_the_untracked_results_folder() -> None:
    args = cli.build_parser().parse_args(["run", "jobs/g1_lesion_subspace.py"])
    assert args.results == "results" and args.staging.startswith(".cache/")
    for path in ("results/x.json", ".cache/covtoken/staging/x.json"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO_ROOT).returncode == 0, path
    dry = subprocess.run(["make", "-n", "demo", "samples"], cwd=REPO_ROOT, capture_output=True, text=True).stdout
    assert "gate_reports" not in dry and "--results results" in dry and "source .venv/bin/activate" in dry


def test_httpx_request_lines_are_quiet_by_default(monkeypatch) -> None:
    import logging

    monkeypatch.delenv("COVTOKEN_DEBUG_HTTP", raising=False)
    logging.getLogger("httpx").setLevel(logging.NOTSET)
    cli._quiet_libraries()
    assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
