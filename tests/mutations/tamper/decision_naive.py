"""The decision edited."""
EXPECT = "field decision"


def tamper(ws):
    ws.edit(lambda d: d.__setitem__("decision", {"pass": "fail"}.get(d["decision"], "pass")))
