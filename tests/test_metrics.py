"""Prometheus metrics and the HTTP health endpoints of `engine run --metrics-port`, against real engines.

The endpoint is parsed with prometheus_client's own parser; its counters are checked against
`engine status` once the engine has worked through a load with transient failures and dead letters.
/healthz and /readyz are checked with the database up, cut off (tests/support/proxy.py) and with an
outdated schema.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.migrate import REQUIRED_SCHEMA_VERSION
from tests.support.cli import engine, ok
from tests.support.engines import BASE, log_has, tail, wait_for
from tests.support.postgres import register_flows
from tests.support.proxy import TcpProxy, unix_socket_of

pytestmark = pytest.mark.slow

CONFIG = BASE + """
metrics_interval = "0.5s"

[flows.metered]
handler = "support.metrics_handlers:mixed"
batch_size = 10
max_attempts = 2
backoff = { base = "0s", jitter = 0 }
"""


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def port_of(process: Any) -> int:
    lines = wait_for(lambda: log_has(process, "metrics listening"), 30, message="the metrics port in the log")
    return int(lines[0]["port"])


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """sample name -> sorted labels -> value, as Prometheus would read them."""
    status, text = get(port, "/metrics")
    assert status == 200, text
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def enqueue(dsn: str, kind: str, count: int) -> None:
    ok(engine("enqueue", "metered", "--payload", json.dumps({"kind": kind}), "--count", str(count), dsn=dsn))


def test_counters_match_status_after_failures(dsn: str, start_engine: Any) -> None:
    register_flows(dsn, "metered")
    enqueue(dsn, "ok", 40)
    enqueue(dsn, "transient", 6)  # two attempts each: 12 failures, 6 retries, 6 dead letters
    enqueue(dsn, "permanent", 2)  # dead at the first attempt
    process = start_engine(dsn, CONFIG, "--workers", "2", "--metrics-port", "0")
    port = port_of(process)

    def finished() -> bool:
        status = json.loads(ok(engine("status", "--json", dsn=dsn)))["by_flow"].get("metered", {})
        return status.get("completed") == 40 and status.get("failed") == 8

    wait_for(finished, 60, 0.2, message=f"the load to finish: {tail(process)}")
    status = json.loads(ok(engine("status", "--json", dsn=dsn)))["by_flow"]["metered"]
    flow = (("flow", "metered"),)

    def settled() -> dict[str, Any] | None:
        m = scrape(port)
        done = m.get("skiplock_jobs_completed_total", {}).get(flow)
        dead = m.get("skiplock_jobs_dead_total", {}).get(flow)
        leader = m.get("skiplock_queue_jobs", {}).get((("flow", "metered"), ("state", "dead")))
        return m if (done, dead, leader) == (status["completed"], status["failed"], status["failed"]) else None

    m = wait_for(settled, 20, 0.3, message="the scrape to agree with engine status")
    failed = m["skiplock_jobs_failed_total"]
    assert failed == {(("error_type", "ValueError"), ("flow", "metered")): 12.0,
                      (("error_type", "PermanentError"), ("flow", "metered")): 2.0}, failed
    assert m["skiplock_jobs_retried_total"][flow] == 6
    assert m["skiplock_jobs_cancelled_total"][flow] == 0
    attempts = 40 + 12 + 2
    assert m["skiplock_job_run_seconds_count"][flow] == attempts
    assert m["skiplock_job_wait_seconds_count"][flow] == attempts
    inf = m["skiplock_job_wait_seconds_bucket"][(("flow", "metered"), ("le", "+Inf"))]
    assert inf == attempts
    assert m["skiplock_queue_jobs"][(("flow", "metered"), ("state", "ready"))] == 0
    assert m["skiplock_metrics_leader"][()] == 1
    assert m["skiplock_workers"][(("state", "live"),)] == 2
    assert m["skiplock_engine_workers"][()] == 2
    assert m["skiplock_pool_connections"][(("state", "max"),)] == 8  # 2 workers x pool_max 4
    assert m["skiplock_circuit_open"][flow] == 0
    assert (flow + (("state", "x"),)) not in m.get("skiplock_queue_jobs", {})
    # a second engine on the same database: not the leader, so no fleet-wide gauges, its own figures only
    second = start_engine(dsn, CONFIG, "--workers", "1", "--metrics-port", "0")
    other = scrape(port_of(second))
    assert other["skiplock_metrics_leader"][()] == 0
    assert "skiplock_queue_jobs" not in other and "skiplock_workers" not in other
    assert other.get("skiplock_jobs_completed_total", {}).get(flow, 0) == 0
    assert get(port, "/nowhere")[0] == 404


def test_healthz_and_readyz(dsn: str, start_engine: Any) -> None:
    register_flows(dsn, "metered")
    with TcpProxy(unix_socket_of(dsn)) as proxy:
        process = start_engine(proxy.dsn(dsn), CONFIG, "--workers", "1", "--metrics-port", "0")
        port = port_of(process)
        # the port opens before the first fork: alive once the worker runs
        assert wait_for(lambda: (r := get(port, "/healthz")) == (200, "ok\n") and r, 10, 0.1,
                        message="/healthz 200") == (200, "ok\n")
        code, body = wait_for(lambda: (r := get(port, "/readyz"))[0] == 200 and r, 10, 0.2,
                              message="/readyz 200")
        assert body.splitlines()[0] in ("healthy", "degraded"), body
        # database down: not ready; still alive (workers freeze and resume, a restart would not help)
        proxy.cut()
        code, body = wait_for(lambda: (r := get(port, "/readyz"))[0] == 503 and r, 15, 0.3,
                              message="/readyz 503 with the database cut off")
        lines = body.splitlines()
        assert lines[0] == "unhealthy" and lines[1].startswith("database unreachable: "), body
        assert get(port, "/healthz")[0] == 200
        proxy.restore()
        wait_for(lambda: get(port, "/readyz")[0] == 200, 15, 0.3, message="/readyz 200 again")
        # an outdated schema (as after a deploy of a newer skiplock, before `engine migrate`)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("ALTER TABLE skiplock.schema_migrations RENAME TO schema_migrations_hidden")
            conn.execute("CREATE TABLE skiplock.schema_migrations AS SELECT * FROM skiplock.schema_migrations_hidden "
                         "WHERE version < %s", (REQUIRED_SCHEMA_VERSION,))
        try:
            code, body = wait_for(lambda: (r := get(port, "/readyz"))[0] == 503 and r, 15, 0.3,
                                  message="/readyz 503 with an outdated schema")
            assert body == "unhealthy\nschema outdated: run `engine migrate`\n", body
        finally:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("DROP TABLE skiplock.schema_migrations")
                conn.execute("ALTER TABLE skiplock.schema_migrations_hidden RENAME TO schema_migrations")
        wait_for(lambda: get(port, "/readyz")[0] == 200, 15, 0.3, message="/readyz 200 after the migration")
        # the supervisor gone: nothing answers (an orchestrator's probe fails)
        process.stop()
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_metrics_port_in_use_is_one_line(dsn: str, start_engine: Any) -> None:
    import socket

    register_flows(dsn, "metered")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        process = start_engine(dsn, CONFIG, "--workers", "1", "--metrics-port", str(busy))
        assert process.wait(30) == 2
        assert log_has(process, "metrics port cannot be opened", port=busy), tail(process)
    result = engine("run", "--metrics-port", "70000", dsn=dsn)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["engine: error: --metrics-port must be from 0 to 65535, got 70000"], \
        result.stderr


# ---------------------------------------------------------------------------------------------
# failure log lines

STORM = BASE + """
[flows.storm]
handler = "support.metrics_handlers:mixed"
batch_size = 100
max_attempts = 2
backoff = { base = "0s", jitter = 0 }
"""


def test_failure_lines_counted_redacted_and_rate_limited(dsn: str, start_engine: Any) -> None:
    """30 jobs fail twice (60 attempts, 30 dead letters) on one worker: the burst is logged, one line
    each, the rest is counted in later lines, and every attempt is accounted for."""
    register_flows(dsn, "storm")
    ok(engine("enqueue", "storm", "--payload", json.dumps({"kind": "transient"}), "--count", "30", dsn=dsn))
    process = start_engine(dsn, STORM, "--workers", "1")
    wait_for(lambda: json.loads(ok(engine("status", "--json", dsn=dsn)))["by_flow"]["storm"]["failed"] == 30,
             60, 0.2, message=f"30 dead letters: {tail(process)}")

    def lines() -> tuple[list[dict], list[dict], list[dict]]:
        all_lines = process.log_lines()
        failed = [x for x in all_lines if x.get("flow") == "storm" and " failed (attempt " in x.get("msg", "")]
        dead = [x for x in all_lines if x.get("flow") == "storm" and " dead letter (attempt " in x.get("msg", "")]
        summary = [x for x in all_lines if x.get("flow") == "storm" and "not logged (rate limit)" in x.get("msg", "")]
        return failed, dead, summary

    def accounted() -> bool:
        failed, dead, summary = lines()
        suppressed = sum(x.get("suppressed", 0) for x in failed + dead + summary)
        return len(failed) + len(dead) + suppressed == 60

    wait_for(accounted, 15, 0.3, message="every failed attempt logged or counted as suppressed")
    failed, dead, summary = lines()
    assert 10 <= len(failed) + len(dead) < 60, (len(failed), len(dead))  # the burst, then the rate
    assert summary, "the suppressed count has a line of its own once the storm is over"
    assert all(x["level"] == "warning" and x["attempt"] == 1 and x["max_attempts"] == 2 for x in failed)
    assert all(x["level"] == "error" and x["attempt"] == 2 for x in dead)
    first = (failed or dead)[0]
    assert first["error_type"] == "ValueError" and isinstance(first["job"], int) and "run" in first
    assert "attempt 1 of 2" in first["msg"] or "attempt 2 of 2" in first["msg"]
    assert first["msg"].endswith("ValueError: upstream refused postgresql://app:***@db/x job None"), first["msg"]
    text = process.log_path.read_text()
    assert "hunter2" not in text and "second line" not in text



def test_run_help_names_the_metrics_port() -> None:
    out = ok(engine("run", "--help"))
    assert "--metrics-port PORT" in out and "/readyz" in out
    result = engine("run", "--metrics-port", "nine")
    assert result.returncode == 2 and "--metrics-port: invalid int value: 'nine'" in result.stderr


def test_leader_gauges_past_the_cap_are_estimates(dsn: str) -> None:
    """Counts stop at the cap (bounded reads); ready and dead past it come from the planner."""
    from engine import db
    from engine.health import Thresholds
    from engine.metrics import read_gauges

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO skiplock.flows (name) VALUES ('big')")
        conn.execute("INSERT INTO skiplock.jobs (flow, payload, run_at) SELECT 'big', '{}', now() - interval '1 minute' "
                     "FROM generate_series(1, 300)")
        conn.execute("INSERT INTO skiplock.jobs (flow, payload, status, finished_at) "
                     "SELECT 'big', '{}', 'dead', now() FROM generate_series(1, 40)")
        conn.execute("ANALYZE skiplock.jobs")
    with db.connect(dsn) as conn:
        gauges = read_gauges(conn, Thresholds(), cap=20)
    big = gauges.flows["big"]
    assert big["running"] == 0 and big["scheduled"] == 0
    assert 200 <= big["ready"] <= 400 and 20 <= big["dead"] <= 80, big  # estimates, not the cap
    assert 55 <= gauges.oldest["big"] <= 120
    assert gauges.workers == {"live": 0, "stale": 0, "lost": 0}


# ---------------------------------------------------------------------------------------------
# the leader lease and the gauge reader


@pytest.mark.xdist_group("timed")  # times a takeover against the metrics interval
def test_leader_killed_or_stopped_another_engine_takes_over(dsn: str, start_engine: Any) -> None:
    """Killed (-9): its lease runs out (3 intervals after its last renewal) and another engine takes it
    at its next try, so the fleet gauges return within 4 intervals. Stopped: it releases the lease and
    the next try (1 interval) takes it."""
    interval = 0.5
    register_flows(dsn, "metered")

    def leads(port: int) -> bool:
        try:
            m = scrape(port)
        except OSError:
            return False
        return m["skiplock_metrics_leader"][()] == 1 and (("flow", "metered"), ("state", "ready")) in \
            m.get("skiplock_queue_jobs", {})

    first = start_engine(dsn, CONFIG, "--workers", "1", "--metrics-port", "0")
    first_port = port_of(first)
    wait_for(lambda: leads(first_port), 30, 0.1, message="the first engine to lead")
    second = start_engine(dsn, CONFIG, "--workers", "1", "--metrics-port", "0")
    second_port = port_of(second)
    wait_for(lambda: scrape(second_port).get("skiplock_engine_workers", {}).get(()) == 1, 30, 0.1,
             message="the second engine's worker")
    assert scrape(second_port)["skiplock_metrics_leader"][()] == 0  # the lease is held: no second reader
    first.process.kill()
    killed = time.monotonic()
    first.process.wait(10)
    wait_for(lambda: leads(second_port), 30, 0.05, message="the second engine to take the lease")
    taken = time.monotonic() - killed
    assert taken <= 4 * interval + 1.5, taken  # the bound plus the scrape's and the load's slack

    third = start_engine(dsn, CONFIG, "--workers", "1", "--metrics-port", "0")
    third_port = port_of(third)
    wait_for(lambda: scrape(third_port).get("skiplock_engine_workers", {}).get(()) == 1, 30, 0.1,
             message="the third engine's worker")
    second.signal(signal.SIGTERM)
    stopped = time.monotonic()
    assert second.wait(30) == 0, tail(second)
    wait_for(lambda: leads(third_port), 30, 0.05, message="the third engine to take the released lease")
    released = time.monotonic() - stopped
    assert released < 3 * interval + 1.5, released  # sooner than the lease: it was released


def test_gauge_reader_keeps_one_connection_and_reopens_after_a_cut(dsn: str) -> None:
    from engine import db
    from engine.health import Thresholds
    from engine.metrics import GaugeReader, MetricsHub, MetricsPipe

    register_flows(dsn, "metered")
    with TcpProxy(unix_socket_of(dsn)) as proxy:
        opened: list[int] = []

        def connect() -> Any:
            conn = db.connect(proxy.dsn(dsn))
            opened.append(conn.info.backend_pid)
            return conn

        hub = MetricsHub("engine-a", MetricsPipe())
        reader = GaugeReader(hub, connect, Thresholds(), 0.5)
        for _ in range(3):
            reader.once()
        assert hub.leader and hub.gauges is not None and "metered" in hub.gauges.flows
        assert len(opened) == 1  # one connection for every interval
        proxy.cut()
        with pytest.raises(psycopg.Error):
            reader.once()
        proxy.restore()
        reader.once()
        assert hub.leader and len(opened) == 2  # a new connection after the failed one
        reader.stop()
        with psycopg.connect(dsn, autocommit=True) as conn:  # stop closed it (a backend exits a moment after)
            wait_for(lambda: conn.execute("SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = ANY(%s)",
                                          (opened,)).fetchone()[0], 10, message="the readers' backends to exit")
        with psycopg.connect(dsn, autocommit=True) as conn:  # and released the lease
            assert conn.execute("SELECT count(*) FROM skiplock.metrics_leader").fetchone() == (0,)


def test_lease_tries_of_other_engines_write_nothing(dsn: str) -> None:
    """Every engine tries for the lease every interval: while another engine holds it, a try neither
    locks the row (ON CONFLICT alone would: xmax) nor writes it (the NOT EXISTS guard), so twenty
    engines cost reads."""
    from engine import db, store

    with db.connect(dsn) as conn:
        assert store.metrics_leader_claim(conn, "engine-a", 10.0)
        held = conn.execute("SELECT xmin::text, xmax::text, until FROM skiplock.metrics_leader").fetchone()
        for other in ("engine-b", "engine-c"):
            assert not store.metrics_leader_claim(conn, other, 10.0)
        assert conn.execute("SELECT xmin::text, xmax::text, until FROM skiplock.metrics_leader").fetchone() == held
        assert store.metrics_leader_claim(conn, "engine-a", 10.0)  # the holder renews
        assert conn.execute("SELECT xmin::text FROM skiplock.metrics_leader").fetchone()[0] != held[0]
        conn.execute("UPDATE skiplock.metrics_leader SET until = now() - interval '1 second'")
        assert store.metrics_leader_claim(conn, "engine-b", 10.0)  # a run-out lease is taken
        assert conn.execute("SELECT engine_id FROM skiplock.metrics_leader").fetchone() == ("engine-b",)


# ---------------------------------------------------------------------------------------------
# the exposition against the README's table (the contract)


def _readme_metrics() -> dict[str, tuple[str, dict[str, set[str] | None]]]:
    """metric -> (type, label -> its documented values or None), from README.md's table."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("| metric | type | labels | what |")
    out: dict[str, tuple[str, dict[str, set[str] | None]]] = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        name, kind, labels = (cell.strip() for cell in line.strip("|").split("|")[:3])
        name = name.strip("`")
        if name.endswith("*"):
            continue  # process_*: prometheus-client's own
        found: dict[str, set[str] | None] = {}
        current = None
        for token in (t.strip() for t in labels.split(",") if t.strip()):
            if ":" in token:
                current, value = (part.strip() for part in token.split(":", 1))
                found[current] = {value}
            elif current is not None:
                found[current].add(token)  # type: ignore[union-attr]
            else:
                found[token] = None
        out[name] = (kind, found)
    return out


