"""Prometheus metrics and the HTTP health endpoints of one engine (`engine run --metrics-port P`).

Where each figure comes from:
- Workers are separate processes and open no port. Each keeps cumulative figures (`WorkerMetrics`:
  counters per flow, error types capped per flow, wait/run histograms), updated once per acked batch
  (never per job: a batch is observed at its mean per job, weighted by its job count), and its
  telemetry thread writes them once per tick to a pipe the supervisor made before the fork
  (`MetricsPipe`: one newline-terminated orjson frame per changed flow, each at most PIPE_BUF bytes, so
  frames of different workers never interleave; a full pipe drops a frame, and the next one carries
  the totals again, since they are cumulative).
- The supervisor (`MetricsHub`) reads the pipe on a thread, keeps the last frame of each worker and
  folds a replaced worker's figures into the engine's totals, and counts its own rescues.
- Fleet-wide gauges (queue depth per flow and state, the oldest due job's age, live/stale/lost workers)
  are read every `metrics_interval` by the one engine holding the metrics lease (table
  skiplock.metrics_leader), with bounded index-only statements (metrics_flow_gauges, health's).
  Other engines export only their own figures. A scrape reads memory only: no statement per scrape;
  prometheus-client renders the text (its generate_latest is most of a scrape's cost). The hub keeps
  each flow's totals as frames arrive and reuses the samples of flows with no new frame since the
  last scrape, so a scrape builds samples only for the flows that moved.
- `/healthz`: the supervisor loop runs and it has live worker processes (a database outage freezes
  workers, it does not fail /healthz: an orchestrator restarting the engine would not help).
  `/readyz`: engine/health.py's verdict (the database answers and the schema is current; degraded is
  still ready), cached for READY_CACHE_S so probes cannot load the database.
"""

from __future__ import annotations

import bisect
import http.server
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from engine import __version__, db, store
from engine.health import Thresholds, Verdict, evaluate, read_facts
from engine.health import unreachable as health_unreachable
from engine.limits import MAX_ERROR_TYPE_CHARS, MAX_ERROR_TYPES_PER_FLOW
from engine.redact import describe_error

log = logging.getLogger("skiplock.metrics")

# Histogram bucket bounds, seconds: ten each (every bucket is a sample per flow in every scrape).
WAIT_BUCKETS: Final = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0)
RUN_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 300.0)
COUNTERS: Final = ("completed", "failed", "dead", "retried", "cancelled")
OTHER: Final = "other"
PIPE_BUF: Final = 4096  # POSIX guarantees at least 512; Linux 4096: writes up to it are atomic
LOOP_STALL_S: Final = 10.0  # /healthz fails when the supervisor loop has not turned for this long
READY_CACHE_S: Final = 2.0
GAUGE_STATES: Final = ("ready", "scheduled", "retrying", "running", "dead")


# ---------------------------------------------------------------------------------------------
# In the worker


@dataclass
class FlowFigures:
    counts: list[int] = field(default_factory=lambda: [0] * len(COUNTERS))
    errors: dict[str, int] = field(default_factory=dict)
    wait: list[int] = field(default_factory=lambda: [0] * (len(WAIT_BUCKETS) + 1))  # per bucket, +Inf last
    run: list[int] = field(default_factory=lambda: [0] * (len(RUN_BUCKETS) + 1))
    # Sums in whole microseconds: integers add and subtract exactly, so an exported _sum never steps
    # back (Prometheus would read that as a counter reset).
    wait_us: int = 0
    run_us: int = 0
    dirty: bool = True

    def add(self, other: FlowFigures, sign: int = 1) -> None:
        """sign=-1 takes `other` away again (a worker's previous frame, replaced by its next)."""
        for i, v in enumerate(other.counts):
            self.counts[i] += sign * v
        for name, v in other.errors.items():
            self.errors[name] = self.errors.get(name, 0) + sign * v
        for i, v in enumerate(other.wait):
            self.wait[i] += sign * v
        for i, v in enumerate(other.run):
            self.run[i] += sign * v
        self.wait_us += sign * other.wait_us
        self.run_us += sign * other.run_us

    def copy(self) -> FlowFigures:
        return FlowFigures(list(self.counts), dict(self.errors), list(self.wait), list(self.run), self.wait_us,
                           self.run_us, False)

    def frame(self) -> dict[str, Any]:
        return {"c": self.counts, "e": self.errors, "w": self.wait, "r": self.run, "wu": self.wait_us,
                "ru": self.run_us}

    @classmethod
    def from_frame(cls, frame: Mapping[str, Any]) -> FlowFigures:
        return cls(list(frame["c"]), dict(frame["e"]), list(frame["w"]), list(frame["r"]), int(frame["wu"]),
                   int(frame["ru"]), False)


