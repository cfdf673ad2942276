"""The split manifest artefact edited (one test patient dropped) and the record's hash updated."""
EXPECT = "n_patients"


def tamper(ws):
    ws.edit_artefact_json("splits.json", lambda d: d["membership"]["test"].pop())
