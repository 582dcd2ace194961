"""The execution model through real `engine run` processes: asyncio and thread executors keep many
jobs in flight per worker (proved from execution records: overlapping spans in one process), batch
handlers, per-job timeouts, one hung job among many, kill -9 and SIGTERM with jobs in flight, threaded
ODBC sources, three kinds of flows side by side, fast start and stop. Plus load-time checks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import psycopg
import pytest

from support.engines import SUPPORT_DIR, wait_for
from support.postgres import register_flows, scalar
from engine.config import FlowConfig
from engine.errors import ConfigError
from engine.handlers import load_flow
from engine.queue import Queue
from support.exec_handlers import max_overlap, read_timed
from support.engines import BASE, GRACE, log_has, rows, tail


def enqueue(dsn: str, flow: str, payloads: list[dict], **options) -> None:
    register_flows(dsn, flow)  # as an engine that ran before would have
    with Queue(dsn) as q:
        assert q.enqueue_many(flow, payloads, **options).inserted == len(payloads)


def flow(name: str, handler: str, **keys) -> str:
    lines = [f"[flows.{name}]", f'handler = "support.exec_handlers:{handler}"']
    for key, value in keys.items():
        lines.append(f"{key} = {value!r}".replace("'", '"') if isinstance(value, str) else
                     f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
    return "\n".join(lines) + "\n"


def overlap_by_pid(path: Path) -> dict[int, int]:
    spans: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for _, pid, _, start, end in read_timed(str(path)):
        spans[pid].append((start, end))
    return {pid: max_overlap(s) for pid, s in spans.items()}


def all_done_once(dsn: str, total: int) -> None:
    assert rows(dsn, "SELECT status::text, count(*) FROM skiplock.jobs GROUP BY 1") == []
    assert rows(dsn, "SELECT count(*), count(DISTINCT id), max(attempts) FROM skiplock.jobs_done") == [(total, total, 1)]


# ---------------------------------------------------------------------------------------------
# load-time checks


@pytest.mark.parametrize("keys, handler, mode, per_worker", [
    ({}, "sleepy", "inline", 1),
    ({"concurrency_per_worker": 8}, "sleepy", "threads", 8),
    ({}, "async_sleepy", "asyncio", 100),
    ({"concurrency_per_worker": 5}, "async_sleepy", "asyncio", 5),
    ({}, "async_callable", "asyncio", 100),
    ({"batch": True}, "batch_mixed", "batch", 1),
    ({"batch": True, "transactional": True}, "batch_mixed", "batch", 1),
    ({"concurrency_per_worker": 4, "transactional": True}, "pg_sleep_tx", "threads", 4),
])
def test_execution_mode_is_chosen_when_the_flow_loads(keys, handler, mode, per_worker):
    runtime = load_flow(FlowConfig("f", f"support.exec_handlers:{handler}", **keys))
    assert (runtime.mode, runtime.per_worker) == (mode, per_worker)


@pytest.mark.parametrize("keys, handler, message", [
    ({"batch": True}, "async_sleepy", "flow f: batch = true needs a plain def handler"),
    ({"batch": True, "concurrency_per_worker": 2}, "batch_mixed", "concurrency_per_worker must be 1 (it is 2)"),
    ({"transactional": True}, "async_sleepy", "transactional = true is not supported for async def handlers"),
])
def test_refused_combinations_are_one_line_config_errors(keys, handler, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        load_flow(FlowConfig("f", f"support.exec_handlers:{handler}", **keys))
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------
# concurrency


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["asyncio", "threads"])
def test_concurrent_flow_drains_with_many_jobs_in_flight(dsn, start_engine, tmp_path, mode):
    timed = tmp_path / "timed.txt"
    total, sleep = 400, 0.2
    if mode == "asyncio":
        config = BASE + flow("io", "async_sleepy", concurrency_per_worker=50, batch_size=25)
    else:
        config = BASE + flow("io", "sleepy", concurrency_per_worker=16, batch_size=16)
    enqueue(dsn, "io", [{"n": i, "sleep": sleep} for i in range(total)])
    started = time.monotonic()
    engine = start_engine(dsn, config, "--workers", "2", "--flows", "io", "--drain",
                          env={"SKIPLOCK_TEST_TIMED": str(timed)})
    assert engine.wait(60) == 0, tail(engine)
    elapsed = time.monotonic() - started
    all_done_once(dsn, total)
    overlap = overlap_by_pid(timed)
    assert len(overlap) == 2 and min(overlap.values()) > 8, f"jobs in flight at once per worker: {overlap}"
    # One at a time this would take total * sleep / 2 = 40 s.
    assert elapsed < 20, elapsed
    if mode == "asyncio":  # the coroutine was awaited: its result is stored, not a coroutine object
        assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done WHERE result->>'awaited' = 'true'") == total


def test_async_def_handler_is_awaited(dsn, start_engine):
    """Regression: an async def handler's job used to complete with the coroutine object's str() as
    its result, never awaited. Also for an object whose __call__ is async."""
    config = BASE + flow("coro", "async_callable")
    enqueue(dsn, "coro", [{"n": i} for i in range(5)])
    engine = start_engine(dsn, config, "--workers", "1", "--flows", "coro", "--drain")
    assert engine.wait(30) == 0, tail(engine)
    assert sorted(rows(dsn, "SELECT (result->>'n')::int, result->>'awaited' FROM skiplock.jobs_done")) == \
        [(i, "true") for i in range(5)]


@pytest.mark.slow
def test_three_kinds_of_flows_side_by_side(dsn, start_engine, tmp_path):
    timed = tmp_path / "timed.txt"
    config = (BASE + flow("quick", "noop_record") + flow("threaded", "sleepy", concurrency_per_worker=8)
              + flow("aio", "async_sleepy", concurrency_per_worker=40))
    enqueue(dsn, "quick", [{"n": i} for i in range(2000)])
    enqueue(dsn, "threaded", [{"n": 10_000 + i, "sleep": 0.1} for i in range(80)])
    enqueue(dsn, "aio", [{"n": 20_000 + i, "sleep": 0.1} for i in range(200)])
    engine = start_engine(dsn, config, "--workers", "2", "--flows", "quick,threaded,aio", "--drain",
                          env={"SKIPLOCK_TEST_TIMED": str(timed)})
    assert engine.wait(60) == 0, tail(engine)
    all_done_once(dsn, 2280)
    assert dict(rows(dsn, "SELECT flow, count(*) FROM skiplock.jobs_done GROUP BY 1")) == \
        {"quick": 2000, "threaded": 80, "aio": 200}


# ---------------------------------------------------------------------------------------------
# a hung job, timeouts


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["inline", "threads", "asyncio"])
def test_one_hung_job_does_not_delay_the_other_nine(dsn, start_engine, tmp_path, mode):
    """Inline: the unstarted rest of the batch is released after HOLD_BOUND and another worker runs it;
    threads and asyncio: the others run beside the hung one."""
    timed = tmp_path / "timed.txt"
    handler = "async_hang" if mode == "asyncio" else "hang"
    keys = {"batch_size": 10, **({"concurrency_per_worker": 4} if mode != "inline" else {})}
    config = BASE + flow("h", handler, **keys)
    engine = start_engine(dsn, config, "--workers", "2", "--flows", "h", env={"SKIPLOCK_TEST_TIMED": str(timed)})
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.workers WHERE state = 'idle'") == 2, 20,
             message="two idle workers")
    enqueue(dsn, "h", [{"n": 0, "sleep": 12}] + [{"n": i, "sleep": 0.01} for i in range(1, 10)])
    started = time.monotonic()
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done") == 9, 6,
             message="the nine healthy jobs to complete beside the hung one")
    took = time.monotonic() - started
    assert took < 4.5, took
    assert rows(dsn, "SELECT (payload->>'n')::int, status::text, attempts FROM skiplock.jobs") == [(0, "running", 1)]
    assert scalar(dsn, "SELECT max(attempts) FROM skiplock.jobs_done") == 1, "released jobs get their attempt back"
    engine.stop()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["threads", "asyncio"])
def test_per_job_timeouts_under_concurrency(dsn, start_engine, tmp_path, mode):
    timed = tmp_path / "timed.txt"
    handler = "async_hang" if mode == "asyncio" else "hang"
    config = BASE + flow("t", handler, concurrency_per_worker=4, timeout="0.5s", max_attempts=1)
    # Two hang (the bound of abandoned threads for four is two); abandoned threads are replaced.
    enqueue(dsn, "t", [{"n": i, "sleep": 30 if i < 2 else 0.05} for i in range(40)])
    started = time.monotonic()
    engine = start_engine(dsn, config, "--workers", "1", "--flows", "t", "--drain",
                          env={"SKIPLOCK_TEST_TIMED": str(timed)})
    assert engine.wait(30) == 0, tail(engine)
    assert time.monotonic() - started < 10
    dead = rows(dsn, "SELECT (payload->>'n')::int, error_type FROM skiplock.jobs WHERE status = 'dead' ORDER BY 1")
    assert dead == [(0, "JobTimeout"), (1, "JobTimeout")], dead
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done") == 38
    assert not log_has(engine, "worker died")


@pytest.mark.slow
def test_too_many_stuck_threads_replace_the_worker(dsn, start_engine, tmp_path):
    config = BASE + flow("t", "hang", concurrency_per_worker=4, timeout="0.3s", max_attempts=1)
    # Enough quick jobs that some are still pending when the third stuck thread replaces the worker:
    # with a few, the drain could end first and the worker's exit 5 came during the engine's stop.
    enqueue(dsn, "t", [{"n": i, "sleep": 30} for i in range(3)] + [{"n": 10 + i, "sleep": 0.05} for i in range(60)])
    engine = start_engine(dsn, config, "--workers", "1", "--flows", "t", "--drain",
                          env={"SKIPLOCK_TEST_TIMED": str(tmp_path / "timed.txt")})
    assert engine.wait(30) == 0, tail(engine)
    assert log_has(engine, "too many handler threads stuck past their timeout")
    died = log_has(engine, "worker died")
    assert died and died[0]["exit_code"] == 5
    assert rows(dsn, "SELECT count(*), min(error_type) FROM skiplock.jobs WHERE status = 'dead'") == [(3, "JobTimeout")]
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done") == 60
    assert scalar(dsn, "SELECT max(attempts) FROM skiplock.jobs_done") == 1


EXEC_RESULTS = "CREATE TABLE exec_results (job_id bigint PRIMARY KEY, n integer NOT NULL, xact bigint NOT NULL)"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["inline", "threads"])
def test_timeout_inside_ctx_pg_in_a_transactional_flow_fails_that_job_alone(dsn, start_engine, mode):
    """The statement is cancelled on the server; the connection stays usable, so the jobs after it in
    the same batch (inline) or on the same thread's next connection commit their writes with their acks."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(EXEC_RESULTS)
    keys = {"transactional": True, "timeout": "0.5s", "max_attempts": 1, "batch_size": 10}
    if mode == "threads":
        keys["concurrency_per_worker"] = 2
    config = BASE + flow("tx", "pg_sleep_tx", **keys)
    enqueue(dsn, "tx", [{"n": i, "sleep": 20 if i == 3 else 0} for i in range(8)])
    started = time.monotonic()
    engine = start_engine(dsn, config, "--workers", "1", "--flows", "tx", "--drain")
    assert engine.wait(30) == 0, tail(engine)
    assert time.monotonic() - started < 10
    assert rows(dsn, "SELECT (payload->>'n')::int, error_type FROM skiplock.jobs") == [(3, "JobTimeout")]
    done = rows(dsn, "SELECT d.id, r.xact %% 4294967296, d.xmin::text::bigint FROM skiplock.jobs_done d "
                     "LEFT JOIN exec_results r ON r.job_id = d.id")
    assert len(done) == 7 and all(r == a for _, r, a in done), f"each write commits with its ack: {done}"
    assert scalar(dsn, "SELECT count(*) FROM exec_results WHERE n = 3") == 0
    assert scalar(dsn, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%%' "
                       "AND state = 'active'") == 0, "the statement was cancelled on the server"


