"""An unknown key added inside a criterion."""
EXPECT = "criteria/0"


def tamper(ws):
    ws.edit(lambda d: d["criteria"][0].__setitem__("waived", True))
