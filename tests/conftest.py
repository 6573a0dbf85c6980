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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """For ``make test``'s two workers (pytest-xdist, ``--dist loadgroup``): a test file runs
    whole on one worker, so its module fixtures are built once and its tests keep their order;
    every file with a test on the local SLURM cluster (marked ``slurm``) shares one worker, so
    two files' jobs never queue behind each other on its two nodes. Without xdist the marks do
    nothing. Runs before xdist reads the marks (``tryfirst``)."""
    slurm_files = {item.path for item in items if item.get_closest_marker("slurm")}
    for item in items:
        group = "slurm" if item.path in slurm_files else str(item.path.relative_to(config.rootpath))
        item.add_marker(pytest.mark.xdist_group(group))
