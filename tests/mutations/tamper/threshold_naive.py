"""A criterion's threshold edited in the record."""
EXPECT = "criteria/0"


def tamper(ws):
    ws.edit(lambda d: d["criteria"][0].__setitem__("threshold", 0.01))
