"""Every case of the bad-input corpus (tests/bad_inputs/cases.py) exits 2 with one line on stderr naming the
culprit, no traceback, and leaves no record, proposal or temporary file behind. ``--debug`` shows the traceback."""
from __future__ import annotations

import logging

import pytest

from bad_inputs.cases import CASES, Case
from covtoken.cli import main as cli_main
from g1_helpers import copy_lock, load_job


def _fill(text: str, tmp, lock) -> str:  # noqa: ANN001
    return text.replace("{tmp}", str(tmp)).replace("{lock}", str(lock))


def run_case(case: Case, tmp, monkeypatch, *, debug: bool = False) -> int:  # noqa: ANN001
    """Run one case in-process; a usage error's SystemExit counts as its exit status."""
    try:
        return _run_case(case, tmp, monkeypatch, debug=debug)
    except SystemExit as exc:
        return int(exc.code)


def _run_case(case: Case, tmp, monkeypatch, *, debug: bool = False) -> int:  # noqa: ANN001
    lock = copy_lock(tmp / "lockdir")
    if case.setup:
        case.setup(tmp)
    if case.fault:
        case.fault(monkeypatch, tmp)
    args = [_fill(a, tmp, lock) for a in case.args] + (["--debug"] if debug else [])
    if case.target == "cli":
        return cli_main((["--debug"] if debug else []) + args[: len(args) - debug])
    if case.target == "materialize":
        return load_job("materialize_dataset").main(args)
    job = load_job("g7_dermajepa_probe" if case.target == "job7" else "g1_lesion_subspace")
    given = set(args)
    extra = [] if "--results" in given else ["--results", str(tmp / "results")]
    extra += [] if "--lock" in given else ["--lock", str(lock)]
    if case.target == "job":
        extra += ["--work-dir", str(tmp / "work")]
    return job.main(args + extra)


def _unlisted_shard_files(tmp) -> list:  # noqa: ANN001
    """Token-bank shard files their bank's manifest does not list (a partial shard)."""
    import json

    out = []
    for manifest in tmp.rglob("manifest.json"):
        listed = json.loads(manifest.read_text()).get("shards", {})
        for sdir in manifest.parent.glob("shard-*"):
            out += [f for f in sdir.rglob("*") if f.is_file() and sdir.name.removeprefix("shard-") not in listed]
    return out


def test_the_corpus_is_large_and_varied():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    kinds = {c.target for c in CASES}
    assert {"job", "cli"} <= kinds
    assert sum(c.fault is not None for c in CASES) >= 4 and sum("config" in c.id for c in CASES) >= 12


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2(case, tmp_path, monkeypatch, capsys, caplog):
    if "busi" in case.id and not (__import__("conftest").REALDATA / "busi").is_dir():
        pytest.skip("BUSI sample not found (../shared/realdata/busi)")
    caplog.set_level(logging.CRITICAL)
    rc = run_case(case, tmp_path, monkeypatch)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, f"exit {rc}; stderr:\n{err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{err}"
    assert lines[0].startswith("error: ") and _fill(case.culprit, tmp_path, "") in lines[0], lines[0]
    left = _unlisted_shard_files(tmp_path) + [p for p in tmp_path.rglob("*") if p.is_file() and (
        p.name.endswith((".tmp", ".part")) or (p.parent.name == "results" and p.suffix == ".json") or p.name == "p.json"
        and case.args[:2] == ("thresholds", "calibrate"))]
    assert left == [], f"partial files left: {left}"


@pytest.mark.parametrize("target", ["job", "cli"])
def test_debug_shows_the_traceback(target, tmp_path, monkeypatch, capsys):
    case = next(c for c in CASES if c.target == target and c.setup is None and c.fault is None
                and c.id not in ("cli-unknown-command", "cli-unknown-option", "cli-calibrate-no-out")
                and "flag" not in c.id and "seed" not in c.id and "batch" not in c.id)
    assert run_case(case, tmp_path, monkeypatch, debug=True) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")
