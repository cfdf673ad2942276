"""The recipe name in evaluation.json changed to an unknown one (hash updated)."""
EXPECT = "unknown metric recipe"


def tamper(ws):
    ws.edit_artefact_json("evaluation.json", lambda d: d["evaluations"][0].__setitem__("recipe", "g1.lenient"))
