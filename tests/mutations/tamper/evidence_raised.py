"""Evidence tier raised from flow-check to real (a random-weight phantom run filed as evidence)."""
EXPECT = "evidence"


def tamper(ws):
    ws.edit(lambda d: d.__setitem__("evidence", "real"))
