"""The chaos run (issue 10): producers at a steady rate, two engines, and faults on a schedule.

- a worker killed (-9) every 10 s, an engine killed (-9) every 60 s and started again,
- PostgreSQL restarted every 2 minutes, `fast` and `immediate` shutdown in turn,
- a worker and a whole engine (supervisor and workers) SIGSTOPped past stale_after, then SIGCONTed,
- database outages shorter and longer than stale_after: a TCP proxy between the engines and the
  server (tests/support/proxy.py) cuts every connection and refuses new ones, then lets them through.

Everything is judged from execution records the handler writes (bench/handlers.py `chaos`: a line
when a job starts and one when it ends, per worker process), not from the engine's counters:
- no job lost: every job the producers enqueued (their own record of what committed) has ended;
- none stuck: when the producers stop, everything drains (nothing pending, running or dead);
- no two executions of one job overlap in time, zombies included. An execution with no end line
  ended when its process died; a monitor polls every worker process the run has seen (orphans
  too) and takes the first poll that finds it gone as its end (late by at most one poll, which
  errs towards reporting an overlap). One still alive at the end counts as running forever.
Reported: repeats (executions beyond the first, allowed by at-least-once) and the longest stall (no
job finished) in the window after each kind of fault; also whether the short outages marked any
worker lost (they must not).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from engine import db
from engine.embedded import EmbeddedPostgres, make_temp_dir
from engine.migrate import migrate
from engine.queue import Queue

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the tests' TCP proxy, one implementation for both
from support.proxy import TcpProxy, unix_socket_of  # noqa: E402

FLOW = "chaos"
STALE_AFTER = 3.0
SLOW_EVERY = 50  # one job in SLOW_EVERY sleeps SLOW_MS, so faults strike jobs mid-run
SLOW_MS = 300
STALL_WINDOW = 20.0  # at most this long after a fault's end (and before the next fault) is its stall looked for
MONITOR_POLL = 0.02

ENGINE_CONFIG = f"""[global]
log_format = "json"
heartbeat_interval = "0.5s"
stale_after = "{STALE_AFTER:g}s"
rescue_interval = "0.5s"
poll_interval = "0.5s"
grace_period = "5s"
tick_interval = "0.5s"

