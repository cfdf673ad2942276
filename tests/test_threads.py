"""``torch_threads``: the torch intra-op thread count for one block of work, restored after it."""
from __future__ import annotations

import threading

import pytest
import torch

from covtoken.threads import torch_threads


def test_sets_the_count_for_the_block_and_restores_it() -> None:
    before = torch.get_num_threads()
    other = 1 if before > 1 else 2
    with torch_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before


def test_restores_the_count_when_the_block_raises() -> None:
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="planted"):
        with torch_threads(before + 1):
            assert torch.get_num_threads() == before + 1
            raise RuntimeError("planted")
    assert torch.get_num_threads() == before


def test_zero_leaves_the_count() -> None:
    before = torch.get_num_threads()
    with torch_threads(0):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before


def test_threads_started_inside_the_block_get_the_count() -> None:
    """What the token bank's forward workers rely on: a thread started in the block runs torch with its count."""
    before, seen = torch.get_num_threads(), []
    other = before + 1
    with torch_threads(other):
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
    assert seen == [other]
    assert torch.get_num_threads() == before
