"""Parallel runs (pytest-xdist, `--dist loadgroup`).

Each xdist worker is its own session with its own PostgreSQL (support.postgres), and here its own
XDG_RUNTIME_DIR, so a test's `engine dev` records its cluster where no other worker's "no database
configured" test can find it (engine.embedded.dev_state_path).

The fault tests time engines against small timings (stale_after 2 s, waits of 10-20 s for what takes
a second or two); run side by side they starve each other of the 2 cores. They share one xdist group,
so one worker runs them one after another while the other workers run the rest.
Registered as a plugin by tests/conftest.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from engine.embedded import make_temp_dir

_runtime_dir: Path | None = None
_previous: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _runtime_dir, _previous
    _previous = os.environ.get("XDG_RUNTIME_DIR")
    _runtime_dir = make_temp_dir("skiplock-run-")
    _runtime_dir.chmod(0o700)
    os.environ["XDG_RUNTIME_DIR"] = str(_runtime_dir)


TIMED_MODULES = frozenset({
    "test_liveness.py", "test_engine.py", "test_executors.py", "test_bad_jobs.py", "test_notify_queue.py",
    "test_proxy.py", "test_retries.py", "test_console_e2e.py", "test_concurrency.py", "test_engine_smoke.py",
    "test_flow_control.py", "test_console_engines.py", "test_deferred_acks.py",
})


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in TIMED_MODULES and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group("timed"))


def pytest_unconfigure(config: pytest.Config) -> None:
    if _runtime_dir is not None:
        if _previous is None:
            os.environ.pop("XDG_RUNTIME_DIR", None)
        else:
            os.environ["XDG_RUNTIME_DIR"] = _previous
        shutil.rmtree(_runtime_dir, ignore_errors=True)
