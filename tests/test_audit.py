"""The audit fails closed: every edit of a lock, a metric, a decision or an artefact byte is caught by name.

One real G1 run on the embedded default is made per session; each test tampers with its own copy.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from covtoken.audit import audit_folder, preregistration
from covtoken.cli import main as cli_main
from covtoken.lock import ThresholdLock, lock_entry, write_lock
from covtoken.provenance import repo_root
from covtoken.record import dumps_strict
from g1_helpers import copy_lock, run_g1_smoke


@pytest.fixture(scope="session")
def g1_run(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("g1")
    lock = copy_lock(base / "lock")
    record = run_g1_smoke(base / "results", base / "work", lock)
    return record, lock


@pytest.fixture
def workspace(g1_run, tmp_path) -> tuple[Path, Path, Path]:
    record, lock = g1_run
    results = tmp_path / "results"
    shutil.copytree(record.parent, results)
    lock_copy = Path(shutil.copy(lock, tmp_path / "thresholds.lock.json"))
    return results, results / record.name, lock_copy


def problems(results: Path, lock: Path) -> list[str]:
    rep = audit_folder(results, lock_path=lock, allow_unproven_prereg=True, allow_dirty=True)
    return rep.all_problems() if not rep.ok else []


def rewrite(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(dumps_strict(doc))


def test_clean_run_passes_and_writes_summaries(workspace):
    results, record, lock = workspace
    assert problems(results, lock) == []
    rc = cli_main(["audit", str(results), "--lock", str(lock), "--allow-unproven-prereg", "--allow-dirty"])
    assert rc == 0
    summary = (results / "SUMMARY.md").read_text()
    rec = json.loads(record.read_text())
    assert rec["run_id"] in summary and f"**{rec['decision']}**" in summary
    assert (results / "NEGATIVE_RESULT.md").is_file()
    # --check accepts fresh summaries and rejects a stale one
    assert cli_main(["audit", str(results), "--lock", str(lock), "--allow-unproven-prereg", "--allow-dirty", "--check"]) == 0
    (results / "SUMMARY.md").write_text(summary.replace(rec["decision"], "edited"))
    assert cli_main(["audit", str(results), "--lock", str(lock), "--allow-unproven-prereg", "--allow-dirty", "--check"]) == 1


def test_record_is_complete(workspace):
    _, record, _ = workspace
    rec = json.loads(record.read_text())
    prov = rec["provenance"]
    assert len(prov["code"]["commit"]) == 40
    assert prov["backbone"]["block_index_base"] == 0 and prov["backbone"]["weights_digest"].startswith("sha256:")
    assert set(prov["dataset"]["n_patients"]) == {"train", "val", "test"}
    assert prov["command"][0] == "jobs/g1_lesion_subspace.py"
    for name in ("mid_auroc", "final_auroc", "delta_mid_final_auroc", "intensity_baseline_auroc"):
        m = rec["metrics"][name]
        assert m["ci"][0] <= m["value"] <= m["ci"][1]
        assert m["n"]["patients"] == prov["dataset"]["n_patients"]["test"]
        assert "clustered" in m["ci_method"]


def test_edited_threshold_in_lock_is_caught(workspace):
    results, _, lock = workspace
    rewrite(lock, lambda d: d["gates"]["G1"]["entries"]["embedded"]["criteria"][0].__setitem__("threshold", 0.1))
    msgs = problems(results, lock)
    assert msgs and "gates/G1/entries/embedded/digest" in msgs[0]


def test_relocked_threshold_does_not_judge_old_records(workspace):
    results, _, lock = workspace
    doc = json.loads(lock.read_text())
    entry = doc["gates"]["G1"]["entries"]["embedded"]
    crit = copy.deepcopy(entry["criteria"])
    crit[0]["threshold"] = 0.1
    new = lock_entry(doc, gate_id="G1", claim=doc["gates"]["G1"]["claim"], name="embedded", criteria=crit,
                     parameters=entry["parameters"], calibration=entry["calibration"], supersede=True)
    write_lock(new, lock)
    ThresholdLock.load(lock)  # the new lock itself is intact
    msgs = problems(results, lock)
    assert any("field lock/entry_digest" in m for m in msgs), msgs


@pytest.mark.parametrize("metric", ["mid_auroc", "delta_mid_final_auroc"])
def test_edited_metric_is_caught(workspace, metric):
    results, record, lock = workspace

    def edit(d):
        m = d["metrics"][metric]
        m["value"] = m["value"] - 0.5
        m["ci"] = [m["ci"][0] - 0.5, m["ci"][1] - 0.5]

    rewrite(record, edit)
    msgs = problems(results, lock)
    assert any("field criteria/" in m and "recomputed" in m for m in msgs), msgs


def test_edited_decision_is_caught(workspace):
    results, record, lock = workspace
    rec = json.loads(record.read_text())
    other = {"pass": "fail", "fail": "pass", "inconclusive": "pass"}[rec["decision"]]
    rewrite(record, lambda d: d.__setitem__("decision", other))
    msgs = problems(results, lock)
    assert any("field decision" in m and other in m for m in msgs), msgs


def test_edited_protocol_parameters_are_caught(workspace):
    results, record, lock = workspace
    rewrite(record, lambda d: d["provenance"]["parameters"].__setitem__("n_boot", 10))
    msgs = problems(results, lock)
    assert any("field provenance/parameters" in m and "n_boot" in m for m in msgs), msgs


def test_record_claiming_real_with_random_weights_fails(workspace):
    """The tier is recomputed from the record's facts: a flow check relabelled as real evidence is caught."""
    results, record, lock = workspace
    assert json.loads(record.read_text())["evidence"] == "flow-check"
    rewrite(record, lambda d: d.__setitem__("evidence", "real"))
    msgs = problems(results, lock)
    assert any("field evidence: claims 'real', more than its facts allow: 'flow-check'" in m for m in msgs), msgs
    rewrite(record, lambda d: d["provenance"]["backbone"].__setitem__("weights_verified", True))  # a flag is no fact
    assert any("field evidence" in m for m in problems(results, lock))


