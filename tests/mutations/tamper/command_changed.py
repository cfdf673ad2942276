"""The recorded command line changed."""
EXPECT = "provenance/command"


def tamper(ws):
    ws.edit(lambda d: d["provenance"].__setitem__("command", ["jobs/g1_lesion_subspace.py", "--dataset", "lidc"]))
