"""One engine serving many flows (issue 17 item 3): the flows_due probe that replaces one empty claim
per flow, the worker keeping every one of its flows (an oversized event once trimmed the caller's
list in place, and a worker of 1,000 flows lost the last few from its own list), and jobs spread over
1,000 flows all run, each once."""

from __future__ import annotations

import time

import orjson
import psycopg
import pytest

from engine import store
from engine.queue import Queue
from engine.telemetry import MAX_EVENT_BYTES, encode_event
from support.engines import BASE, rows, tail, wait_for
from support.postgres import register_flows, scalar

MANY = 1_000


def many_flows_config(count: int) -> str:
    return BASE + "".join(f'\n[flows.m{i:04d}]\nhandler = "support.handlers:record"\n' for i in range(count))


def test_encode_event_trims_a_copy_and_leaves_the_callers_list_whole() -> None:
    names = [f"flow{i:04d}" for i in range(MANY)]
    text = encode_event("worker_started", engine="e", worker="w", host="h", pid=1, flows=names)
    assert len(text.encode()) <= MAX_EVENT_BYTES and orjson.loads(text)["truncated"] is True
    assert len(names) == MANY and names[-1] == "flow0999"


def test_flows_due_names_only_flows_with_a_claimable_job(dsn: str, queue: Queue, conn: psycopg.Connection) -> None:
    register_flows(dsn, "due", "later", "empty", "paused", "tripped", "full")
    queue.enqueue("due", {})
    queue.enqueue("later", {}, delay=3600)
    queue.enqueue("paused", {})
    queue.enqueue("tripped", {})
    queue.enqueue_many("full", [{}, {}])
    queue.pause("paused")
    store.circuit_open(conn, "tripped", 60)
    conn.execute("UPDATE skiplock.flows SET policy = '{\"concurrency\": 1}' WHERE name = 'full'")
    assert store.flows_due(conn, ["due", "later", "empty", "paused", "tripped", "full"]) == {"due", "full"}
    store.claim_batch(conn, "full", "w", 1, store.new_claim_token())  # one running: at its limit now
    assert store.flows_due(conn, ["due", "later", "empty", "paused", "tripped", "full", "unknown"]) == {"due"}


@pytest.mark.slow
def test_jobs_spread_over_a_thousand_flows_all_run_once(dsn: str, start_engine, tmp_path) -> None:
    """A backlog over every flow drains (--drain), then an idle engine runs single jobs sent to flows
    anywhere in its list, the last ones included, within a bound."""
    record = tmp_path / "record.txt"
    names = [f"m{i:04d}" for i in range(MANY)]
    register_flows(dsn, *names)
    with Queue(dsn) as q:
        for i, name in enumerate(names):
            q.enqueue_many(name, [{"n": 2 * i}, {"n": 2 * i + 1}])
    env = {"SKIPLOCK_TEST_RECORD": str(record)}
    config = many_flows_config(MANY)
    drain = start_engine(dsn, config, "--workers", "2", "--drain", env=env)
    assert drain.wait(120) == 0, tail(drain)
    assert scalar(dsn, "SELECT count(DISTINCT id) FROM skiplock.jobs_done") == 2 * MANY
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done") == 2 * MANY
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs") == 0

    engine = start_engine(dsn, config, "--workers", "2", env=env)
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.workers WHERE state = 'idle'") == 2, 60,
             message="two idle workers")
    flows_of = rows(dsn, "SELECT cardinality(flows) FROM skiplock.workers WHERE state = 'idle'")
    assert flows_of == [(MANY,), (MANY,)]
    picked = names[-5:] + names[::97]
    with Queue(dsn) as q:
        started = time.monotonic()
        for name in picked:
            q.enqueue(name, {"n": 10_000})
        wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done WHERE payload->>'n' = '10000'")
                 == len(picked), 30, message="the single jobs done")
    assert time.monotonic() - started < 20, tail(engine)
    done = {name for (name,) in rows(dsn, "SELECT flow FROM skiplock.jobs_done WHERE payload->>'n' = '10000'")}
    assert done == set(picked)


@pytest.mark.slow
def test_one_engine_vacuums_the_hot_table_when_dead_tuples_pile_up(dsn: str, start_engine, tmp_path) -> None:
    """vacuum_dead_tuples: the dead row versions completed jobs leave in skiplock.jobs are vacuumed
    by the engine between autovacuum's visits (pg_stat_user_tables.vacuum_count counts only manual
    VACUUMs); 0 leaves it to autovacuum."""
    def vacuums() -> int:
        return scalar(dsn, "SELECT vacuum_count FROM pg_stat_user_tables WHERE relid = 'skiplock.jobs'::regclass")

    register_flows(dsn, "v")
    config = BASE + 'vacuum_check_interval = "0.2s"\n\n[flows.v]\nhandler = "support.handlers:record"\n'
    env = {"SKIPLOCK_TEST_RECORD": str(tmp_path / "record.txt")}
    with Queue(dsn) as q:
        q.enqueue_many("v", [{"n": i} for i in range(3000)])
    off = start_engine(dsn, config.replace("[global]", "[global]\nvacuum_dead_tuples = 0"), "--drain", env=env)
    assert off.wait(60) == 0, tail(off)
    before = vacuums()
    time.sleep(1.0)
    assert vacuums() == before
    with Queue(dsn) as q:
        q.enqueue_many("v", [{"n": i} for i in range(3000)])
    on = start_engine(dsn, config.replace("[global]", "[global]\nvacuum_dead_tuples = 1000"), "--workers", "1",
                      env=env)
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.jobs") == 0, 30, message="the jobs done")
    wait_for(lambda: vacuums() > before, 15, message="a VACUUM by the engine")
    on.signal(15)
    assert on.wait(30) == 0, tail(on)


@pytest.mark.slow
def test_of_two_engines_one_holds_the_vacuum_connection(dsn: str, start_engine, tmp_path) -> None:
    register_flows(dsn, "v")
    config = BASE + 'vacuum_check_interval = "0.2s"\n\n[flows.v]\nhandler = "support.handlers:record"\n'
    env = {"SKIPLOCK_TEST_RECORD": str(tmp_path / "record.txt")}
    engines = [start_engine(dsn, config, "--workers", "1", env=env) for _ in range(2)]
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.workers WHERE state = 'idle'") == 2, 30,
             message="both engines up")
    time.sleep(1.0)  # several check intervals: the follower has asked and let its connection go
    assert scalar(dsn, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                       "AND application_name = 'skiplock-vacuum'") == 1
    for engine in engines:
        engine.signal(15)
        assert engine.wait(30) == 0, tail(engine)
