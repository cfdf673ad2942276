"""A listed artefact deleted."""
EXPECT = "is missing"


def tamper(ws):
    ws.art("selection.json").unlink()
