"""Temporarily cap torch's intra-op CPU threads.

Why: on small shared CPUs (2 cores here), OpenMP barriers under oversubscription cost milliseconds per small op;
tiny batched models, sequential SVDs and many-small-op tests run faster and far more predictably on one thread.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with at most ``num_threads`` intra-op threads (``None`` or 0: leave torch's setting)."""
    before = torch.get_num_threads()
    if not num_threads or before <= num_threads:
        yield
        return
    torch.set_num_threads(int(num_threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)
