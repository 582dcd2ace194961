"""One engine serving many flows (issue 17 item 3): the flows_due probe that replaces one empty claim
per flow (and its rate-limit gate), claim_flows (a batch across flows in one statement: per-flow
limits, tokens and priority order, held flows left alone), the enqueue wake-up naming its flow and
its relay records, the worker keeping every one of its flows (an oversized event once trimmed the
caller's list in place, and a worker of 1,000 flows lost the last few from its own list), and jobs
spread over 200 and 1,000 flows all run, each once."""

from __future__ import annotations

import time
from types import SimpleNamespace

import orjson
import psycopg
import pytest

from engine import db, store
from engine.queue import Queue
from engine.vacuum import pace
from engine.worker.process import DeferredAcks
from engine.telemetry import MAX_EVENT_BYTES, RELAY_CANCEL, RelayRead, encode_event, parse_relay, relay_enqueued
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


def test_the_vacuum_pass_paces_its_looks_by_the_rate_dead_tuples_pile_up() -> None:
    # 160,000 counted 2 s after the last VACUUM: 80,000/s, so 80,000 more are due by now (the count is
    # up to 1 s behind): VACUUM, and look again when 100,000 will have piled up, in 1.25 s
    assert pace(160_000, 2.0, 0.0, 100_000, 2.0) == (True, 80_000, pytest.approx(1.25))
    # 30,000 counted 1 s after: 30,000 more expected, not yet; the remaining 40,000 take 1.33 s
    assert pace(30_000, 1.0, 80_000, 100_000, 2.0) == (False, 30_000, pytest.approx(40_000 / 30_000))
    # just after a VACUUM the count may read 0 before anyone reported: the last rate stands
    assert pace(0, 0.3, 80_000, 100_000, 2.0) == (False, 80_000, pytest.approx(76_000 / 80_000))
    assert pace(0, 2.0, 80_000, 100_000, 2.0) == (False, 0.0, 2.0)  # a whole second of nothing: idle
    assert pace(10_000, 2.0, 0.0, 100_000, 2.0)[2] == 2.0  # a slow queue: never past the interval
    assert pace(10_000_000, 1.0, 0.0, 100_000, 2.0) == (True, 10_000_000, 0.25)  # nor sooner than 1/8 of it


@pytest.mark.slow
def test_the_vacuum_pass_keeps_pace_with_a_fast_queue(dsn: str, start_engine) -> None:
    """Fed about 10,000 jobs/s for 8 s (20,000 dead tuples a second) with a threshold of 1,000 and
    an interval of 3 s, the engine vacuums far more often than every 3 s: a fixed wait would run
    at most 3 VACUUMs in that time."""
    def vacuums() -> int:
        return scalar(dsn, "SELECT vacuum_count FROM pg_stat_user_tables WHERE relid = 'skiplock.jobs'::regclass")

    register_flows(dsn, "fast")
    config = BASE.replace("[global]", '[global]\nvacuum_dead_tuples = 1000\nvacuum_check_interval = "3s"') \
        + '\n[flows.fast]\nhandler = "engine.flows.builtin:noop"\n'
    engine = start_engine(dsn, config, "--workers", "2")
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.workers WHERE state = 'idle'") == 2, 30,
             message="the engine up")
    before = vacuums()
    with Queue(dsn) as q:
        started = time.monotonic()
        while time.monotonic() - started < 8:
            q.enqueue_many("fast", [{}] * 1000)
            time.sleep(0.1)
    ran = vacuums() - before
    engine.signal(15)
    assert engine.wait(30) == 0, tail(engine)
    assert ran >= 6, f"{ran} VACUUMs in 8 s of a fast queue"


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


# -- claim_flows, flows_due's rate gate, the flow-named wake-up (issue 17 item 3, second pass) -----

SPREAD = 200


def _claims(names: list[str], limit: int) -> list[store.FlowClaim]:
    return [store.FlowClaim(name, limit, store.new_claim_token(), 5) for name in names]


