"""Torch intra-op thread counts, set for one block of work and restored after it."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

__all__ = ["torch_threads"]


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (0: leave the count as it is), restoring the previous count
    afterwards, also when the block raises.

    The new count applies to the calling thread and to threads that start torch work inside the block.
    """
    import torch

    before = torch.get_num_threads()
    if n and n != before:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