def error_label(name: str, known: Mapping[str, int]) -> str:
    """The label an error type counts under: itself while the flow has room, else "other"."""
    name = name[:MAX_ERROR_TYPE_CHARS] or "?"
    if name in known or len(known) < MAX_ERROR_TYPES_PER_FLOW:
        return name
    return OTHER


class WorkerMetrics:
    """One worker's cumulative figures. `batch` and `failures` run once per ack (the worker's main or
    completer thread); `frames` once per tick (the telemetry thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.flows: dict[str, FlowFigures] = {}

    def _flow(self, flow: str) -> FlowFigures:
        figures = self.flows.get(flow)
        if figures is None:
            figures = self.flows[flow] = FlowFigures()
        return figures

    def batch(self, flow: str, completed: int, failed: int, dead: int, retried: int, wait_ms: float,
              run_ms: float, observe: bool = True) -> None:
        """`observe`: False when the times are unknown (a hard stop): counters only."""
        jobs = completed + failed if observe else 0
        with self._lock:
            f = self._flow(flow)
            counts = f.counts
            counts[0] += completed
            counts[1] += failed
            counts[2] += dead
            counts[3] += retried
            if jobs:
                wait_s = wait_ms / 1000.0
                run_s = run_ms / 1000.0
                f.wait[bisect.bisect_left(WAIT_BUCKETS, wait_s / jobs)] += jobs
                f.run[bisect.bisect_left(RUN_BUCKETS, run_s / jobs)] += jobs
                f.wait_us += round(wait_ms * 1000.0)
                f.run_us += round(run_ms * 1000.0)
            f.dirty = True

    def failures(self, flow: str, types: Iterable[str]) -> None:
        with self._lock:
            errors = self._flow(flow).errors
            for name in types:
                label = error_label(name, errors)
                errors[label] = errors.get(label, 0) + 1

    def cancelled(self, flow: str, count: int) -> None:
        """Jobs this worker ended as cancelled (the running-job cancel calls it)."""
        with self._lock:
            f = self._flow(flow)
            f.counts[4] += count
            f.dirty = True

    def frames(self, worker: str, slot: int, pool: Mapping[str, int], circuits: Mapping[str, bool]) -> list[bytes]:
        """The frames of this tick: one per flow changed since the last call, and the worker's own."""
        out = [orjson.dumps({"k": "worker", "id": worker, "s": slot, "pool": pool, "circuits": circuits}) + b"\n"]
        with self._lock:
            for name, f in self.flows.items():
                if f.dirty:
                    f.dirty = False
                    out.append(orjson.dumps({"k": "flow", "id": worker, "s": slot, "flow": name, **f.frame()}) + b"\n")
        return out


class MetricsPipe:
    """Workers -> supervisor, made before the fork. Non-blocking both ways."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.w, False)
        self.dropped = 0

    def send(self, frames: Iterable[bytes]) -> None:  # in the worker
        for frame in frames:
            if len(frame) > PIPE_BUF:
                frame = _shrink(frame)
                if frame is None:
                    self.dropped += 1
                    continue
            try:
                os.write(self.w, frame)
            except BlockingIOError:
                self.dropped += 1  # the next frame carries the totals again


def _shrink(frame: bytes) -> bytes | None:
    """A flow frame past PIPE_BUF (many long error types): keep the largest types, fold the rest."""
    data = orjson.loads(frame)
    errors: dict[str, int] = data.get("e") or {}
    while errors and len(orjson.dumps(data)) + 1 > PIPE_BUF:
        name = min((n for n in errors if n != OTHER), key=lambda n: errors[n], default=None)
        if name is None:
            break
        errors[OTHER] = errors.get(OTHER, 0) + errors.pop(name)
    out = orjson.dumps(data) + b"\n"
    return out if len(out) <= PIPE_BUF else None


def send_worker_metrics(worker: Any) -> None:
    """The telemetry thread's part, once per tick."""
    spec = worker.spec
    if spec.metrics is None:
        return
    stats = worker.pool.get_stats() if worker.pool is not None else {}
    pool = {"size": stats.get("pool_size", 0), "available": stats.get("pool_available", 0),
            "waiting": stats.get("requests_waiting", 0), "max": worker.pool.max_size if worker.pool else 0}
    circuits = {f.name: bool(f.half_open) for f in worker.flows}
    spec.metrics.send(worker.metrics.frames(worker.id, spec.index, pool, circuits))


