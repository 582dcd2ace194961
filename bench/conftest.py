"""Benchmark fixtures: a PostgreSQL with default durability (fsync and synchronous_commit on), a fresh
migrated database per workload, the ceilings measured in the same run, and a summary table of every
figure against its ceiling (printed at the end, written as JSON, drawn as bench/results/drain.png).

Run: `python -m bench` or `python -m pytest bench/` (full sizes), `SKIPLOCK_BENCH_SMOKE=1 python -m
pytest bench/` (small sizes, under a minute: the CI mode). SKIPLOCK_DSN points the suite at another
server instead (its databases are created next to the one named in the DSN; it needs CREATEDB).

Targets never fail the run (benchmarks report; a missed target prints MISS). Every workload asserts
its own correctness: all jobs completed exactly once, counts right, the engine exited cleanly.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import platform
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from engine import db
from engine.embedded import EmbeddedPostgres, make_temp_dir
from engine.migrate import migrate

SMOKE = os.environ.get("SKIPLOCK_BENCH_SMOKE") == "1"
RESULTS = Path(os.environ.get("SKIPLOCK_BENCH_RESULTS") or Path(__file__).parent / "results")
_counter = itertools.count()

# Shown with every run whatever their source; every other setting not at its default is listed too.
KEY_SETTINGS = ("server_version", "fsync", "synchronous_commit", "full_page_writes", "wal_sync_method",
                "shared_buffers", "max_connections", "wal_level", "autovacuum", "autovacuum_naptime")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


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

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "passed": self.passed}


@dataclass
class Report:
    settings: dict[str, str] = field(default_factory=dict)
    changed: dict[str, str] = field(default_factory=dict)  # settings not at their built-in default
    rows: list[Target] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # details of each workload, for the JSON
    started_at: str = field(default_factory=lambda: _now())
    load: dict[str, Any] = field(default_factory=dict)  # load average around each workload

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": "skiplock bench",
            "smoke": SMOKE,
            "started_at": self.started_at,
            "finished_at": _now(),
            "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                     "loadavg_at_end": list(os.getloadavg())},
            "server": {"settings": self.settings, "changed_from_default": self.changed},
            "targets": [row.to_dict() for row in self.rows],
            "figures": self.figures,
            "load": self.load,
        }


REPORT = Report()


def record(target: Target) -> Target:
    REPORT.rows.append(target)
    return target


def figure(name: str, value: Any) -> Any:
    """Keep a workload's details (rounds, percentiles, sizes) for the JSON report."""
    REPORT.figures[name] = value
    return value


def _read_settings(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in KEY_SETTINGS:
            REPORT.settings[name] = str(conn.execute(f"SHOW {name}").fetchone()[0])
        rows = conn.execute(
            "SELECT name, current_setting(name), source FROM pg_settings "
            "WHERE source NOT IN ('default', 'override', 'client', 'session') "
            "AND setting IS DISTINCT FROM boot_val ORDER BY name").fetchall()
        REPORT.changed = {name: f"{value} ({source})" for name, value, source in rows}


BENCH_SERVER_SETTINGS = {"max_connections": "300", "max_wal_size": "8GB", "min_wal_size": "2GB"}


@pytest.fixture(scope="session")
def bench_server() -> Iterator[str]:
    """DSN of the `postgres` database of the server the suite uses."""
    external = os.environ.get("SKIPLOCK_DSN")
    if external:
        _read_settings(external)
        yield external
        return
    base = make_temp_dir("skiplock-bench-")
    # Default durability: fsync, synchronous_commit and full_page_writes stay on. The WAL sizes are
    # the README's advice for a queue at tens of thousands of jobs/s: at the 1 GB default a checkpoint
    # came every 10-20 s, and the 10-minute steady run could not hold 80% of its ramp's rate.
    server = EmbeddedPostgres(base / "data", settings=BENCH_SERVER_SETTINGS)
    server.start()
    dsn = server.dsn("postgres")
    _read_settings(dsn)
    yield dsn
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


def new_database(server_dsn: str) -> str:
    """A fresh database with the skiplock schema on the benchmark server; returns its DSN."""
    name = f"bench_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    info = psycopg.conninfo.conninfo_to_dict(server_dsn)
    info["dbname"] = name
    dsn = psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in info.items()})
    with db.connect(dsn) as conn:
        migrate(conn)
    return dsn


@pytest.fixture
def bench_dsn(bench_server: str) -> str:
    """A fresh database with the skiplock schema, on the benchmark server."""
    return new_database(bench_server)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(autouse=True)
def _load_average(request: pytest.FixtureRequest) -> Iterator[None]:
    """The machine's load average around each workload: other work on it slows figures down."""
    before = os.getloadavg()[0]
    yield
    REPORT.load[request.node.name] = {"before": round(before, 2), "after": round(os.getloadavg()[0], 2)}


# -- ceilings and peak, measured once per run and shared by the workloads ---------------------------