def test_claim_flows_takes_each_flow_by_priority_under_its_own_token_and_skips_held_flows(
        dsn: str, queue: Queue, conn: psycopg.Connection) -> None:
    names = [f"s{i:03d}" for i in range(SPREAD)]
    register_flows(dsn, *names)
    for name in names:
        for priority in (0, 5, 1):
            queue.enqueue(name, {"p": priority}, priority=priority)
    queue.pause("s007")
    store.circuit_open(conn, "s011", 60)
    held = {"s007", "s011"}
    seen: list[int] = []
    first = True
    while True:
        claims = _claims(names, 2)
        got = store.claim_flows(conn, "w", claims, 100)
        taken = sum(len(flow_rows) for flow_rows in got)
        if not taken:
            break
        assert taken <= 100
        for claim, flow_rows in zip(claims, got):
            assert len(flow_rows) <= 2
            assert not (flow_rows and claim.flow in held)
            if flow_rows:  # every row carries its flow's token: its ack is fenced by it
                tokens = rows_of(conn, "SELECT DISTINCT flow, claim_token FROM skiplock.jobs WHERE id = ANY(%s)",
                                 [r[0] for r in flow_rows])
                assert tokens == [(claim.flow, claim.token)]
            seen += [r[0] for r in flow_rows]
        if first:  # the first statement: flows in the order given, 2 each, the highest priorities first
            served = [c.flow for c, flow_rows in zip(claims, got) if flow_rows]
            assert served == [n for n in names if n not in held][:50]
            for flow_rows in got:
                if flow_rows:
                    assert [r[1]["p"] for r in flow_rows] == [5, 1]
            first = False
    assert len(seen) == len(set(seen)) == 3 * (SPREAD - len(held))
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs WHERE status = 'pending'") == 3 * len(held)


def rows_of(conn: psycopg.Connection, sql: str, ids: list[int]) -> list[tuple]:
    return conn.execute(sql, (ids,)).fetchall()


def test_claim_flows_acks_are_fenced_by_each_flows_token(dsn: str, queue: Queue, conn: psycopg.Connection) -> None:
    register_flows(dsn, "a", "b")
    queue.enqueue("a", {})
    queue.enqueue("b", {})
    claims = _claims(["a", "b"], 10)
    (a_rows, b_rows) = store.claim_flows(conn, "w", claims, 10)
    assert len(a_rows) == len(b_rows) == 1
    wrong = store.ack_batch(conn, "w", claims[0].token, [b_rows[0][0]])  # a's token on b's job
    assert (wrong.completed, wrong.refused) == (0, 1)
    right = store.ack_batch(conn, "w", claims[1].token, [b_rows[0][0]])
    assert right.completed == 1
    assert scalar(dsn, "SELECT status FROM skiplock.jobs WHERE flow = 'a'") == "running"


def test_claim_flows_sends_a_crashed_job_out_alone(dsn: str, queue: Queue, conn: psycopg.Connection) -> None:
    register_flows(dsn, "a", "b")
    queue.enqueue_many("a", [{}, {}])
    crashed = queue.enqueue("b", {})
    conn.execute("UPDATE skiplock.jobs SET crashes = 1 WHERE id = %s", (crashed,))
    got = store.claim_flows(conn, "w", _claims(["a", "b"], 10), 10)
    assert [len(flow_rows) for flow_rows in got] == [0, 1] and got[1][0][0] == crashed


def test_flows_due_leaves_out_a_rate_limited_flow_whose_bucket_is_empty(
        dsn: str, queue: Queue, conn: psycopg.Connection) -> None:
    names = [f"r{i:03d}" for i in range(SPREAD)]
    register_flows(dsn, *names)
    for name in names:
        queue.enqueue(name, {})
    rated = {"r005": (0.01, 1.0), "r150": (100.0, 100.0)}  # one nearly empty for a minute, one refilled at once
    rates = [rated.get(name) for name in names]
    conn.execute("INSERT INTO skiplock.rate_buckets (flow, tokens, updated_at) "
                 "VALUES ('r005', 0.2, now()), ('r150', 0, now() - interval '1 second')")
    assert store.flows_due(conn, names, rates) == set(names) - {"r005"}
    assert store.flows_due(conn, names) == set(names)  # without the rates: every flow with a due job
    conn.execute("UPDATE skiplock.rate_buckets SET tokens = 1 WHERE flow = 'r005'")
    assert "r005" in store.flows_due(conn, names, rates)