# ---------------------------------------------------------------------------------------------
# In the supervisor


@dataclass
class Gauges:
    """The leader's last reading of the fleet-wide figures."""

    at: float
    flows: dict[str, dict[str, int]]  # flow -> state -> jobs (counts stop at the cap)
    oldest: dict[str, float]  # flow -> seconds the oldest due job has waited
    workers: dict[str, int]  # live, stale, lost


class MetricsHub:
    """The supervisor's aggregate: worker frames, its own rescues, the leader's gauges, liveness."""

    def __init__(self, engine_id: str, pipe: MetricsPipe) -> None:
        self.engine_id = engine_id
        self.pipe = pipe
        self._lock = threading.Lock()
        # Per flow, the sum of every worker's last frame, replaced workers' included: kept up to date
        # as frames arrive, so a scrape adds nothing up.
        self._totals: dict[str, FlowFigures] = {}
        self._versions: dict[str, int] = {}  # flow -> frames taken for it
        # flow -> (its version, its samples per family): a scrape rebuilds only flows with new frames
        self._samples: dict[str, tuple[int, dict[str, list[Any]]]] = {}
        self.current: dict[int, tuple[str, dict[str, FlowFigures]]] = {}  # slot -> (worker id, flows)
        self.worker_info: dict[int, dict[str, Any]] = {}  # slot -> last worker frame
        self.rescued: dict[str, int] = {}
        self.gauges: Gauges | None = None
        self.leader = False
        self.loop_at = time.monotonic()
        self.live_workers: Callable[[], int] = lambda: 0
        self._stop = threading.Event()
        self._buffer = b""

    # -- input -----------------------------------------------------------------------------------

    def read_available(self, timeout: float = 0.5) -> None:
        ready, _, _ = select.select([self.pipe.r], [], [], timeout)
        if not ready:
            return
        chunk = os.read(self.pipe.r, 65536)
        if not chunk:
            return
        data = self._buffer + chunk
        *lines, self._buffer = data.split(b"\n")
        for line in lines:
            if line:
                try:
                    self.take(orjson.loads(line))
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    log.warning("metrics: unreadable frame from a worker dropped")

    def take(self, frame: Mapping[str, Any]) -> None:
        slot = int(frame["s"])
        worker = str(frame["id"])
        with self._lock:
            held = self.current.get(slot)
            if held is None or held[0] != worker:  # a replacement: what the old one counted stays in the totals
                held = self.current[slot] = (worker, {})
            if frame["k"] == "flow":
                name = str(frame["flow"])
                figures = FlowFigures.from_frame(frame)
                total = self._totals.setdefault(name, FlowFigures())
                previous = held[1].get(name)
                if previous is not None:  # frames are cumulative: the new one replaces it
                    total.add(previous, -1)
                total.add(figures)
                held[1][name] = figures
                self._versions[name] = self._versions.get(name, 0) + 1
            else:
                self.worker_info[slot] = dict(frame)

    def add_rescued(self, by_flow: Mapping[str, int]) -> None:
        with self._lock:
            for name, count in by_flow.items():
                self.rescued[name] = self.rescued.get(name, 0) + int(count)

    def run_reader(self) -> None:
        while not self._stop.is_set():
            try:
                self.read_available()
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()

    # -- output ----------------------------------------------------------------------------------

    def render(self) -> str:
        """This engine's families in Prometheus' text format (the supervisor's process figures aside)."""
        from prometheus_client import generate_latest

        return generate_latest(_Collector(self)).decode()  # type: ignore[arg-type] (any object with collect())

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        with self._lock:
            versions = dict(self._versions)
            changed = {name: self._totals[name].copy() for name, version in versions.items()
                       if self._samples.get(name, (None,))[0] != version}
        families: dict[str, Any] = {
            key: CounterMetricFamily(f"skiplock_jobs_{key}", f"jobs {key} by this engine's workers", labels=["flow"])
            for key in ("completed", "dead", "retried", "cancelled")}
        failed = CounterMetricFamily("skiplock_jobs_failed", "failed attempts by flow and error type "
                                     f"(at most {MAX_ERROR_TYPES_PER_FLOW} types per flow, then 'other')",
                                     labels=["flow", "error_type"])
        wait = HistogramMetricFamily("skiplock_job_wait_seconds", "from run_at to claim (each batch at its mean)",
                                     labels=["flow"])
        run = HistogramMetricFamily("skiplock_job_run_seconds", "handler run time (each batch at its mean)",
                                    labels=["flow"])
        per_flow = {**families, "failed": failed, "wait": wait, "run": run}
        for name in sorted(versions):
            f = changed.get(name)
            if f is None:  # no frame since the last scrape: its samples as built then
                for key, samples in self._samples[name][1].items():
                    per_flow[key].samples.extend(samples)
                continue
            starts = {key: len(family.samples) for key, family in per_flow.items()}
            for index, key in enumerate(COUNTERS):
                if key != "failed":
                    families[key].add_metric([name], f.counts[index])
            typed = sum(f.errors.values())
            for error, count in sorted(f.errors.items()):
                failed.add_metric([name, error], count)
            if f.counts[1] > typed:  # failures the worker counted before it knew their type (none today)
                failed.add_metric([name, "unknown"], f.counts[1] - typed)
            wait.add_metric([name], _buckets(WAIT_BUCKETS, f.wait), f.wait_us / 1e6)
            run.add_metric([name], _buckets(RUN_BUCKETS, f.run), f.run_us / 1e6)
            self._samples[name] = (versions[name], {key: family.samples[starts[key]:]
                                                    for key, family in per_flow.items()})
        rescued = CounterMetricFamily("skiplock_jobs_rescued", "jobs this engine rescued from lost workers",
                                      labels=["flow"])
        with self._lock:
            for name, count in sorted(self.rescued.items()):
                rescued.add_metric([name], count)
            infos = list(self.worker_info.values())
            gauges = self.gauges
            leader = self.leader
        yield from families.values()
        yield failed
        yield rescued
        yield wait
        yield run
        pool = GaugeMetricFamily("skiplock_pool_connections", "database connections of this engine's worker pools",
                                 labels=["state"])
        for state in ("size", "available", "waiting", "max"):
            pool.add_metric([state], sum(int((i.get("pool") or {}).get(state, 0)) for i in infos))
        yield pool
        circuit = GaugeMetricFamily("skiplock_circuit_open", "1 while a flow's circuit is open (as this engine's "
                                    "workers see it)", labels=["flow"])
        opened: dict[str, bool] = {}
        for info in infos:
            for name, is_open in (info.get("circuits") or {}).items():
                opened[name] = opened.get(name, False) or bool(is_open)
        for name, is_open in sorted(opened.items()):
            circuit.add_metric([name], 1.0 if is_open else 0.0)
        yield circuit
        own = GaugeMetricFamily("skiplock_engine_workers", "worker processes this engine runs")
        own.add_metric([], self.live_workers())
        yield own
        info = GaugeMetricFamily("skiplock_engine_info", "this engine", labels=["version", "engine"])
        info.add_metric([__version__, self.engine_id], 1.0)
        yield info
        lead = GaugeMetricFamily("skiplock_metrics_leader", "1 on the engine that exports the fleet-wide gauges")
        lead.add_metric([], 1.0 if leader and gauges is not None else 0.0)
        yield lead
        if not leader or gauges is None:
            return
        depth = GaugeMetricFamily("skiplock_queue_jobs", "jobs per flow and state, fleet-wide (leader only; "
                                  "exact to 10,000, then ready and dead are the planner's estimate, the others stop)", labels=["flow", "state"])
        for name, states in sorted(gauges.flows.items()):
            for state in GAUGE_STATES:
                depth.add_metric([name, state], states.get(state, 0))
        yield depth
        oldest = GaugeMetricFamily("skiplock_queue_oldest_pending_seconds", "age of the oldest due job per flow "
                                   "(leader only)", labels=["flow"])
        for name, age in sorted(gauges.oldest.items()):
            oldest.add_metric([name], age)
        yield oldest
        workers = GaugeMetricFamily("skiplock_workers", "workers fleet-wide: live, stale (no heartbeat for "
                                    "stale_after), lost in the last 10 min (leader only)", labels=["state"])
        for state in ("live", "stale", "lost"):
            workers.add_metric([state], gauges.workers.get(state, 0))
        yield workers
        age = GaugeMetricFamily("skiplock_gauges_age_seconds", "how old the leader's reading is")
        age.add_metric([], max(time.monotonic() - gauges.at, 0.0))
        yield age