class Ceilings:
    """Raw-SQL ceilings measured on demand (each key on a database of its own) and kept for the run,
    so a workload run alone (`-k`) still gets its ceiling from the same run. Workloads add rounds
    right next to their own (interleaved), and every figure uses the best round of the run."""

    def __init__(self, server_dsn: str) -> None:
        self.server_dsn = server_dsn
        self.rounds: dict[tuple[int, int], list[float]] = {}
        self.rows: dict[tuple[int, int], Target] = {}  # the ceiling's row in the table, kept at the best
        self._dsns: dict[tuple[int, int], str] = {}
        self.copy_rounds: list[float] = []
        self.copy_row: Target | None = None
        self._copy_dsn: str | None = None

    def measure_drain(self, processes: int, batch: int, jobs: int) -> float:
        """One more round of the raw drain; returns its rate."""
        from bench.workloads import raw_drain

        key = (processes, batch)
        if key not in self._dsns:
            self._dsns[key] = new_database(self.server_dsn)
        rate = raw_drain(self._dsns[key], jobs, processes, batch).per_second
        self.rounds.setdefault(key, []).append(rate)
        REPORT.figures.setdefault("raw_drain", {})[f"p{processes}_b{batch}"] = {
            "jobs": jobs, "rounds": self.rounds[key], "best": max(self.rounds[key])}
        if key in self.rows:
            self.rows[key].value = max(self.rounds[key])
        return rate

    def record_drain(self, processes: int, batch: int, jobs: int, rounds: int) -> Target:
        """The ceiling's own row in the table; later interleaved rounds keep it at the run's best."""
        key = (processes, batch)
        self.rows[key] = record(Target(f"raw-SQL drain ceiling, batch {batch}, {processes} proc",
                                       self.drain(processes, batch, jobs, rounds), "j/s"))
        return self.rows[key]

    def drain(self, processes: int, batch: int, jobs: int, rounds: int) -> float:
        """The best raw drain rate of the run, measuring `rounds` rounds first if there are none yet."""
        key = (processes, batch)
        if key not in self.rounds:
            for _ in range(rounds):
                self.measure_drain(processes, batch, jobs)
        return max(self.rounds[key])

    def measure_copy(self, rows: int) -> float:
        """One more round of raw COPY; returns its rate."""
        from bench.workloads import raw_copy

        if self._copy_dsn is None:
            self._copy_dsn = new_database(self.server_dsn)
        rate = raw_copy(self._copy_dsn, rows).per_second
        self.copy_rounds.append(rate)
        REPORT.figures["raw_copy"] = {"rows": rows, "rounds": self.copy_rounds, "best": max(self.copy_rounds)}
        if self.copy_row is not None:
            self.copy_row.value = max(self.copy_rounds)
        return rate

    def copy(self, rows: int, rounds: int) -> float:
        """The best raw COPY rate of the run, measuring `rounds` rounds first if there are none yet."""
        if not self.copy_rounds:
            for _ in range(rounds):
                self.measure_copy(rows)
        return max(self.copy_rounds)

    def record_copy(self, rows: int, rounds: int) -> Target:
        self.copy_row = record(Target("raw COPY ceiling", self.copy(rows, rounds), "r/s"))
        return self.copy_row


@pytest.fixture(scope="session")
def ceilings(bench_server: str) -> Ceilings:
    return Ceilings(bench_server)


PEAK: dict[str, float] = {}  # "drain_w2": the engine's 2-worker, batch-500 drain rate of this run
SMOKE_LOAD_CAP = 5_000.0  # jobs/s: a smoke run's peak (5,000-job drains) is noise; keep its loads light


def half_of(peak: float) -> float:
    """The rate of a "50% load": half the peak, capped in smoke mode."""
    return min(peak / 2, SMOKE_LOAD_CAP) if SMOKE else peak / 2


