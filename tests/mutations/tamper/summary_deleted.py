"""SUMMARY.md deleted."""
MODE = "check"
EXPECT = ""


def tamper(ws):
    (ws.results / "SUMMARY.md").unlink()
