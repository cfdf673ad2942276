"""The run's notes rewritten."""
EXPECT = "notes"


def tamper(ws):
    ws.edit(lambda d: d.__setitem__("notes", ["all criteria comfortably met on every patient"]))
