"""A metric value replaced by Infinity."""
EXPECT = "Infinity"


def tamper(ws):
    text = ws.record.read_text()
    i = text.index('"value": ', text.index('"final_auroc"')) + len('"value": ')
    j = text.index(",", i)
    ws.record.write_text(text[:i] + "Infinity" + text[j:])
