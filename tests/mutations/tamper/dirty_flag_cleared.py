"""The record's dirty flag flipped (the sealed provenance still says what the run saw)."""
EXPECT = "provenance/code"


def tamper(ws):
    if ws.rec()["provenance"]["code"]["dirty"]:
        ws.edit(lambda d: d["provenance"]["code"].update(dirty=False, diff_sha256=None))
    else:
        ws.edit(lambda d: d["provenance"]["code"].update(dirty=True, diff_sha256="0" * 64))
        ws.flags["allow_dirty"] = True  # only the sealed copy can catch it
