"""decision_reason rewritten."""
EXPECT = "decision_reason"


def tamper(ws):
    ws.edit(lambda d: d.__setitem__("decision_reason", "every criterion met by a wide margin"))
