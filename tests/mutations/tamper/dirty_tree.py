"""A dirty-tree record: not evidence, so it fails unless explicitly allowed."""
EXPECT = "provenance/code/dirty"


def tamper(ws):
    ws.edit(lambda d: d["provenance"]["code"].update(dirty=True, diff_sha256="0" * 64))
    ws.flags["allow_dirty"] = False
