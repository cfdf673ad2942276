"""SUMMARY.md edited after the audit wrote it."""
MODE = "check"
EXPECT = ""


def tamper(ws):
    f = ws.results / "SUMMARY.md"
    f.write_text(f.read_text().replace("**pass**", "**PASS**").replace("**fail**", "**pass**") + "\nedited\n")
