"""Fixtures for tests that run real `engine run` processes, and polling for what they do.

Registered as a plugin by tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

SUPPORT_DIR = Path(__file__).resolve().parent


# Engine timings small enough for fault tests to run in seconds.
BASE = """
[global]
heartbeat_interval = "0.5s"
stale_after = "2s"
rescue_interval = "0.5s"
poll_interval = "0.5s"
grace_period = "5s"
tick_interval = "0.25s"
"""
STALE_AFTER = 2.0
RESCUE_INTERVAL = 0.5
GRACE = 5.0


def rows(dsn: str, sql: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        return connection.execute(sql, params).fetchall()


def log_has(engine: Any, msg: str, **fields: Any) -> list[dict]:
    return [line for line in engine.log_lines()
            if msg in line.get("msg", "") and all(line.get(k) == v for k, v in fields.items())]


def tail(engine: Any, chars: int = 4000) -> str:
    return engine.log_path.read_text(errors="replace")[-chars:]


@dataclass
class EngineProcess:
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_lines(self) -> list[dict]:
        lines = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                lines.append({"raw": raw})
        return lines

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def start_engine(tmp_path: Path) -> Iterator:
    """start_engine(dsn, config_text, *args, env=None) -> EngineProcess running `engine run *args`.

    The config file is written to tmp_path; tests/support is on PYTHONPATH so test handlers
    (`support.handlers:...`) import in the workers. Every process is killed at teardown.
    """
    started: list[EngineProcess] = []

    def start(dsn: str, config_text: str, *args: str, env: dict[str, str] | None = None) -> EngineProcess:
        config = tmp_path / f"config-{len(started)}.toml"
        config.write_text(config_text)
        log_path = tmp_path / f"engine-{len(started)}.log"
        full_env = {**os.environ, "PYTHONPATH": f"{SUPPORT_DIR.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                    "SKIPLOCK_DSN": dsn, **(env or {})}
        full_env.pop("SKIPLOCK_ENV", None)
        with open(log_path, "wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", "--config", str(config), *args],
                                       stdout=log, stderr=subprocess.STDOUT, env=full_env)
        engine = EngineProcess(process, log_path)
        started.append(engine)
        return engine

    yield start
    for engine in started:
        engine.stop()


def wait_for(predicate, timeout: float, interval: float = 0.05, message: str = "condition"):
    """Poll until predicate() is truthy; returns its value or fails the test with `message`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {message}")
