"""A scorer under subspace/ imports the mask loader (relative import of the data layer). Caught by the static
import check of tests/test_label_leak.py, run over the planted copy of a real subspace module."""
from pathlib import Path

KIND = "guard"
PLANT = "from ..data.layout import unseal  # planted\n"


def _check(source: str) -> list[str]:
    from test_label_leak import forbidden_imports

    return forbidden_imports(source, "subspace")


def _module() -> Path:
    from conftest import REPO_ROOT

    return sorted((REPO_ROOT / "subspace").glob("*.py"))[-1]


def clean(tmp_path):  # noqa: ANN001, ANN201
    return _check(_module().read_text())


def caught(tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    source = _module().read_text()
    head, sep, rest = source.partition("\nimport ")
    return _check(head + "\n" + PLANT + sep.lstrip("\n") + rest)