def _buckets(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip((*bounds, float("inf")), counts):
        total += count
        out.append(("+Inf" if bound == float("inf") else repr(bound), total))
    return out


def read_gauges(conn: Any, thresholds: Thresholds, cap: int) -> Gauges:
    """The leader's reading: bounded, index-only flow counts and health's facts."""
    from engine.health import FAILURE_WINDOW, UNSERVED_CAP

    rows = store.metrics_flow_gauges(conn, cap)
    workers = store.health_workers(conn, thresholds.stale_after)
    health = store.health_flows(conn, thresholds.stale_after, FAILURE_WINDOW, UNSERVED_CAP)
    flows = {}
    for r in rows:
        ready, dead = r.ready, r.dead
        # Past the cap an exact count would read every row: the planner's estimate (the console's way).
        if r.pending_total >= cap:
            ready = max(ready, _estimate(conn, r.name, "pending") - r.scheduled)
        if dead >= cap:
            dead = max(dead, _estimate(conn, r.name, "dead"))
        flows[r.name] = {"ready": ready, "scheduled": r.scheduled, "retrying": r.retrying, "running": r.running,
                         "dead": dead}
    return Gauges(time.monotonic(), flows, {h.flow: h.oldest_age for h in health},
                  {"live": workers.live, "stale": workers.stale, "lost": workers.lost})


GAUGE_CAP: Final = 10_000  # exact counts per flow and state up to this; ready and dead are estimated past it


def _estimate(conn: Any, flow: str, status: str) -> int:
    plan = store.console_estimate(conn, flow, status)
    if isinstance(plan, (str, bytes)):
        plan = orjson.loads(plan)
    try:
        return int(plan[0]["Plan"]["Plan Rows"])
    except (TypeError, KeyError, IndexError, ValueError):
        return 0


class GaugeReader:
    """Every `interval`: renew or take the metrics lease, and if this engine holds it, read the gauges.

    One connection, kept across intervals (opened at the first read, again after an error, closed on
    stop): a connection per interval cost each engine a backend start-up, most of the fleet's metrics
    cost (bench/test_metrics.py). A non-leader's try reads the lease and writes nothing while another
    engine holds it, so every engine can try each interval: the takeover bound stays one interval past
    the lease (LEASE_INTERVALS)."""

    def __init__(self, hub: MetricsHub, connect: Callable[[], Any], thresholds: Thresholds, interval: float,
                 cap: int = GAUGE_CAP) -> None:
        self.hub = hub
        self.connect = connect
        self.thresholds = thresholds
        self.interval = interval
        self.cap = cap
        self._stop = threading.Event()
        self._conn: Any = None
        self._thread: threading.Thread | None = None

    def once(self) -> None:
        if self._conn is None:
            self._conn = self.connect()
        try:
            leader = store.metrics_leader_claim(self._conn, self.hub.engine_id, self.interval * LEASE_INTERVALS)
            gauges = read_gauges(self._conn, self.thresholds, self.cap) if leader else None
        except Exception:
            self._close()  # the next interval starts on a new connection
            raise
        with self.hub._lock:
            self.hub.leader = leader
            self.hub.gauges = gauges

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.once()
            except Exception as exc:  # keep reading through outages; the gauges go stale, then vanish
                with self.hub._lock:
                    if self.hub.gauges is not None and time.monotonic() - self.hub.gauges.at > LEASE_INTERVALS * self.interval:
                        self.hub.gauges = None
                log.warning("metrics gauges not read: %s", describe_error(exc))
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="metrics-gauges", daemon=True)
        self._thread.start()

    def stop(self, release: bool = True) -> None:
        """Release the lease (another engine takes over at its next try) and close the connection. A
        read still running after STOP_WAIT_S keeps its connection (the process is ending anyway)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_WAIT_S)
            if self._thread.is_alive():
                return
        try:
            if release and self.hub.leader:
                if self._conn is None:
                    self._conn = self.connect()
                store.metrics_leader_release(self._conn, self.hub.engine_id)
        except Exception:
            pass
        finally:
            self._close()


LEASE_INTERVALS: Final = 3  # the lease outlives two missed renewals (a slow read under load)
STOP_WAIT_S: Final = 2.0


# ---------------------------------------------------------------------------------------------
# HTTP


class Readiness:
    """/readyz: engine/health.py's verdict, cached for READY_CACHE_S."""

    def __init__(self, connect: Callable[[], Any], thresholds: Thresholds) -> None:
        self.connect = connect
        self.thresholds = thresholds
        self._lock = threading.Lock()
        self._cached: tuple[float, Verdict] | None = None

    def verdict(self) -> Verdict:
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < READY_CACHE_S:
                return self._cached[1]
            try:
                with self.connect() as conn:
                    facts = read_facts(conn, self.thresholds)
            except Exception as exc:
                facts = health_unreachable(describe_error(exc))
            verdict = evaluate(facts, self.thresholds)
            self._cached = (time.monotonic(), verdict)
            return verdict


