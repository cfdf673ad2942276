"""A scorer (code whose module lives under covtoken.subspace) opens a mask at run time with unseal. Caught by
the sealed mask's caller check: LabelLeakError naming the module."""
import numpy as np

KIND = "guard"
SCORER = "def score(tokens, mask):\n    return tokens.sum(axis=-1){leak}\n"


def _run(leak: str) -> list[str]:
    from covtoken.data.layout import LabelLeakError, SealedMask, unseal

    ns = {"__name__": "covtoken.subspace.planted", "unseal": unseal, "np": np}
    exec(SCORER.format(leak=leak), ns)  # noqa: S102
    mask = SealedMask(np.eye(4, dtype=bool), source="planted")
    try:
        ns["score"](np.ones((4, 3)), mask)
    except LabelLeakError as exc:
        return [str(exc)]
    return []


def clean(tmp_path):  # noqa: ANN001, ANN201
    return _run("")


def caught(tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    return _run(" + unseal(mask).sum()")
