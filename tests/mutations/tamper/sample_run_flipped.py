"""sample_run flipped to true (the run would be filed as a sample run)."""
EXPECT = "sample_run"


def tamper(ws):
    ws.edit(lambda d: d.__setitem__("sample_run", not d.get("sample_run", False)))
