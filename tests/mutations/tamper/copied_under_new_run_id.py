"""The same run copied under a new run id (one run counted twice)."""
import shutil

EXPECT = "counted twice"


def tamper(ws):
    new = ws.run_id[:-6] + "abcdef"
    shutil.copytree(ws.results / "artefacts" / ws.run_id, ws.results / "artefacts" / new)
    (ws.results / f"{new}.json").write_text(ws.record.read_text().replace(ws.run_id, new))
