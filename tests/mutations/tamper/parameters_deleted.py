"""provenance.parameters deleted, so the parameter check would be skipped."""
EXPECT = "provenance/parameters"


def tamper(ws):
    ws.edit(lambda d: d["provenance"].pop("parameters"))