@pytest.mark.slow
def test_async_ctx_pg_is_an_async_connection(dsn, start_engine):
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(EXEC_RESULTS)
    config = BASE + flow("apg", "async_pg", concurrency_per_worker=10)
    enqueue(dsn, "apg", [{"n": i} for i in range(30)])
    engine = start_engine(dsn, config, "--workers", "1", "--flows", "apg", "--drain")
    assert engine.wait(30) == 0, tail(engine)
    all_done_once(dsn, 30)
    assert scalar(dsn, "SELECT count(*) FROM exec_results r JOIN skiplock.jobs_done d ON d.id = r.job_id "
                       "WHERE r.n = (d.payload->>'n')::int + 1") == 30


# ---------------------------------------------------------------------------------------------
# batch handlers


@pytest.mark.slow
def test_batch_handler_with_mixed_outcomes(dsn, start_engine):
    config = BASE + flow("b", "batch_mixed", batch=True, batch_size=10, max_attempts=1)
    enqueue(dsn, "b", [{"n": i, **({"fail": True} if i % 4 == 0 else {})} for i in range(10)])
    engine = start_engine(dsn, config, "--workers", "1", "--flows", "b", "--drain")
    assert engine.wait(30) == 0, tail(engine)
    dead = rows(dsn, "SELECT (payload->>'n')::int, error_message FROM skiplock.jobs ORDER BY 1")
    assert dead == [(0, "item 0 failed"), (4, "item 4 failed"), (8, "item 8 failed")]
    done = rows(dsn, "SELECT (result->>'n')::int, (result->>'batch')::int FROM skiplock.jobs_done ORDER BY 1")
    assert [n for n, _ in done] == [1, 2, 3, 5, 6, 7, 9] and {b for _, b in done} == {10}, done

    enqueue(dsn, "b", [{"n": 100 + i, **({"wrong_length": True} if i == 0 else {})} for i in range(3)])
    again = start_engine(dsn, config, "--workers", "1", "--flows", "b", "--drain")
    assert again.wait(30) == 0, tail(again)
    wrong = rows(dsn, "SELECT error_type, error_message FROM skiplock.jobs WHERE (payload->>'n')::int >= 100")
    assert wrong == [("BatchResultError", "batch handler returned 0 outcomes for 3 jobs")] * 3