def test_the_enqueue_wake_up_names_its_flow_and_stays_bounded(dsn: str, conn: psycopg.Connection) -> None:
    names = [f"n{i:02d}" for i in range(40)]
    register_flows(dsn, *names)
    conn.execute("LISTEN skiplock_enqueued")
    with Queue(dsn) as q:
        q.enqueue("n00", {})
        q.enqueue("n01", {}, delay=60)  # not due: every worker recomputes its sleep
        q.enqueue_many("n02", [{}, {}])
    assert [n.payload for n in conn.notifies(timeout=1.0, stop_after=3)] == ["n00", "", "n02"]
    with psycopg.connect(dsn, autocommit=True) as tx, tx.transaction():  # 40 flows twice: 32 named, then ''
        q = Queue(conn=tx, check_schema=False)
        for name in names + names:
            q.enqueue(name, {})
    got = [n.payload for n in conn.notifies(timeout=1.0, stop_after=40)]
    assert got == names[:32] + [""]


def test_relay_records_survive_a_read_that_cuts_them() -> None:
    data = RELAY_CANCEL + relay_enqueued("f0001") + relay_enqueued("") + relay_enqueued("x" * 64) + relay_enqueued("b")
    read = RelayRead()
    rest = parse_relay(data[:4], read)
    assert rest and read.cancel and not read.flows and not read.anywhere
    assert parse_relay(rest + data[4:], read) == b""
    assert read.flows == {"f0001", "b"} and read.anywhere  # '' and an over-long name: every flow


@pytest.mark.slow
def test_a_spread_backlog_with_a_paused_flow_and_an_open_circuit_runs_once(dsn: str, start_engine, tmp_path) -> None:
    """200 flows, 5 jobs each: the workers claim across flows (claim_flows); the paused flow and the
    one whose circuit is open keep theirs; the rest run exactly once. Then an idle engine's workers,
    woken by enqueues naming their flows, run them."""
    names = [f"m{i:04d}" for i in range(SPREAD)]
    register_flows(dsn, *names)
    with Queue(dsn) as q:
        for i, name in enumerate(names):
            q.enqueue_many(name, [{"n": 5 * i + k} for k in range(5)])
        q.pause("m0007")
    with db.connect(dsn) as c:
        store.circuit_open(c, "m0011", 600)
    record = tmp_path / "record.txt"
    engine = start_engine(dsn, many_flows_config(SPREAD), "--workers", "2", env={"SKIPLOCK_TEST_RECORD": str(record)})
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done") >= 5 * (SPREAD - 2), 60,
             message="the spread backlog done")
    time.sleep(0.5)
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done") == 5 * (SPREAD - 2)
    assert scalar(dsn, "SELECT count(DISTINCT id) FROM skiplock.jobs_done") == 5 * (SPREAD - 2)
    assert rows(dsn, "SELECT flow, count(*) FROM skiplock.jobs WHERE status = 'pending' GROUP BY flow ORDER BY flow") \
        == [("m0007", 5), ("m0011", 5)]
    runs = record.read_text().split()[::2]
    assert len(runs) == len(set(runs)) == 5 * (SPREAD - 2), tail(engine)
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.workers WHERE state = 'idle'") == 2, 30,
             message="two idle workers")
    with Queue(dsn) as q:
        for name in names[::41]:
            q.enqueue(name, {"n": 100_000})
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done WHERE payload->>'n' = '100000'")
             == len(names[::41]), 30, message="the single jobs done")


