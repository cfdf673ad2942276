"""wall_seconds inflated beyond the start/end span."""
EXPECT = "wall_seconds"


def tamper(ws):
    ws.edit(lambda d: d["provenance"].__setitem__("wall_seconds", d["provenance"]["wall_seconds"] + 600))
