"""The tamper mutation suite: every forgery in tests/mutations/tamper/ must be caught by the audit.

One G1 run on the embedded default (``--smoke``) is made per session and audited clean (summaries written);
each case mutates its own copy and the audit must fail with a problem naming what was forged (``EXPECT``).
A new case is one file in ``tests/mutations/tamper/``.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import REPO_ROOT, TESTS_DIR
from covtoken.audit import audit_folder
from covtoken.cli import main as cli_main
from g1_helpers import run_g1_smoke
from mutations.kit import Workspace

CASES = sorted(p for p in (TESTS_DIR / "mutations" / "tamper").glob("*.py") if not p.name.startswith("_"))


def _flags_cli(flags: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}" for k, v in flags.items() if v]


@pytest.fixture(scope="session")
def audited(tmp_path_factory) -> Workspace:
    """One audited G1 smoke run, judged under the repository's own lock (so pre-registration is provable)."""
    base = tmp_path_factory.mktemp("tamper")
    lock = REPO_ROOT / "configs" / "thresholds.lock.json"
    record = run_g1_smoke(base / "results", base / "work", lock)
    dirty = json.loads(record.read_text())["provenance"]["code"]["dirty"]
    ws = Workspace(record.parent, record, lock, REPO_ROOT, {"allow_dirty": dirty})
    rep = audit_folder(ws.results, lock_path=lock, **ws.flags)
    assert rep.ok, rep.all_problems()
    assert cli_main(["audit", str(ws.results), "--lock", str(lock), *_flags_cli(ws.flags)]) == 0
    return ws


def test_untampered_copy_passes(audited, tmp_path):
    ws = audited.copy_to(tmp_path)
    rep = audit_folder(ws.results, lock_path=ws.lock, **ws.flags)
    assert rep.ok, rep.all_problems()
    assert rep.records[0].prereg[0] == "pre-registered"
    assert cli_main(["audit", str(ws.results), "--lock", str(ws.lock), "--check", *_flags_cli(ws.flags)]) == 0


def test_suite_holds_every_listed_case():
    assert len(CASES) >= 47, [p.stem for p in CASES]


@pytest.mark.parametrize("case", CASES, ids=[p.stem for p in CASES])
def test_tampering_is_caught(case: Path, audited, tmp_path):
    spec = importlib.util.spec_from_file_location(f"tamper_{case.stem}", case)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.__doc__, f"{case.name}: say what the case forges"
    ws = audited.copy_to(tmp_path)
    mod.tamper(ws)
    if getattr(mod, "MODE", "audit") == "check":
        rc = cli_main(["audit", str(ws.results), "--lock", str(ws.lock), "--check", *_flags_cli(ws.flags)])
        assert rc != 0, f"{case.stem}: audit --check accepted the tampered folder"
        return
    rep = audit_folder(ws.results, lock_path=ws.lock, **ws.flags)
    problems = rep.all_problems()
    assert not rep.ok, f"{case.stem}: the audit passed a tampered folder"
    assert any(mod.EXPECT in p for p in problems), f"{case.stem}: expected a problem with {mod.EXPECT!r}, got {problems}"
    if hasattr(mod, "verify"):
        mod.verify(ws, rep)
