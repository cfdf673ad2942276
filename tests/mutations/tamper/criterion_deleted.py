"""A criterion deleted from the record."""
EXPECT = "criteria/"


def tamper(ws):
    ws.edit(lambda d: d["criteria"].pop())
