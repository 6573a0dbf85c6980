"""Fixtures shared by the test modules (helpers that are plain functions live in helpers.py)."""

from __future__ import annotations

from typing import Any

import pytest

# helpers.py asserts (ftl, assert_losses_close, ...): rewrite them as pytest rewrites a test module's,
# so a failure there shows the compared values. This file loads before any test module imports it.
pytest.register_assert_rewrite("helpers")


@pytest.fixture(scope="module")
def one_thread() -> Any:
    """One torch thread in the test process: on 2 busy cores it is several times faster than two,
    and it keeps the arithmetic identical to the subprocesses (OMP_NUM_THREADS=1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
