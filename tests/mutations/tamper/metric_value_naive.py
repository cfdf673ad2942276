"""A judged metric's value edited alone."""
EXPECT = "recomputed"


def tamper(ws):
    ws.edit(lambda d: d["metrics"]["mid_auroc"].__setitem__("value", d["metrics"]["mid_auroc"]["value"] + 0.1))
