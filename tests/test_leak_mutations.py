"""The leak mutation suite: every planted leak in tests/mutations/leaks/ must be caught by the guard.

A role leak (``KIND = "roles"``) is planted into the job's --smoke run; the test first requires the leak to be
real (the leaking role's outputs differ from the clean job's), then requires the whole-job role check to
report it. A guard leak (``KIND = "guard"``) runs its own guard with and without the leak. See the folder's
README.md; a new case is one file there.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from conftest import TESTS_DIR
from g1_helpers import load_job
from leak_harness import clean_reference, load_job_source, role_problems, run_reference

LEAKS = TESTS_DIR / "mutations" / "leaks"
CASES = sorted(p.stem for p in LEAKS.glob("*.py") if not p.name.startswith("_"))
ROLE_CASES = [c for c in CASES if "KIND = \"roles\"" in (LEAKS / f"{c}.py").read_text()]
GUARD_CASES = [pytest.param(c, marks=pytest.mark.slow) if "SLOW = True" in (LEAKS / f"{c}.py").read_text() else c
               for c in CASES if c not in ROLE_CASES]


def load_case(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"covtoken_leak_{name}", LEAKS / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_suite_holds_every_listed_leak():
    listed = {"g1_refit_non_lesion", "g1_select_on_test", "g7_finetune_on_eval_pairs", "calibration_same_patients",
              "calibrate_accepts_judged", "g1_scores_peek", "g4_scores_peek", "g3_saliency_peek",
              "g7_train_on_changing_pairs", "planted_mask_import", "scorer_unseals_mask", "private_mask_attribute"}
    assert listed <= set(CASES), sorted(listed - set(CASES))
    for name in CASES:
        case = load_case(name)
        assert case.__doc__ and case.KIND in ("roles", "guard"), f"{name}: needs a docstring and KIND"
        if case.KIND == "roles":
            assert hasattr(case, "SOURCE_PATCH") or hasattr(case, "plant"), f"{name}: plants nothing"
        else:
            assert callable(case.caught) and callable(case.clean), f"{name}: needs caught() and clean()"


@pytest.mark.slow
@pytest.mark.parametrize("name", ROLE_CASES)
def test_planted_role_leak_is_caught(name, tmp_path, tmp_path_factory, monkeypatch):
    case = load_case(name)
    clean = clean_reference(case.JOB, tmp_path_factory)

    def loader() -> ModuleType:
        patch = getattr(case, "SOURCE_PATCH", None)
        job = load_job_source(case.JOB, patch) if patch else load_job(case.JOB)
        if hasattr(case, "plant"):
            case.plant(job, monkeypatch)
        return job

    leaky = run_reference(case.JOB, tmp_path / "leaky", loader=loader, work=clean.work)
    assert leaky.log.upto(case.ROLE) != clean.log.upto(case.ROLE), f"{name}: the planted leak changes nothing"
    problems = role_problems(leaky, hows={case.ROLE: (case.HOW,)})
    assert problems, f"{name}: planted leak NOT caught by the role check"


@pytest.mark.parametrize("name", GUARD_CASES)
def test_planted_guard_leak_is_caught(name, tmp_path, monkeypatch):
    case = load_case(name)
    assert case.clean(tmp_path / "clean") == [], f"{name}: the guard fails without the leak"
    assert case.caught(tmp_path / "leaky", monkeypatch), f"{name}: planted leak NOT caught"


def test_a_stage_only_check_would_miss_the_body_leak():
    """Why the check runs whole jobs: the refit leak sits in the job body, outside label_free_stage."""
    case = load_case("g1_refit_non_lesion")
    (old, new), = case.SOURCE_PATCH
    source = (Path(load_job(case.JOB).__file__)).read_text()
    body = source.split("def run_g1", 1)[1]
    assert old in body and old not in source.split("def run_g1", 1)[0]
