"""The code commit changed to another real commit of the repository (its parent)."""
import pytest

EXPECT = "provenance/code"


def tamper(ws):
    head = ws.rec()["provenance"]["code"]["commit"]
    try:
        other = ws.git("rev-parse", f"{head}~1")
    except Exception:
        pytest.skip("the clone has no parent of the record's commit (shallow); cannot pick another real commit")
    ws.edit(lambda d: d["provenance"]["code"].__setitem__("commit", other))