class _AckingWorker:
    """What DeferredAcks needs of a worker: its id and a connection (a real one)."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.id = "w"
        self.conn = conn

    def with_db(self, what: str, action):
        return action(self.conn)


def test_deferred_acks_commit_together_and_stay_fenced(dsn: str, queue: Queue, conn: psycopg.Connection) -> None:
    """The acks of one claim_flows statement's batches go in one statement (ack_across), each flow's rows
    fenced by that claim's tokens: a batch rescued and re-claimed by another worker meanwhile is
    refused, the others complete, and each flow gets its own outcome."""
    register_flows(dsn, "a", "b", "c")
    for name in ("a", "b", "c"):
        queue.enqueue(name, {})
    claims = _claims(["a", "b", "c"], 10)
    got = store.claim_flows(conn, "w", claims, 10)
    conn.execute("UPDATE skiplock.jobs SET status = 'pending', claimed_by = NULL, claim_token = NULL "
                 "WHERE flow = 'b'")  # as the rescue of a lost worker leaves it
    assert len(store.claim_batch(conn, "b", "w2", 10, store.new_claim_token())) == 1
    acked: list = []
    deferred = DeferredAcks(_AckingWorker(conn))  # type: ignore[arg-type]
    for claim, flow_rows in zip(claims, got):
        flow = SimpleNamespace(name=claim.flow, config=SimpleNamespace(max_attempts=5))
        deferred.add(flow, claim.token, [flow_rows[0][0]], None, [], None, acked.append)
    deferred.flush()
    assert [(ack.completed, ack.refused) for ack in acked] == [(1, 0), (0, 1), (1, 0)]
    assert rows(dsn, "SELECT flow, status, claimed_by FROM skiplock.jobs") == [("b", "running", "w2")]
    # one transaction wrote both completions, in one ack statement (one receipt, counted per flow)
    assert rows(dsn, "SELECT count(*), count(DISTINCT xmin::text) FROM skiplock.jobs_done") == [(2, 1)]
    assert rows(dsn, "SELECT by_flow FROM skiplock.ack_receipts") == [({"a": [1, 0], "c": [1, 0]},)]


class _Taker:
    """An executor as _claim_across sees one: its flow, its claim limit, and take() keeping the rows."""

    def __init__(self, name: str, limit: int) -> None:
        self.flow = SimpleNamespace(name=name, half_open=False, config=SimpleNamespace(max_attempts=5))
        self.limit = limit
        self.taken: list[int] = []

    def claim_limit(self) -> int:
        return self.limit

    def take(self, rows: list, token: int, trial: bool) -> int:
        self.taken += [r[0] for r in rows]
        return len(rows)


def test_claim_across_sends_a_window_of_flows_that_grows_while_windows_run_dry(
        dsn: str, queue: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    """A statement is sent the flows it is likely to need, not all of them (dumping 1,000 flows' arrays
    cost the worker 3 ms a statement): 16 first; a window that found nothing is followed at once by
    the next, twice as wide, so jobs far down the list are still reached in one call; every job is
    claimed once, and the loop's rotation starts the next statement past the flows served."""
    from engine.worker.process import CROSS_WINDOW_MIN, Worker

    names = [f"w{i:03d}" for i in range(200)]
    register_flows(dsn, *names)
    wanted = {3: 150, 150: 10, 199: 1}
    for i, n in wanted.items():
        queue.enqueue_many(names[i], [{"n": k} for k in range(n)])
    sent: list[int] = []
    real = store.claim_flows

    def counting(conn: psycopg.Connection, worker_id: str, claims: list, total: int) -> list:
        sent.append(len(claims))
        return real(conn, worker_id, claims, total)
    monkeypatch.setattr(store, "claim_flows", counting)
    with db.open_pool(dsn, min_size=1, max_size=2, name="test-window") as pool:
        w = Worker.__new__(Worker)  # only what _claim_across uses
        w.id, w.pool, w.stopping, w.deferred_acks = "w-window", pool, False, None
        w.executors = [_Taker(name, 100) for name in names]
        w._cross_total, w._cross_window, w._served_up_to = 100, CROSS_WINDOW_MIN, 0
        across, recheck = list(range(len(names))), [0.0] * len(names)
        calls, now = 0, time.monotonic()  # one clock reading: a flow found empty stays skipped
        while Worker._claim_across(w, across, recheck, now):
            calls += 1
            across = across[w._served_up_to:] + across[:w._served_up_to]  # as the loop rotates
            assert calls < 10
    assert {i: len(w.executors[i].taken) for i in wanted} == wanted
    assert sum(len(e.taken) for e in w.executors) == sum(wanted.values())
    assert sent[0] == CROSS_WINDOW_MIN and max(sent) < len(names), sent
    # flow 3 fills the first; then windows of 16, 32 and 64 empty flows, then the rest of the list
    # (flows 116-199 and flow 3 again: 85), and a last look at the three flows that had jobs
    assert sent == [16, 16, 32, 64, 85, 3], sent


def test_the_monitor_sleeps_while_the_worker_is_idle_and_checks_once_it_is_busy() -> None:
    from engine.worker.heartbeat import MONITOR_INTERVAL, Monitor

    worker = SimpleNamespace(closing=False, state="idle", log=None)
    checked: list[float] = []
    monitor = Monitor(worker)
    monitor.checks.append(checked.append)
    monitor.start()
    try:
        time.sleep(10 * MONITOR_INTERVAL)
        assert checked == []  # an idle worker holds no job: nothing to check, no wake-ups
        worker.state = "busy"  # as Worker.busy(): the state first, then the wake
        monitor.wake()
        wait_for(lambda: len(checked) >= 3, timeout=5)
    finally:
        worker.closing = True
        monitor.wake()
