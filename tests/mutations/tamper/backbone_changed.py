"""The backbone name and weights digest changed."""
EXPECT = "provenance/backbone"


def tamper(ws):
    ws.edit(lambda d: d["provenance"]["backbone"].update(name="dinov2-vitb14", weights_digest="sha256:" + "cd" * 32))
