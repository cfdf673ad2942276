"""The evaluation spec edited (bootstrap resamples changed) and its hash updated: recomputation differs."""
EXPECT = "does not match its recomputation"


def tamper(ws):
    ws.edit_artefact_json("evaluation.json", lambda d: d["evaluations"][0]["args"].__setitem__("n_boot", 50))