def liveness_problems(hub: MetricsHub, now: float) -> list[str]:
    problems = []
    if now - hub.loop_at > LOOP_STALL_S:
        problems.append(f"supervisor loop stalled for {now - hub.loop_at:.0f}s")
    if hub.live_workers() == 0:
        problems.append("no worker process running")
    return problems


def _body(status: str, lines: Iterable[str]) -> bytes:
    return ("\n".join([status, *lines]) + "\n").encode()


class MetricsServer:
    """A threading HTTP server in the supervisor: /metrics, /healthz, /readyz."""

    def __init__(self, host: str, port: int, hub: MetricsHub, readiness: Readiness) -> None:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.process_collector import ProcessCollector

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(hub))
        ProcessCollector(registry=registry)  # the supervisor's own CPU and memory
        self.hub = hub
        self.readiness = readiness
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry), "text/plain; version=0.0.4; charset=utf-8")
                elif path == "/healthz":
                    problems = liveness_problems(server.hub, time.monotonic())
                    self._send(503 if problems else 200, _body("unhealthy" if problems else "ok", problems))
                elif path == "/readyz":
                    verdict = server.readiness.verdict()
                    code = 503 if verdict.status == "unhealthy" else 200
                    self._send(code, _body(verdict.status, verdict.texts))
                else:
                    self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

            def _send(self, code: int, body: bytes, kind: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # no line per scrape
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])

    def start(self) -> None:
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.5}, name="metrics-http",
                         daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Collector:
    def __init__(self, hub: MetricsHub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Any]:
        return self.hub.collect()


