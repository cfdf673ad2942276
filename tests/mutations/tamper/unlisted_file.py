"""An unlisted file added to the run's artefact folder."""
EXPECT = "not listed"


def tamper(ws):
    ws.art("extra.txt").write_text("x")
