"""A config value changed (batch size)."""
EXPECT = "provenance/config"


def tamper(ws):
    ws.edit(lambda d: d["provenance"]["config"].__setitem__("batch_size", 7))
