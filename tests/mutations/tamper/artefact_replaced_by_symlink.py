"""A listed artefact replaced by a symlink to an identical copy elsewhere (same bytes, same hash)."""
import os
import shutil

EXPECT = "symlink"


def tamper(ws):
    f = ws.art("selection.json")
    elsewhere = ws.results.parent / "elsewhere.json"
    shutil.copy(f, elsewhere)
    f.unlink()
    os.symlink(elsewhere, f)
