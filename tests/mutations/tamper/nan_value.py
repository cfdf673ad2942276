"""A metric value replaced by NaN."""
EXPECT = "NaN"


def tamper(ws):
    text = ws.record.read_text()
    i = text.index('"value": ', text.index('"mid_auroc"')) + len('"value": ')
    j = text.index(",", i)
    ws.record.write_text(text[:i] + "NaN" + text[j:])
