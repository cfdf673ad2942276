"""Test-only reader of sealed masks: the functions below run as evaluation code would (their module name is
under covtoken.eval), so tests can check that an adapter sealed the right pixels and labels. Kit code has no
such door: masks are opened by covtoken.eval and covtoken.data only (see covtoken.data.layout)."""
from __future__ import annotations

_NS: dict = {"__name__": "covtoken.eval._tests_reader"}
exec(  # noqa: S102 - a fixed snippet, to give the reader an evaluation module name
    "from covtoken.data.layout import unseal, unseal_labels\n"
    "def mask_array(m):\n    return unseal(m)\n"
    "def mask_labels(m):\n    return unseal_labels(m)\n", _NS)
mask_array = _NS["mask_array"]
mask_labels = _NS["mask_labels"]
