"""A criterion's outcome edited."""
EXPECT = "outcome"


def tamper(ws):
    ws.edit(lambda d: d["criteria"][0].__setitem__("outcome", {"met": "not_met"}.get(d["criteria"][0]["outcome"], "met")))
