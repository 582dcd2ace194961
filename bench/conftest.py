"""Benchmark fixtures: a PostgreSQL with default durability (fsync and synchronous_commit on), a fresh
migrated database per workload, and a summary table of every figure against its ceiling.

Run: `python -m pytest bench/` (full sizes) or `SKIPLOCK_BENCH_SMOKE=1 python -m pytest bench/`
(small sizes, under a minute: the CI mode). SKIPLOCK_DSN points the suite at another server instead
(its databases are created next to the one named in the DSN).
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from engine import db
from engine.embedded import EmbeddedPostgres, make_temp_dir
from engine.migrate import migrate

SMOKE = os.environ.get("SKIPLOCK_BENCH_SMOKE") == "1"
_counter = itertools.count()


def size(full: int, smoke: int) -> int:
    return smoke if SMOKE else full


@dataclass
class Target:
    name: str
    value: float
    unit: str
    ceiling_name: str | None = None
    ceiling: float | None = None
    goal: float | None = None  # minimum ratio to the ceiling, or maximum value when lower_is_better
    lower_is_better: bool = False

    @property
    def ratio(self) -> float | None:
        if self.ceiling is None or not self.ceiling:
            return None
        return self.value / self.ceiling

    @property
    def passed(self) -> bool | None:
        if self.goal is None:
            return None
        if self.lower_is_better:
            return self.value <= self.goal
        return self.ratio is not None and self.ratio >= self.goal


@dataclass
class Report:
    settings: dict[str, str] = field(default_factory=dict)
    rows: list[Target] = field(default_factory=list)


REPORT = Report()


@pytest.fixture(scope="session")
def bench_server() -> Iterator[str]:
    """DSN of the `postgres` database of the server the suite uses."""
    external = os.environ.get("SKIPLOCK_DSN")
    if external:
        yield external
        return
    base = make_temp_dir("skiplock-bench-")
    server = EmbeddedPostgres(base / "data", settings={"max_connections": "100"})
    server.start()
    dsn = server.dsn("postgres")
    with psycopg.connect(dsn) as conn:
        for name in ("fsync", "synchronous_commit", "full_page_writes", "shared_buffers", "wal_level", "server_version"):
            REPORT.settings[name] = str(conn.execute(f"SHOW {name}").fetchone()[0])
    yield dsn
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def bench_dsn(bench_server: str) -> str:
    """A fresh database with the skiplock schema, on the benchmark server."""
    name = f"bench_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(bench_server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    info = psycopg.conninfo.conninfo_to_dict(bench_server)
    info["dbname"] = name
    dsn = psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in info.items()})
    with db.connect(dsn) as conn:
        migrate(conn)
    return dsn


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def record(target: Target) -> Target:
    REPORT.rows.append(target)
    return target


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not REPORT.rows:
        return
    write = terminalreporter.write_line
    write("")
    write(f"skiplock benchmark targets{' (SMOKE sizes: figures not meaningful)' if SMOKE else ''}")
    if REPORT.settings:
        write("server: " + ", ".join(f"{k}={v}" for k, v in REPORT.settings.items()))
    header = f"{'figure':<44} {'value':>14} {'ceiling':>24} {'ratio':>7} {'goal':>8} {'result':>6}"
    write(header)
    write("-" * len(header))
    for row in REPORT.rows:
        ceiling = f"{row.ceiling:,.0f} ({row.ceiling_name})" if row.ceiling is not None else ""
        ratio = f"{row.ratio:.0%}" if row.ratio is not None else ""
        if row.goal is None:
            goal = ""
        elif row.lower_is_better:
            goal = f"<={row.goal:g}"
        else:
            goal = f">={row.goal:.0%}"
        result = {None: "", True: "pass", False: "MISS"}[row.passed]
        write(f"{row.name:<44} {row.value:>10,.1f} {row.unit:<3} {ceiling:>24} {ratio:>7} {goal:>8} {result:>6}")