@dataclass
class EngineMetrics:
    """What the supervisor starts with --metrics-port: the pipe (before the fork), then the threads."""

    engine_id: str
    dsn: str
    application_name: str
    host: str
    port: int
    thresholds: Thresholds
    interval: float
    pipe: MetricsPipe = field(default_factory=MetricsPipe)
    hub: MetricsHub = field(init=False)
    server: MetricsServer | None = None
    gauges: GaugeReader | None = None

    def __post_init__(self) -> None:
        self.hub = MetricsHub(self.engine_id, self.pipe)

    def _connect(self) -> Any:
        return db.connect(self.dsn, application_name=f"{self.application_name}-metrics")

    def start(self, live_workers: Callable[[], int]) -> int:
        """Bind the port (an error here is a configuration error: exit 2), start the threads; the port."""
        self.hub.live_workers = live_workers
        self.server = MetricsServer(self.host, self.port, self.hub, Readiness(self._connect, self.thresholds))
        self.gauges = GaugeReader(self.hub, self._connect, self.thresholds, self.interval)
        threading.Thread(target=self.hub.run_reader, name="metrics-pipe", daemon=True).start()
        self.gauges.start()
        self.server.start()
        return self.server.port

    def stop(self) -> None:
        self.hub.stop()
        if self.gauges is not None:
            self.gauges.stop()
        if self.server is not None:
            self.server.stop()
