"""A record file renamed (file name no longer its run id)."""
EXPECT = "does not match the file name"


def tamper(ws):
    ws.record.rename(ws.results / "g1-20990101t000000-000000.json")
