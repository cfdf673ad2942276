"""The recorded seed changed."""
EXPECT = "seed"


def tamper(ws):
    ws.edit(lambda d: d["provenance"].__setitem__("seed", d["provenance"]["seed"] + 1))
