"""Commit and tree id both swapped to another real commit's (the sealed provenance still says otherwise)."""
import pytest

EXPECT = "provenance/code"


def tamper(ws):
    head = ws.rec()["provenance"]["code"]["commit"]
    try:
        other = ws.git("rev-parse", f"{head}~1")
        tree = ws.git("rev-parse", f"{other}^{{tree}}")
    except Exception:
        pytest.skip("the clone has no parent of the record's commit (shallow)")
    ws.edit(lambda d: d["provenance"]["code"].update(commit=other, tree=tree))
