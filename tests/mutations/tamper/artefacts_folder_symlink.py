"""The run's whole artefact folder replaced by a symlink to a copy outside the results folder."""
import os
import shutil

EXPECT = "symlink"


def tamper(ws):
    src = ws.results / "artefacts" / ws.run_id
    outside = ws.results.parent / "outside"
    shutil.move(src, outside)
    os.symlink(outside, src)
