"""The test split's patient count inflated."""
EXPECT = "n_patients"


def tamper(ws):
    ws.edit(lambda d: d["provenance"]["dataset"]["n_patients"].__setitem__("test", 100))
