"""evaluation.json and its listing removed: nothing left to recompute from."""
EXPECT = "no intact evaluation.json"


def tamper(ws):
    ws.art("evaluation.json").unlink()
    ws.edit(lambda d: d.__setitem__("artefacts", [a for a in d["artefacts"] if not a["path"].endswith("/evaluation.json")]))
