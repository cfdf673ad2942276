"""A module under gate/ reads a sealed mask's pixels through a private attribute (`mask._array`, as the old
SealedMask allowed). Caught twice: the static attribute check flags it, and at run time the mask has no such
attribute (its pixels live in the data layer's vault)."""
import numpy as np

KIND = "guard"
SOURCE = "def keep(tokens, mask):\n    return tokens[{access}]\n"


def _run(access: str) -> list[str]:
    from covtoken.data.layout import SealedMask
    from test_label_leak import private_mask_access

    source = SOURCE.format(access=access)
    found = private_mask_access(source)
    ns = {"__name__": "covtoken.gate.planted"}
    exec(source, ns)  # noqa: S102
    try:
        ns["keep"](np.arange(16).reshape(4, 4), SealedMask(np.eye(4, dtype=bool), source="planted"))
    except AttributeError as exc:
        found.append(f"run time: {exc}")
    return found


def clean(tmp_path):  # noqa: ANN001, ANN201
    return _run("0")


def caught(tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    return _run("mask._array")
