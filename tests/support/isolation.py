"""Per-process state for parallel runs (pytest-xdist): each xdist worker is its own session with its own
PostgreSQL (support.postgres), and here its own XDG_RUNTIME_DIR, so a test's `engine dev` records its
cluster where no other worker's "no database configured" test can find it (engine.embedded.dev_state_path).
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


def pytest_unconfigure(config: pytest.Config) -> None:
    if _runtime_dir is not None:
        if _previous is None:
            os.environ.pop("XDG_RUNTIME_DIR", None)
        else:
            os.environ["XDG_RUNTIME_DIR"] = _previous
        shutil.rmtree(_runtime_dir, ignore_errors=True)
