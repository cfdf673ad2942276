"""The recorded tree id changed (a record claiming other code than its commit holds)."""
EXPECT = "provenance/code/tree"


def tamper(ws):
    ws.edit(lambda d: d["provenance"]["code"].__setitem__("tree", "f" * 40))