# ---------------------------------------------------------------------------------------------
# kill -9 and SIGTERM with jobs in flight


@pytest.mark.slow
def test_kill_9_of_a_worker_with_100_async_jobs_in_flight_loses_none(dsn, start_engine, tmp_path):
    timed = tmp_path / "timed.txt"
    total = 400
    config = BASE + flow("aio", "async_sleepy", concurrency_per_worker=100, batch_size=100)
    enqueue(dsn, "aio", [{"n": i, "sleep": 0.5} for i in range(total)])
    engine = start_engine(dsn, config, "--workers", "1", "--flows", "aio", "--drain",
                          env={"SKIPLOCK_TEST_TIMED": str(timed)})
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.jobs WHERE status = 'running'") >= 100, 20,
             message="100 jobs in flight")
    victim = scalar(dsn, "SELECT pid FROM skiplock.workers")
    os.kill(victim, signal.SIGKILL)
    assert engine.wait(60) == 0, tail(engine)
    left = rows(dsn, "SELECT status::text, count(*) FROM skiplock.jobs GROUP BY 1")
    assert left == [], left
    assert rows(dsn, "SELECT count(*), count(DISTINCT id) FROM skiplock.jobs_done") == [(total, total)]
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done WHERE attempts = 2") >= 100
    assert set(n for n, *_ in read_timed(str(timed))) == set(range(total))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["inline", "threads", "asyncio"])