def test_exposition_matches_the_readme_table() -> None:
    """Every family the README lists, with its type and labels (and their documented values), and no
    other: what the leader renders with every kind of figure present."""
    import time as clock

    from engine.metrics import FlowFigures, Gauges, MetricsHub, MetricsPipe

    hub = MetricsHub("engine-a", MetricsPipe())
    figures = FlowFigures(counts=[5, 3, 1, 2, 1], errors={'Value"Error\\': 2}, wait=[1] * 11, run=[1] * 11,
                          wait_us=500_000, run_us=250_000)
    hub.take({"k": "flow", "id": "w0", "s": 0, "flow": "a", **figures.frame()})
    hub.take({"k": "worker", "id": "w0", "s": 0, "pool": {"size": 2, "available": 1, "waiting": 0, "max": 4},
              "circuits": {"a": True}})
    hub.add_rescued({"a": 3})
    hub.live_workers = lambda: 1
    hub.leader = True
    hub.gauges = Gauges(clock.monotonic(), {"a": {"ready": 4, "dead": 1}}, {"a": 2.5},
                        {"live": 1, "stale": 0, "lost": 0})
    families = {f.name: f for f in text_string_to_metric_families(hub.render())}
    documented = _readme_metrics()
    rendered = {(f"{name}_total" if f.type == "counter" else name): f for name, f in families.items()}
    assert sorted(rendered) == sorted(documented)
    for name, (kind, labels) in documented.items():
        family = rendered[name]
        assert family.type == kind, name
        assert family.samples, name
        for sample in family.samples:
            names = set(sample.labels) - ({"le"} if kind == "histogram" else set())
            assert names == set(labels), (name, sample)
        for label, values in labels.items():
            if values is not None:
                assert {s.labels[label] for s in family.samples} == values, (name, label)
    failed = rendered["skiplock_jobs_failed_total"].samples
    assert [(s.labels["error_type"], s.value) for s in failed] == [('Value"Error\\', 2.0), ("unknown", 1.0)]
    buckets = [s for s in rendered["skiplock_job_wait_seconds"].samples if s.name.endswith("_bucket")]
    assert [s.value for s in buckets] == [float(i) for i in range(1, 12)] and buckets[-1].labels["le"] == "+Inf"


