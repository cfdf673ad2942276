"""The dataset id changed (a phantom run passed off as another dataset)."""
EXPECT = "provenance/dataset"


def tamper(ws):
    ws.edit(lambda d: d["provenance"]["dataset"].__setitem__("id", "lidc-idri"))