def test_flow_check_judged_under_a_real_entry_fails(workspace):
    results, record, lock = workspace
    real = ThresholdLock.load(lock).entry("G1/real")
    rewrite(record, lambda d: d["lock"].update(entry="G1/real", entry_digest=real.digest))
    msgs = problems(results, lock)
    assert any("field lock/entry: a flow-check run judged under G1/real" in m for m in msgs), msgs


def test_flipped_artefact_byte_is_caught(workspace):
    results, record, lock = workspace
    art = results / json.loads(record.read_text())["artefacts"][0]["path"]
    data = bytearray(art.read_bytes())
    data[len(data) // 2] ^= 0x01
    art.write_bytes(bytes(data))
    msgs = problems(results, lock)
    assert any("field artefacts/0/sha256" in m and art.name in m for m in msgs), msgs


def test_missing_and_unlisted_artefacts_are_caught(workspace):
    results, record, lock = workspace
    rec = json.loads(record.read_text())
    (results / rec["artefacts"][1]["path"]).unlink()
    (results / "artefacts" / rec["run_id"] / "extra.txt").write_text("x")
    msgs = problems(results, lock)
    assert any("artefacts/1/path" in m and "missing" in m for m in msgs), msgs
    assert any("not listed" in m and "extra.txt" in m for m in msgs), msgs


def test_malformed_record_is_caught(workspace):
    results, record, lock = workspace
    record.write_text(record.read_text().replace('"decision": "', '"decision": NaN, "x": "', 1))
    msgs = problems(results, lock)
    assert msgs and record.name in msgs[0]


def test_schema_violation_names_field(workspace):
    results, record, lock = workspace
    rewrite(record, lambda d: d["provenance"]["code"].__setitem__("commit", "unknown"))
    msgs = problems(results, lock)
    assert any("provenance/code/commit" in m for m in msgs), msgs


def test_empty_or_missing_inputs_fail(tmp_path, workspace):
    _, _, lock = workspace
    (tmp_path / "empty").mkdir()
    assert any("no gate records" in m for m in problems(tmp_path / "empty", lock))
    assert any("missing" in m for m in problems(tmp_path / "nope", lock))
    results, _, _ = workspace
    assert any("lock is missing" in m for m in problems(results, tmp_path / "nolock.json"))
    assert cli_main(["audit", str(tmp_path / "empty"), "--lock", str(lock)]) == 1


def test_preregistration_against_git_history(g1_run):
    record, _ = g1_run
    root = repo_root()
    if root is None:
        pytest.skip("not running from a git checkout")
    rec = json.loads(record.read_text())
    lock = root / "configs" / "thresholds.lock.json"
    status, detail = preregistration(rec, lock)
    if status == "unavailable":
        pytest.skip(f"git history unavailable: {detail}")
    assert status == "pre-registered", detail
    never = copy.deepcopy(rec)
    never["lock"]["entry_digest"] = "sha256:" + "0" * 64
    assert preregistration(never, lock)[0] == "not-registered"
    from covtoken.provenance import git

    first = git(root, "rev-list", "--max-parents=0", "HEAD").split()[0]
    early = copy.deepcopy(rec)
    early["provenance"]["code"]["commit"] = first
    status, detail = preregistration(early, lock)
    assert status == "not-registered" and "after the code commit" in detail


def test_committed_gate_reports_pass_the_audit(repo_root):
    """The records in the repository audit clean and their summaries are current (what CI checks)."""
    folder = repo_root / "gate_reports"
    rc = cli_main(["audit", str(folder), "--lock", str(repo_root / "configs" / "thresholds.lock.json"), "--check"])
    assert rc == 0


def _committed_copy(repo_root, dest, edit):
    """The committed seed-0 G1 record (artefacts and ledger lines copied) with ``edit`` applied to it."""
    import shutil

    from covtoken.runstore import append_ledger, read_ledger

    src = repo_root / "gate_reports"
    rec = next(p for p in sorted(src.glob("g1-*.json")) if json.loads(p.read_text())["lock"]["entry"] == "G1/embedded")
    shutil.copytree(src / "artefacts" / rec.stem, dest / "artefacts" / rec.stem)
    doc = json.loads(rec.read_text())
    edit(doc)
    (dest / rec.name).write_text(json.dumps(doc, indent=2))
    for entry in read_ledger(src):
        if entry["run_id"] == rec.stem:
            append_ledger(dest, entry)
    return dest


def test_a_forged_lock_file_digest_fails_even_with_the_unproven_prereg_allowance(repo_root, tmp_path):
    """--allow-unproven-prereg relaxes only what this history cannot prove: the record's commit is known here,
    so a lock file digest no committed lock ever had still fails."""
    from covtoken.audit import audit_folder

    lock = repo_root / "configs" / "thresholds.lock.json"
    folder = _committed_copy(repo_root, tmp_path / "r", lambda d: d["lock"].update(file_digest="sha256:" + "1" * 64))
    for allow in (False, True):
        report = audit_folder(folder, lock_path=lock, allow_unproven_prereg=allow)
        assert any("lock/file_digest" in p for p in report.all_problems()), (allow, report.all_problems())
    clean = audit_folder(_committed_copy(repo_root, tmp_path / "c", lambda d: None), lock_path=lock)
    assert clean.ok, clean.all_problems()
