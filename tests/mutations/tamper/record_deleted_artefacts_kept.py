"""A record deleted, its artefacts left behind (orphaned artefacts)."""
EXPECT = "orphaned"


def tamper(ws):
    ws.record.unlink()
