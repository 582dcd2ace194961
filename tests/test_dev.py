"""engine.dev's parts with typed options (the CLI's `engine dev` itself is tested in test_cli.py)."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

from engine.config import load_settings
from engine.dev import start_engine_process
from engine.supervisor import EngineOptions


def test_engine_log_is_private(tmp_path: Path) -> None:
    settings = dataclasses.replace(load_settings(None, environ={}), dsn="host=/nonexistent-skiplock port=1 dbname=x")
    log = tmp_path / "engine-dev.log"
    engine = start_engine_process(settings, EngineOptions(workers=1, flows="noop", drain=True), log_path=str(log))
    engine.join(60)
    assert engine.exitcode not in (0, None)
    assert stat.S_IMODE(log.stat().st_mode) == 0o600  # job data and errors land here
