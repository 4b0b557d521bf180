"""Shared fixtures; the helpers themselves live in `tests/helpers` (imported as `tests.helpers`,
the repository root being on pytest's `pythonpath`)."""

from __future__ import annotations

import filecmp

import pytest

from tests.helpers.data import CONFORMANCE, SHARED, run_cfsc


def pytest_sessionstart(session):
    # The copy in tests/data must stay identical to ../shared/conformance when that exists.
    if SHARED.is_dir():
        cmp = filecmp.dircmp(SHARED, CONFORMANCE)
        stack = [cmp]
        while stack:
            c = stack.pop()
            bad = c.left_only + c.diff_files
            if bad:
                raise pytest.UsageError(f"tests/data/conformance differs from ../shared/conformance: {bad}")
            stack.extend(c.subdirs.values())


@pytest.fixture
def cfsc():
    return run_cfsc


@pytest.fixture
def forkable():
    """A process a forked child may start from (`cfsc.base.forked.usable`).  Earlier tests in
    this worker may have left the shared hashing pool's idle threads, with which nothing forks:
    they are ended here, so the forked paths really run; any other thread left is a leak."""
    from cfsc.base import forked, fsverity

    fsverity.close_hash_pool()
    if not forked.usable():
        import threading

        left = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
        pytest.fail(f"threads still running, so forked paths would fall back to sequential ones: {left}")
