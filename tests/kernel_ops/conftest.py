"""Kernel tests run on tiny tensors: one intra-op thread is faster, and much faster when the
machine's cores are busy (OpenMP workers spin-wait), e.g. 7 s instead of 75 s on 2 loaded cores."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
