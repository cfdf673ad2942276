"""Leaks by role, over whole jobs: every gate's --smoke job, rerun with the labels of later roles perturbed,
hands on bit-identical fit / select / calibrate outputs (see tests/leak_harness.py for the check itself).

The planted leaks the check must catch are in tests/mutations/leaks/ (tests/test_leak_mutations.py).
"""
from __future__ import annotations

import pytest

from covtoken.roles import ROLES, RoleLog, RoleStop, digest, recording, role_output
from leak_harness import GATE_JOBS, HOWS_FAST, clean_reference, role_problems


@pytest.mark.slow
@pytest.mark.parametrize("gate", sorted(GATE_JOBS))
def test_earlier_roles_are_invariant_to_later_labels(gate, tmp_path_factory):
    ref = clean_reference(GATE_JOBS[gate], tmp_path_factory)
    checked = [r for r in ROLES[:-1] if ref.log.upto(r) and ref.log.after(r) and r in ref.roles]
    assert "fit" in checked, f"{gate}: no fit output is checked"
    assert role_problems(ref, hows=HOWS_FAST) == []


def test_digest_is_bit_exact_and_structural():
    import numpy as np

    a = np.arange(6, dtype=np.float64)
    assert digest(a) == digest(a.copy())
    b = a.copy()
    b[3] = np.nextafter(b[3], 10)  # one ulp
    assert digest(a) != digest(b)
    assert digest(a) != digest(a.astype(np.float32)) and digest(a) != digest(a.reshape(2, 3))
    assert digest({"x": 1, "y": [1.0, "a"]}) == digest({"y": [1.0, "a"], "x": 1})
    assert digest({"x": 1}) != digest({"x": 1.0}) and digest([1, 2]) != digest([2, 1])
    with pytest.raises(TypeError, match="cannot digest"):
        digest(object())


def test_role_log_orders_roles_and_stops_after():
    with recording() as log:
        role_output("fit", "a", 1)
        role_output("judge", "m", 2)
        role_output("fit", "a", 3)  # same name twice keeps both
    assert list(log.upto("fit")) == ["fit:a", "fit:a#2"] and list(log.after("calibrate")) == ["judge:m"]
    with pytest.raises(RoleStop, match="select:s"), recording(stop_after="fit") as log2:
        role_output("fit", "a", 1)
        role_output("select", "s", 2)
        role_output("judge", "never", 3)
    assert list(log2.after("fit")) == ["select:s"]
    assert role_output("fit", "outside", 5) == 5  # a no-op outside recording
    with pytest.raises(ValueError, match="unknown role"):
        role_output("train", "x", 1)
    assert isinstance(RoleLog(), RoleLog)