[flows.{FLOW}]
handler = "bench.handlers:chaos"
batch_size = 100
max_attempts = 100
backoff = {{ base = "0.05s", cap = "0.5s", jitter = 0 }}
"""


# -- the schedule ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    at: float  # seconds from the start
    kind: str


def schedule(seconds: float) -> list[Fault]:
    """The faults of a run of `seconds`: the periodic ones at their periods, the one-off kinds
    (stops, outages) spread between them and repeated every 150 s. A 60 s run has each kind once."""
    faults = [Fault(t, "kill_worker") for t in _every(5, 10, seconds)]
    faults += [Fault(t, "kill_engine") for t in _every(27, 60, seconds)]
    faults += [Fault(t, "restart_pg_fast" if i % 2 == 0 else "restart_pg_immediate")
               for i, t in enumerate(_every(17, 120, seconds))]
    if seconds <= 90:  # the smoke run: the second restart mode too, and each one-off kind once
        faults.append(Fault(44, "restart_pg_immediate"))
    for offset, kind in ((8, "outage_short"), (12, "stop_worker"), (32, "outage_long"), (38, "stop_engine")):
        faults += [Fault(t, kind) for t in _every(offset, 150, seconds)]
    return sorted(faults, key=lambda f: f.at)


def _every(first: float, period: float, seconds: float) -> list[float]:
    last = seconds - 8  # leave the run's end to the drain
    return [first + k * period for k in range(int((last - first) // period) + 1)] if first <= last else []


# -- processes ---------------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[19])


def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(p) for p in (task / "children").read_text().split()]
    except OSError:
        pass
    return found


class Monitor(threading.Thread):
    """Every worker process the run has seen, and when it was first found gone."""

    def __init__(self, supervisors: Callable[[], list[int]]) -> None:
        super().__init__(name="chaos-monitor", daemon=True)
        self.supervisors = supervisors
        self.seen: dict[tuple[int, int], list[float]] = {}  # (pid, start ticks) -> [first seen, gone at]
        self.alive: dict[int, tuple[int, int]] = {}  # pid -> key, of those not yet gone
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.poll()
            time.sleep(MONITOR_POLL)

    def poll(self) -> None:
        now = time.time()
        with self.lock:
            for pid in [p for s in self.supervisors() for p in children(s)]:
                stat = _stat(pid)
                if stat is not None and stat[0] not in "ZX" and pid not in self.alive:
                    key = (pid, stat[1])
                    self.seen[key] = [now, float("inf")]
                    self.alive[pid] = key
            for pid, key in list(self.alive.items()):
                stat = _stat(pid)
                if stat is None or stat[0] in "ZX" or stat[1] != key[1]:
                    self.seen[key][1] = now
                    del self.alive[pid]

    def gone_at(self, pid: int, at: float) -> float:
        """When the process `pid` that was running at `at` was found gone (inf: still alive or unknown)."""
        with self.lock:
            spans = [s for (p, _), s in self.seen.items() if p == pid and s[0] - 1.0 <= at]
        return min((s[1] for s in spans if s[1] >= at), default=float("inf"))


class ChaosEngine:
    """One `engine run` whose supervisor the run may kill and start again."""

    def __init__(self, name: str, dsn: str, workdir: Path, workers: int, records: Path) -> None:
        self.name, self.dsn, self.workdir, self.workers, self.records = name, dsn, workdir, workers, records
        self.config = workdir / f"{name}.toml"
        self.config.write_text(ENGINE_CONFIG)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKIPLOCK_")}
        env.update({"SKIPLOCK_DSN": self.dsn, "SKIPLOCK_CHAOS_RECORDS": str(self.records),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
        log = open(self.workdir / f"{self.name}-{self.starts}.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "run", "--config", str(self.config),
             "--workers", str(self.workers), "--flows", FLOW],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, preexec_fn=_die_with_parent)
        log.close()
        self.starts += 1

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    def worker_pids(self) -> list[int]:
        return children(self.pid) if self.pid else []

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _producer(dsn: str, rate: float, seconds: float, produced: str, stop: Any) -> None:
    """Enqueues `rate` jobs/s in 50 ms batches. Each batch has a batch key, so a retry after a lost
    reply cannot enqueue it twice; it is retried until it commits, and then written to `produced`."""
    tick = 0.05
    with Queue(dsn, application_name="skiplock-chaos-producer") as queue, open(produced, "a") as out:
        started = time.monotonic()
        sent = batch = 0
        while not stop.is_set() and time.monotonic() - started < seconds:
            due = int(rate * (time.monotonic() - started))
            if due > sent:
                count = min(due - sent, int(rate))
                payloads = [{"n": n, **({"ms": SLOW_MS} if n % SLOW_EVERY == 0 else {})}
                            for n in range(sent, sent + count)]
                key = f"chaos-{os.getpid()}-{batch}"
                while True:
                    try:
                        queue.enqueue_many(FLOW, payloads, batch_key=key, allow_unknown_flow=True)
                        break
                    except Exception:  # the database restarting: the same key makes the retry safe
                        time.sleep(0.2)
                out.write(f"{sent} {sent + count}\n")
                out.flush()
                sent += count
                batch += 1
            time.sleep(tick)


# -- the run -----------------------------------------------------------------------------------------


@dataclass
class FaultEvent:
    kind: str
    start: float
    end: float
    detail: str = ""


@dataclass
class ChaosResult:
    seconds: float
    rate: float
    produced: int
    completed: int
    lost: list[int]
    stuck: int
    dead: int
    executions: int
    repeats: int
    repeated_jobs: int
    overlaps: list[str]
    longest_stall: dict[str, float]
    faults: dict[str, int]
    lost_after_short_outage: int
    drain_seconds: float
    engine_restarts: int
    events: list[FaultEvent] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["lost"] = self.lost[:20]
        out["lost_count"] = len(self.lost)
        out["overlaps"] = self.overlaps[:20]
        out["overlap_count"] = len(self.overlaps)
        return out


class ChaosRun:
    def __init__(self, workdir: Path, seconds: float, rate: float, workers: int = 2, log: Callable[[str], None] = print):
        self.workdir, self.seconds, self.rate, self.workers, self.log = workdir, seconds, rate, workers, log
        self.records = workdir / "records"
        self.records.mkdir(parents=True, exist_ok=True)
        self.produced_path = workdir / "produced.txt"
        self.events: list[FaultEvent] = []
        self.rng = random.Random(10)
        self.restarts = 0  # engines started again after they exited by themselves
        self.t0 = 0.0

    def run(self) -> ChaosResult:
        base = make_temp_dir("skiplock-chaos-")
        self.server = EmbeddedPostgres(base / "data", settings={"max_connections": "100"})  # default durability
        self.server.start()
        try:
            self.dsn = self.server.dsn()
            with db.connect(self.dsn) as conn:
                migrate(conn)
            with TcpProxy(unix_socket_of(self.dsn)) as proxy:
                self.proxy = proxy
                return self._run()
        finally:
            self.server.stop()

    def _run(self) -> ChaosResult:
        engine_dsn = self.proxy.dsn(self.dsn)
        self.engines = [ChaosEngine(f"engine-{i}", engine_dsn, self.workdir, self.workers, self.records)
                        for i in range(2)]
        monitor = Monitor(lambda: [e.pid for e in self.engines if e.pid])
        for engine in self.engines:
            engine.start()
        monitor.start()
        self._wait_workers()
        ctx = multiprocessing.get_context("spawn")
        stop = ctx.Event()
        producer = ctx.Process(target=_producer, args=(self.dsn, self.rate, self.seconds, str(self.produced_path), stop))
        self.t0 = time.time()
        producer.start()
        for fault in schedule(self.seconds):
            self._until(self.t0 + fault.at)
            self._inject(fault.kind)
        self._until(self.t0 + self.seconds)
        producer.join(60)
        if producer.is_alive():
            stop.set()
            producer.join(30)
        drain_started = time.time()
        produced = self._produced()
        drained = self._wait_drained(produced, timeout=max(30.0, self.seconds / 5))
        self._keep_engines()
        drain_seconds = time.time() - drain_started
        for engine in self.engines:
            code = engine.stop()
            self.log(f"{engine.name}: exit {code}")
        time.sleep(0.5)
        monitor.poll()
        monitor.stopping.set()
        monitor.join(5)
        return self._judge(produced, monitor, drained, drain_seconds)

    def _wait_workers(self, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                live = conn.execute("SELECT count(*) FROM skiplock.workers WHERE state IN ('idle', 'busy')").fetchone()[0]
            if live >= 2 * self.workers:
                return
            time.sleep(0.1)
        raise RuntimeError(f"engines did not start: see {self.workdir}")

    def _until(self, at: float) -> None:
        """Sleep until `at`, acting as the engines' orchestrator meanwhile."""
        while True:
            self._keep_engines()
            left = at - time.time()
            if left <= 0:
                return
            time.sleep(min(left, 0.2))

    def _keep_engines(self) -> None:
        """An engine that exited (one started during an outage exits 2: database unreachable at
        start) is started again, as a container orchestrator would."""
        for engine in self.engines:
            if engine.process is not None and engine.process.poll() is not None:
                self.log(f"{time.time() - self.t0:7.1f}s {engine.name} exited {engine.process.returncode}: started again")
                self.restarts += 1
                engine.start()

    # faults

    def _inject(self, kind: str) -> None:
        start = time.time()
        detail = self._do(kind)
        self.events.append(FaultEvent(kind, start - self.t0, time.time() - self.t0, detail))
        self.log(f"{start - self.t0:7.1f}s {kind} {detail}")

    def _do(self, kind: str) -> str:
        engines = [e for e in self.engines if e.pid]
        if kind == "kill_worker":
            pids = [p for e in engines for p in e.worker_pids()]
            if not pids:
                return "no worker alive"
            pid = self.rng.choice(pids)
            os.kill(pid, signal.SIGKILL)
            return f"pid {pid}"
        if kind == "kill_engine":
            engine = self.engines[len([e for e in self.events if e.kind == "kill_engine"]) % 2]
            if engine.pid:
                os.kill(engine.pid, signal.SIGKILL)
                engine.process.wait()  # type: ignore[union-attr]
            engine.start()
            return f"{engine.name} restarted"
        if kind.startswith("restart_pg_"):
            mode = signal.SIGINT if kind.endswith("fast") else signal.SIGQUIT
            self.server.stop(mode=mode)
            self.server.start()
            return "fast" if mode == signal.SIGINT else "immediate"
        if kind == "stop_worker":
            pids = [p for e in engines for p in e.worker_pids()]
            if not pids:
                return "no worker alive"
            pid = self.rng.choice(pids)
            self._stopped([pid], STALE_AFTER + 1.5)
            return f"pid {pid}"
        if kind == "stop_engine":
            engine = engines[0]
            pids = [engine.pid, *engine.worker_pids()]  # type: ignore[list-item]
            self._stopped(pids, STALE_AFTER + 1.5)
            return f"{engine.name}: {len(pids)} processes"
        if kind in ("outage_short", "outage_long"):
            seconds = STALE_AFTER / 2 if kind == "outage_short" else STALE_AFTER * 1.5
            self.proxy.cut()
            time.sleep(seconds)
            self.proxy.restore()
            return f"{seconds:g} s"
        raise ValueError(f"unknown fault kind {kind!r}")

    @staticmethod
    def _stopped(pids: list[int], seconds: float) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        time.sleep(seconds)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    # the checks

    def _produced(self) -> int:
        ranges = [tuple(map(int, line.split())) for line in self.produced_path.read_text().splitlines() if line]
        covered = sorted(ranges)
        expected = 0
        for first, last in covered:
            assert first == expected, f"producer record has a gap at {expected}: {first}"
            expected = last
        return expected

    def _wait_drained(self, produced: int, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    left = conn.execute("SELECT count(*) FROM skiplock.jobs WHERE flow = %s AND status IN "
                                        "('pending', 'running')", (FLOW,)).fetchone()[0]
                    done = conn.execute("SELECT count(*) FROM skiplock.jobs_done WHERE flow = %s", (FLOW,)).fetchone()[0]
                if not left and done >= produced:
                    return True
            except psycopg.OperationalError:
                pass
            time.sleep(0.2)
        return False

    def _read_records(self) -> tuple[dict[int, list[tuple[float, float, int]]], list[float]]:
        """{job: [(start, end, pid)]} and every end time."""
        runs: dict[int, list[tuple[float, float, int]]] = defaultdict(list)
        ends: list[float] = []
        for path in sorted(self.records.glob("exec-*.txt")):
            pid = int(path.name.split("-")[1])
            open_runs: dict[int, float] = {}
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) != 3:
                    continue  # a line cut by a kill
                kind, n, at = parts[0], int(parts[1]), float(parts[2])
                if kind == "s":
                    open_runs[n] = at
                elif n in open_runs:
                    runs[n].append((open_runs.pop(n), at, pid))
                    ends.append(at)
            for n, at in open_runs.items():
                runs[n].append((at, -1.0, pid))  # no end line: ended when its process did
        return runs, sorted(ends)

    def _judge(self, produced: int, monitor: Monitor, drained: bool, drain_seconds: float) -> ChaosResult:
        runs, ends = self._read_records()
        overlaps: list[str] = []
        repeats = repeated_jobs = executions = 0
        for n, spans in runs.items():
            resolved = sorted((s, e if e >= 0 else monitor.gone_at(pid, s), pid) for s, e, pid in spans)
            executions += len(resolved)
            if len(resolved) > 1:
                repeats += len(resolved) - 1
                repeated_jobs += 1
            for (s1, e1, p1), (s2, _, p2) in zip(resolved, resolved[1:]):
                if e1 > s2:
                    overlaps.append(f"job {n}: pid {p1} ran {s1:.3f}-{e1:.3f}, pid {p2} started {s2:.3f}")
        completed = {n for n, spans in runs.items() if any(e >= 0 for _, e, _ in spans)}
        lost = [n for n in range(produced) if n not in completed]
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            stuck, dead = conn.execute(
                "SELECT count(*) FILTER (WHERE status IN ('pending', 'running')), count(*) FILTER (WHERE status = 'dead') "
                "FROM skiplock.jobs WHERE flow = %s", (FLOW,)).fetchone()
            short = [e for e in self.events if e.kind == "outage_short"]
            lost_short = 0
            for event in short:  # marked lost by a stale heartbeat in the outage or just after it
                lost_short += conn.execute(
                    "SELECT count(*) FROM skiplock.workers WHERE state = 'lost' AND lost_reason IS NULL "
                    "AND stopped_at BETWEEN to_timestamp(%s) AND to_timestamp(%s)",
                    (self.t0 + event.start, self.t0 + event.end + STALE_AFTER + 2)).fetchone()[0]
        stalls: dict[str, float] = {}
        for event, after in zip(self.events, [*self.events[1:], None]):
            # After this fault and before the next one (at most STALL_WINDOW past its end).
            until = min(event.end + STALL_WINDOW, after.start if after is not None else self.seconds + STALL_WINDOW)
            stall = _stall(ends, self.t0 + event.start, self.t0 + max(until, event.end))
            stalls[event.kind] = max(stalls.get(event.kind, 0.0), stall)
        stalls["whole run"] = _stall(ends, self.t0 + 1.0, self.t0 + self.seconds)
        faults: dict[str, int] = defaultdict(int)
        for event in self.events:
            faults[event.kind] += 1
        return ChaosResult(self.seconds, self.rate, produced, len(completed & set(range(produced))), lost,
                           int(stuck) + (0 if drained else 1), int(dead), executions, repeats, repeated_jobs,
                           overlaps, {k: round(v, 3) for k, v in stalls.items()}, dict(faults), int(lost_short),
                           round(drain_seconds, 2), self.restarts, self.events)


def _stall(ends: list[float], start: float, until: float) -> float:
    """The longest time without a job finishing (between two consecutive ends) that overlaps
    [start, until]."""
    longest = 0.0
    for previous, at in zip(ends, ends[1:]):
        if at >= start and previous <= until:
            longest = max(longest, at - previous)
        if previous > until:
            break
    return longest
