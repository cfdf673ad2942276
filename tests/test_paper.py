"""paper/: built from records alone; verify fails closed on every kind of drift."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from covtoken.paper.build import PaperError, build_paper, verify_paper
from covtoken.record import dumps_strict
from covtoken.runstore import append_ledger, read_ledger
from g1_helpers import run_g1_smoke


@pytest.fixture(scope="module")
def g1_record(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("paper-g1")
    lock = REPO_ROOT / "configs" / "thresholds.lock.json"  # the repository's lock: pre-registration is provable
    record = run_g1_smoke(base / "gate_reports", base / "work", lock)
    return record, lock


@pytest.fixture
def paper(g1_record, tmp_path) -> tuple[Path, Path, Path, Path]:
    """A root holding the committed records plus a fresh G1 run, and the project's draft with g1 pointing at the
    fresh run; returns (root, draft, out, lock)."""
    record, lock = g1_record
    root = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "gate_reports", root / "gate_reports")
    shutil.copy(record, root / "gate_reports" / record.name)
    shutil.copytree(record.parent / "artefacts" / record.stem, root / "gate_reports" / "artefacts" / record.stem)
    for entry in read_ledger(record.parent):  # the run's ledger entry travels with it, as `covtoken run` does
        append_ledger(root / "gate_reports", entry)
    text = (REPO_ROOT / "paper" / "working_draft.md").read_text()
    lines = [ln if not ln.strip().startswith("g1:") else f"  g1: gate_reports/{record.name}" for ln in text.splitlines()]
    draft = root / "paper" / "working_draft.md"
    draft.parent.mkdir(parents=True)
    draft.write_text("\n".join(lines) + "\n")
    out = root / "paper" / "build"
    build_paper(draft, root=root, out_dir=out, lock_path=lock)
    return root, draft, out, lock


def verify(paper) -> list[str]:
    root, draft, out, lock = paper
    return verify_paper(draft, root=root, out_dir=out, lock_path=lock)


def test_build_renders_numbers_and_figures_from_the_record(paper, g1_record):
    root, draft, out, _ = paper
    rec = json.loads(g1_record[0].read_text())
    built = (out / "working_draft.md").read_text()
    assert f"{rec['metrics']['mid_auroc']['value']:.3f}" in built and f"**{rec['decision']}" in built
    assert "{{" not in built
    for ext in ("png", "pdf"):
        assert (out / "figures" / f"g1_auroc_per_block.{ext}").stat().st_size > 1000
    assert rec["run_id"] in built  # captions name their records
    assert verify(paper) == []


def test_hand_edited_number_fails(paper, g1_record):
    _, _, out, _ = paper
    rec = json.loads(g1_record[0].read_text())
    built = out / "working_draft.md"
    v = f"{rec['metrics']['mid_auroc']['value']:.3f}"
    built.write_text(built.read_text().replace(v, "0.999", 1))
    probs = verify(paper)
    assert probs and "differs from a fresh render" in probs[0] and "0.999" in probs[0]


def test_changed_record_fails(paper, g1_record):
    root, *_ = paper
    record = root / "gate_reports" / g1_record[0].name
    doc = json.loads(record.read_text())
    doc["metrics"]["final_auroc"]["value"] -= 0.01
    record.write_text(dumps_strict(doc))
    # final_auroc is judged by no criterion, but the audit recomputes it from the stored evaluation inputs
    with pytest.raises(PaperError, match="rejected by the audit.*final_auroc"):
        verify(paper)


def test_record_rejected_by_audit_fails(paper, g1_record):
    root, *_ = paper
    record = root / "gate_reports" / g1_record[0].name
    doc = json.loads(record.read_text())
    doc["decision"] = "fail" if doc["decision"] != "fail" else "pass"
    record.write_text(dumps_strict(doc))
    with pytest.raises(PaperError, match="rejected by the audit"):
        verify(paper)


def test_changed_figure_input_or_file_fails(paper):
    root, _, out, _ = paper
    png = out / "figures" / "g1_auroc_per_block.png"
    png.write_bytes(png.read_bytes() + b"\0")
    assert any("figure file differs" in p for p in verify(paper))


def test_missing_record_and_bad_reference_fail(paper):
    root, draft, out, lock = paper
    text = draft.read_text()
    draft.write_text(text.replace("metrics.mid_auroc.value|.3f", "metrics.mid_auroc.nope|.3f", 1))
    with pytest.raises(PaperError, match="does not resolve"):
        verify(paper)
    draft.write_text(text.replace("{{g1:claim}}", "{{g99:claim}}"))
    with pytest.raises(PaperError, match="unknown record key 'g99'"):
        verify(paper)
    for f in (root / "gate_reports").glob("g*.json"):
        f.unlink()
    draft.write_text(text)
    with pytest.raises(PaperError, match="record file is missing"):
        verify(paper)


def test_draft_without_references_is_refused(paper):
    root, draft, out, lock = paper
    head, _, _ = draft.read_text().partition("---\n#")
    draft.write_text(draft.read_text().split("\n---\n", 1)[0] + "\n---\nNo numbers here.\n")
    with pytest.raises(PaperError, match="no references"):
        verify(paper)


def test_committed_paper_is_current(repo_root):
    """The paper built in the repository verifies against the committed records (as CI does)."""
    from covtoken.paper.render import parse_draft

    draft = parse_draft(repo_root / "paper" / "working_draft.md")
    missing = [str(p) for p in draft.records.values() if not (repo_root / p).is_file()]
    assert not missing, f"the draft names records that are not committed: {missing}"
    probs = verify_paper(repo_root / "paper" / "working_draft.md", root=repo_root, out_dir=repo_root / "paper" / "build",
                         lock_path=repo_root / "configs" / "thresholds.lock.json")
    assert probs == []


def test_flow_checks_are_tagged_in_every_reference_and_caption(g1_record, tmp_path):
    """A record below `real` never reads as evidence: every number and every figure caption carries its tier."""
    record, lock = g1_record
    root = tmp_path / "repo"
    (root / "gate_reports").mkdir(parents=True)
    shutil.copy(record, root / "gate_reports" / record.name)
    shutil.copytree(record.parent / "artefacts" / record.stem, root / "gate_reports" / "artefacts" / record.stem)
    for entry in read_ledger(record.parent):  # the run's ledger entry travels with it, as `covtoken run` does
        append_ledger(root / "gate_reports", entry)
    draft = root / "paper" / "d.md"
    draft.parent.mkdir(parents=True)
    draft.write_text(f"---\nrecords:\n  g1: gate_reports/{record.name}\n---\n"
                     "AUROC {{g1:metrics.mid_auroc.value|.3f}} ({{g1:decision}}).\n\n{{figure:g1_auroc_per_block}}\n")
    built = build_paper(draft, root=root, out_dir=root / "paper" / "build", lock_path=lock).read_text()
    rec = json.loads(record.read_text())
    assert rec["evidence"] == "flow-check"
    assert f"AUROC {rec['metrics']['mid_auroc']['value']:.3f}<sup>flow-check</sup> " \
           f"({rec['decision']}<sup>flow-check</sup>)" in built
    assert "*Figure (g1_auroc_per_block).* **[flow-check: not evidence]**" in built
    assert "`g1` flow-check" in built
    assert verify_paper(draft, root=root, out_dir=root / "paper" / "build", lock_path=lock) == []