# -- reporting ---------------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    if abs(value) >= 1000 or float(value).is_integer():
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table_lines(report: dict[str, Any]) -> list[str]:
    """The summary table of a report dict (as written to JSON)."""
    lines = [f"skiplock benchmark targets, {report['started_at']}"
             + (" (SMOKE sizes: figures not meaningful, targets never fail)" if report["smoke"] else "")]
    settings = report["server"]["settings"]
    if settings:
        lines.append("server: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    changed = report["server"].get("changed_from_default") or {}
    if changed:
        lines.append("settings changed from PostgreSQL defaults: " + ", ".join(f"{k}={v}" for k, v in changed.items()))
    host = report.get("host", {})
    lines.append(f"host: {host.get('cpus')} CPUs, load average at end {host.get('loadavg_at_end', [0])[0]:.2f}")
    header = f"{'figure':<50} {'value':>16} {'ceiling':>27} {'ratio':>7} {'goal':>9} {'result':>6}"
    lines += [header, "-" * len(header)]
    for row in report["targets"]:
        ceiling = f"{_fmt(row['ceiling'])} ({row['ceiling_name']})" if row["ceiling"] is not None else ""
        ratio = f"{row['ratio']:.0%}" if row["ratio"] is not None else ""
        if row["goal"] is None:
            goal = ""
        elif row["lower_is_better"]:
            goal = f"<={row['goal']:g}"
        else:
            goal = f">={row['goal']:.0%}"
        result = {None: "", True: "pass", False: "MISS"}[row["passed"]]
        value = f"{_fmt(row['value'])} {row['unit']}"
        lines.append(f"{row['name']:<50} {value:>16} {ceiling:>27} {ratio:>7} {goal:>9} {result:>6}")
    return lines


def _draw_plot(report: dict[str, Any]) -> str:
    from bench.plot import drain_plot

    figs = report["figures"]
    workers = {int(k): v["best"] for k, v in figs.get("engine_drain", {}).items()}
    sweep = {int(k): v["best"] for k, v in figs.get("batch_sweep", {}).items()}
    if not workers or not sweep:
        return "drain plot not drawn: the workers and batch-size workloads did not both run"
    raw = figs.get("raw_drain", {})
    raw_workers = {int(k[1:].split("_")[0]): v["best"] for k, v in raw.items() if k.endswith("_b500")}
    raw_batches = {int(k.split("_b")[1]): v["best"] for k, v in raw.items() if k.startswith("p2_")}
    if 2 in workers:
        sweep.setdefault(500, workers[2])
    s = report["server"]["settings"]
    subtitle = (f"{report['started_at']}  {report['host']['cpus']} CPUS  POSTGRESQL {s.get('server_version', '?')}  "
                f"FSYNC {s.get('fsync', '?')}  SYNCHRONOUS_COMMIT {s.get('synchronous_commit', '?')}"
                + ("  SMOKE SIZES" if SMOKE else ""))
    path = RESULTS / ("drain-smoke.png" if SMOKE else "drain.png")
    drain_plot(path, workers, raw_workers, sweep, raw_batches, subtitle)
    return f"drain plot: {path}"


def _draw_size_plot(report: dict[str, Any]) -> str:
    """skiplock.jobs' size over the steady workload's long run (and the autovacuum-only run before
    it, when SKIPLOCK_BENCH_STEADY_BEFORE=1 ran it)."""
    from bench.plot import BEFORE, ENGINE, size_plot

    figs = report["figures"]
    series = {}
    if "steady_before" in figs:
        series["AUTOVACUUM ONLY (VACUUM_DEAD_TUPLES = 0)"] = [(s["at"], s["jobs_total_mb"]) for s in figs["steady_before"]["samples"]]
    series["ENGINE VACUUM PASS (DEFAULT)"] = [(s["at"], s["jobs_total_mb"]) for s in figs["steady"]["samples"]]
    rate = figs["steady"]["long_run"]["rate"]
    path = RESULTS / ("steady-size-smoke.png" if SMOKE else "steady-size.png")
    size_plot(path, series, f"{report['started_at']}  OFFERED {rate:,.0f} JOBS/S  LOAD AVERAGE AT END "
                            f"{report['host']['loadavg_at_end'][0]:.1f}" + ("  SMOKE SIZES" if SMOKE else ""),
              colors=(BEFORE, ENGINE) if len(series) == 2 else (ENGINE,))
    return f"size plot: {path}"
@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # The tests may run with pytest-xdist (-n); benchmarks must run one at a time in one process
    # (pytest-benchmark disables itself under xdist, and workloads would share the cores).
    if hasattr(config.option, "numprocesses"):
        config.option.numprocesses = None
        config.option.dist = "no"


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not REPORT.rows:
        return
    report = REPORT.to_dict()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("smoke.json" if SMOKE else "latest.json")
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    notes = [f"results: {path}"]
    try:
        notes.append(_draw_plot(report))
    except Exception as exc:  # a plot must never hide the figures
        notes.append(f"drain plot failed: {type(exc).__name__}: {exc}")
    if "steady" in report["figures"]:
        try:
            notes.append(_draw_size_plot(report))
        except Exception as exc:
            notes.append(f"size plot failed: {type(exc).__name__}: {exc}")
    session.config._skiplock_bench = (report, notes)  # type: ignore[attr-defined]


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: Any, output_json: dict[str, Any]) -> None:
    """`--benchmark-json PATH` gets every figure, ratio, target and the server settings too."""
    if REPORT.rows:
        output_json["skiplock"] = REPORT.to_dict()


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    stored = getattr(config, "_skiplock_bench", None)
    if stored is None:
        return
    report, notes = stored
    write = terminalreporter.write_line
    write("")
    for line in table_lines(report) + notes:
        write(line)


@pytest.fixture(scope="session")
def peak(bench_server: str, tmp_path_factory: pytest.TempPathFactory) -> float:
    """The engine's peak drain rate of this run (2 workers, batch 500): from the drain workload when it
    ran first, else measured here. Loads of "50% of peak" are half of it."""
    if "drain_w2" not in PEAK:
        from bench.workloads import best, engine_drain

        rates = engine_drain(new_database(bench_server), size(50_000, 5_000), 2, 500,
                             tmp_path_factory.mktemp("peak"))
        PEAK["drain_w2"] = best(rates).per_second
        REPORT.figures["peak_measured_for_load"] = PEAK["drain_w2"]
    return PEAK["drain_w2"]
