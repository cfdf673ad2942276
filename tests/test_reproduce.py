"""`covtoken reproduce` reruns a record from its provenance and compares bit for bit; it refuses what it cannot prove."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from covtoken.cli import main as cli_main
from covtoken.provenance import git
from covtoken.record import dumps_strict
from covtoken.reproduce import ReproduceError, compare_records, reproduce


def _committed_g1() -> Path:
    recs = [p for p in sorted((REPO_ROOT / "gate_reports").glob("g1-*.json"))
            if json.loads(p.read_text())["lock"]["entry"] == "G1/embedded"]
    assert recs, "no committed embedded G1 record in gate_reports/"
    return recs[-1]


def _variant(tmp_path: Path, fn) -> Path:
    src = _committed_g1()
    doc = json.loads(src.read_text())
    fn(doc)
    out = tmp_path / src.name
    out.write_text(dumps_strict(doc))
    return out


def test_dirty_record_is_refused(tmp_path):
    rec = _variant(tmp_path, lambda d: d["provenance"]["code"].update(dirty=True, diff_sha256="0" * 64))
    with pytest.raises(ReproduceError, match="dirty tree"):
        reproduce(rec, worktree=True)
    assert cli_main(["reproduce", str(rec), "--worktree"]) == 2


def test_unknown_commit_is_refused(tmp_path):
    rec = _variant(tmp_path, lambda d: d["provenance"]["code"].__setitem__("commit", "0123456789" * 4))
    with pytest.raises(ReproduceError, match="not in this clone's history"):
        reproduce(rec, worktree=True)


def test_other_commit_needs_a_worktree(tmp_path):
    first = git(REPO_ROOT, "rev-list", "--max-parents=0", "HEAD").split()[0]
    rec = _variant(tmp_path, lambda d: d["provenance"]["code"].__setitem__("commit", first))
    with pytest.raises(ReproduceError, match="--worktree"):
        reproduce(rec)


def test_compare_is_exact():
    doc = json.loads(_committed_g1().read_text())
    other = json.loads(json.dumps(doc))
    assert compare_records(doc, other) == []
    v = other["metrics"]["mid_auroc"]["value"]
    other["metrics"]["mid_auroc"]["value"] = math.nextafter(v, 2.0)  # the next float: one bit apart
    diffs = compare_records(doc, other)
    assert len(diffs) == 1 and "metrics/mid_auroc" in diffs[0]  # one bit of one float is a difference


@pytest.mark.slow
def test_committed_embedded_g1_record_reproduces_bit_for_bit(tmp_path):
    """The committed G1 record, rerun at its own commit, gives the same metrics bit for bit on the record's host
    (within the stated tolerance on another one)."""
    from test_reproduce_committed import HOST_TOLERANCE, drift, same_host

    rec = _committed_g1()
    rep = reproduce(rec, worktree=True, results=tmp_path / "rerun", timeout=900)
    assert rep.rerun is not None, rep.differences
    original, rerun = json.loads(rec.read_text()), json.loads(rep.rerun.read_text())
    if same_host(original, rerun):
        assert rep.identical, rep.differences
    else:  # another host's CPU kernels change float bits (the command reports them); only the tolerance is asked
        assert drift(original, rerun, HOST_TOLERANCE) == [], rep.differences
