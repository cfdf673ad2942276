"""An extra key added to provenance.dataset."""
EXPECT = "provenance/dataset"


def tamper(ws):
    ws.edit(lambda d: d["provenance"]["dataset"].__setitem__("curated_by", "an expert panel"))
