"""The stored evaluation inputs and their listing removed."""
EXPECT = "not an intact listed artefact"


def tamper(ws):
    ws.art("eval_inputs-0.npz").unlink()
    ws.edit(lambda d: d.__setitem__("artefacts", [a for a in d["artefacts"] if "eval_inputs" not in a["path"]]))