def test_sigterm_with_jobs_in_flight(dsn, start_engine, tmp_path, mode):
    """In-flight jobs finish within the grace period and are acked; claimed jobs that never started are
    released without burning an attempt."""
    timed = tmp_path / "timed.txt"
    total = 600
    handler = "async_sleepy" if mode == "asyncio" else "sleepy"
    keys = {"batch_size": 20, **({"concurrency_per_worker": 8} if mode != "inline" else {})}
    config = BASE + flow("s", handler, **keys)
    enqueue(dsn, "s", [{"n": i, "sleep": 0.1} for i in range(total)])
    engine = start_engine(dsn, config, "--workers", "2", "--flows", "s", env={"SKIPLOCK_TEST_TIMED": str(timed)})
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done") >= 30, 20, message="work to start")
    asked = time.monotonic()
    engine.signal(signal.SIGTERM)
    assert engine.wait(GRACE + 5) == 0, tail(engine)
    assert time.monotonic() - asked < GRACE
    assert not log_has(engine, "did not stop within the grace period")
    assert set(dict(rows(dsn, "SELECT status::text, count(*) FROM skiplock.jobs GROUP BY 1"))) == {"pending"}
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs WHERE attempts <> 0 OR claimed_by IS NOT NULL") == 0
    ran = Counter(n for n, *_ in read_timed(str(timed)))
    assert set(ran.values()) == {1}
    done = {r[0] for r in rows(dsn, "SELECT (payload->>'n')::int FROM skiplock.jobs_done")}
    assert done == set(ran), "every job that ran was acked, and only those"


