"""A locked protocol parameter edited in the record (n_boot)."""
EXPECT = "provenance/parameters"


def tamper(ws):
    ws.edit(lambda d: d["provenance"]["parameters"].__setitem__("n_boot", 10))
