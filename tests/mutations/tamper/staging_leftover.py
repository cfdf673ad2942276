"""A staging folder left behind by an unfinished run."""
EXPECT = "staging leftover"


def tamper(ws):
    d = ws.results / ".staging" / "g1-20990101t000000-aaaaaa" / "artefacts"
    d.mkdir(parents=True)
    (d / "x.json").write_text("{}")
