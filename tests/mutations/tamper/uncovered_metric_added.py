"""A metric added that no stored evaluation input covers."""
EXPECT = "no stored evaluation input covers"


def tamper(ws):
    ws.edit(lambda d: d["metrics"].__setitem__("external_auroc", {**d["metrics"]["mid_auroc"], "value": 0.9}))