def test_hub_totals_keep_replaced_workers_and_never_step_back() -> None:
    """The hub keeps each flow's total as frames arrive: a worker's next frame replaces its last (it
    is cumulative), a replaced worker's figures stay, and an exported _sum never goes down, which
    Prometheus would read as a counter reset."""
    from engine.metrics import FlowFigures, MetricsHub, MetricsPipe, WorkerMetrics

    hub = MetricsHub("engine-a", MetricsPipe())
    workers = {slot: WorkerMetrics() for slot in (0, 1)}
    last_sum = 0.0
    for tick in range(300):
        for slot, metrics in workers.items():
            metrics.batch("a", completed=3, failed=1, dead=0, retried=1, wait_ms=0.1 + tick * 1e-3,
                          run_ms=1 / 3, observe=True)
            metrics.failures("a", ["ValueError"])
            for frame in metrics.frames(f"w{slot}.{tick // 100}", slot, {}, {}):
                hub.take(orjson.loads(frame))
        if tick % 100 == 99:  # both workers replaced: the new ones count from zero
            workers = {slot: WorkerMetrics() for slot in workers}
        exported = {(sample.name, sample.labels.get("error_type")): sample.value
                    for family in text_string_to_metric_families(hub.render()) for sample in family.samples
                    if sample.labels.get("flow") == "a" and "le" not in sample.labels}
        n = tick + 1
        assert [exported[(f"skiplock_jobs_{key}_total", None)] for key in ("completed", "dead", "retried")] == [
            6 * n, 0, 2 * n]
        assert exported[("skiplock_jobs_failed_total", "ValueError")] == 2 * n
        assert exported[("skiplock_job_wait_seconds_count", None)] == exported[
            ("skiplock_job_run_seconds_count", None)] == 8 * n
        wait_sum = exported[("skiplock_job_wait_seconds_sum", None)]
        assert wait_sum >= last_sum
        last_sum = wait_sum
    assert exported[("skiplock_job_run_seconds_sum", None)] == 2 * 300 * round(1000 / 3) / 1e6
    assert FlowFigures.from_frame(FlowFigures(wait_us=7).frame()).wait_us == 7


def test_scrape_rebuilds_changed_flows_and_reuses_the_rest() -> None:
    """A hub scraped between frames (reusing the samples of flows with no new frame) renders exactly
    what a hub given the same frames and scraped once renders."""
    from engine.metrics import MetricsHub, MetricsPipe, WorkerMetrics

    scraped, fresh = MetricsHub("engine-a", MetricsPipe()), MetricsHub("engine-a", MetricsPipe())
    metrics = WorkerMetrics()
    for tick in range(12):
        flow = f"flow_{tick % 3}" if tick < 9 else "flow_new"
        metrics.batch(flow, completed=tick, failed=1, dead=tick % 2, retried=1, wait_ms=5.0 * tick, run_ms=2.0)
        metrics.failures(flow, [f"Error{tick % 4}"])
        for frame in metrics.frames("w0", 0, {}, {}):
            for hub in (scraped, fresh):
                hub.take(orjson.loads(frame))
        text = scraped.render()
        assert f'skiplock_jobs_completed_total{{flow="{flow}"}}' in text
    assert scraped.render() == fresh.render()
    assert text == fresh.render()