# ---------------------------------------------------------------------------------------------
# threaded ODBC


@pytest.mark.slow
def test_threaded_odbc_jobs_each_use_their_own_source_connection(dsn, pg_server, start_engine, tmp_path):
    timed = tmp_path / "timed.txt"
    database = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    odbc = (f"Driver={{PostgreSQL Unicode}};Servername={pg_server.socket_dir};Port={pg_server.port};"
            f"Database={database};UID=skiplock;CommLog=0;Debug=0")
    config = BASE + f'[sources.pgsrc]\nconnection_string = "{odbc}"\n' + \
        flow("odbc", "odbc_backend", concurrency_per_worker=4, sources=["pgsrc"])
    enqueue(dsn, "odbc", [{"n": i, "sleep": 0.05} for i in range(80)])
    engine = start_engine(dsn, config, "--workers", "1", "--flows", "odbc", "--drain",
                          env={"SKIPLOCK_TEST_TIMED": str(timed)})
    assert engine.wait(60) == 0, tail(engine)
    all_done_once(dsn, 80)
    lines = [line.split() for line in timed.read_text().splitlines()]
    by_thread = defaultdict(set)
    by_backend = defaultdict(set)
    for line in lines:
        by_thread[line[2]].add(line[5])
        by_backend[line[5]].add(line[2])
    assert len(by_thread) == 4, by_thread
    assert all(len(b) == 1 for b in by_thread.values()), f"a thread kept one source connection: {by_thread}"
    assert all(len(t) == 1 for t in by_backend.values()), f"no connection served two threads: {by_backend}"
    assert max_overlap([(float(l[3]), float(l[4])) for l in lines]) > 1


# ---------------------------------------------------------------------------------------------
# fast start and stop


def _engine(dsn: str, config: Path, log: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{SUPPORT_DIR.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "SKIPLOCK_DSN": dsn}
    env.pop("SKIPLOCK_ENV", None)
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "engine.cli", "run", "--config", str(config), *args],
                                stdout=out, stderr=subprocess.STDOUT, env=env)


def _started_at(log: Path) -> float:
    """When the supervisor logged "engine starting": Python's start-up and imports are behind it."""
    import datetime as dt

    for line in log.read_text().splitlines():
        if '"engine starting"' in line:
            stamp = orjson.loads(line)["ts"]
            return dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc).timestamp()
    raise AssertionError(log.read_text()[-2000:])


