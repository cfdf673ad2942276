"""An artefact folder without any record."""
EXPECT = "orphaned"


def tamper(ws):
    d = ws.results / "artefacts" / "g1-20990101t000000-bbbbbb"
    d.mkdir()
    (d / "selection.json").write_text("{}")
