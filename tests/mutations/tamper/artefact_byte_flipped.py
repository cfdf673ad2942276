"""One byte of a listed artefact flipped."""
EXPECT = "sha256"


def tamper(ws):
    f = ws.art("auroc_per_block.json")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
