"""NEGATIVE_RESULT.md emptied after the audit wrote it (the file drawer hidden)."""
MODE = "check"
EXPECT = ""


def tamper(ws):
    (ws.results / "NEGATIVE_RESULT.md").write_text("# Negative results\n\nNo gate failed.\n")