@pytest.mark.slow
def test_drain_of_an_empty_queue_and_sigterm_of_an_idle_engine_are_fast(dsn, tmp_path):
    """From "engine starting" (imports done) to exit: spawning workers, their first empty claim round,
    the supervisor noticing the drain from their reports, and the stop. Best of three (a shared machine
    only ever slows a round down)."""
    config = tmp_path / "c.toml"
    config.write_text(BASE + flow("e", "noop_record"))
    drains = []
    for i in range(3):
        log = tmp_path / f"drain-{i}.log"
        process = _engine(dsn, config, log, "--workers", "2", "--flows", "e", "--drain")
        assert process.wait(20) == 0, log.read_text()[-2000:]
        drains.append(time.time() - _started_at(log))
    assert min(drains) < 0.4, f"--drain of an empty queue, after imports: {drains}"

    stops = []
    for i in range(3):
        process = _engine(dsn, config, tmp_path / f"stop-{i}.log", "--workers", "2", "--flows", "e")
        wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.workers WHERE state = 'idle' "
                                     "AND stopped_at IS NULL") == 2, 20, message="two idle workers")
        time.sleep(0.3)
        t0 = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        stops.append(time.monotonic() - t0)
    assert min(stops) < 0.3, f"SIGTERM of an idle engine: {stops}"


# ---------------------------------------------------------------------------------------------
# an inline batch and a concurrent flow in one worker


@pytest.mark.slow
def test_concurrent_flow_is_topped_up_while_an_inline_batch_runs(dsn, start_engine, tmp_path):
    """One worker: a 2-second inline batch (40 jobs of 50 ms) beside a threaded flow that holds at most
    8 jobs (concurrency 4 + batch 4). Without top-ups between inline jobs the threaded flow finishes
    its 8 within 0.1 s and waits for the batch to end; with them it keeps running beside it."""
    timed = tmp_path / "timed.txt"
    config = (BASE + flow("slow", "sleepy", batch_size=40)
              + flow("threaded", "sleepy", concurrency_per_worker=4, batch_size=4))
    enqueue(dsn, "slow", [{"n": i, "sleep": 0.05} for i in range(40)])
    enqueue(dsn, "threaded", [{"n": 1000 + i, "sleep": 0.01} for i in range(400)])
    engine = start_engine(dsn, config, "--workers", "1", "--flows", "slow,threaded", "--drain",
                          env={"SKIPLOCK_TEST_TIMED": str(timed)})
    assert engine.wait(60) == 0, tail(engine)
    all_done_once(dsn, 440)
    spans = read_timed(str(timed))
    inline = [(s, e) for n, _, _, s, e in spans if n < 1000]
    first, last = min(s for s, _ in inline), max(e for _, e in inline)
    beside = [n for n, _, _, s, e in spans if n >= 1000 and first + 0.3 < s < last - 0.1]
    assert len(beside) > 40, f"{len(beside)} threaded jobs started while the inline batch ran"


@pytest.mark.slow
def test_async_odbc_jobs_do_not_share_the_main_threads_source_connection(dsn, pg_server, start_engine, tmp_path):
    """An inline flow (main thread) and an async flow (its loop's thread) of one worker use the same
    source: each thread has its own pyodbc connection (pyodbc connections are not shared by threads)."""
    timed = tmp_path / "timed.txt"
    database = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    odbc = (f"Driver={{PostgreSQL Unicode}};Servername={pg_server.socket_dir};Port={pg_server.port};"
            f"Database={database};UID=skiplock;CommLog=0;Debug=0")
    config = (BASE + f'[sources.pgsrc]\nconnection_string = "{odbc}"\n'
              + flow("inl", "odbc_backend", batch_size=5, sources=["pgsrc"])
              + flow("aio", "async_odbc_backend", concurrency_per_worker=4, sources=["pgsrc"]))
    enqueue(dsn, "inl", [{"n": i, "sleep": 0.02} for i in range(20)])
    enqueue(dsn, "aio", [{"n": 100 + i} for i in range(40)])
    engine = start_engine(dsn, config, "--workers", "1", "--flows", "inl,aio", "--drain",
                          env={"SKIPLOCK_TEST_TIMED": str(timed)})
    assert engine.wait(60) == 0, tail(engine)
    all_done_once(dsn, 60)
    lines = [line.split() for line in timed.read_text().splitlines()]
    inline = {line[5] for line in lines if int(line[0]) < 100}
    loop = {line[5] for line in lines if int(line[0]) >= 100}
    assert len(inline) == 1 and len(loop) == 1 and not inline & loop, (inline, loop)
