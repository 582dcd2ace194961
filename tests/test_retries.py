"""Statements that may have committed (issue 10 item 5): the connection drops after the server
committed but before the client read the reply (support.proxy's drop_after_reply), and the retry
must recover the first try's effect instead of trusting its own answer."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from engine import store
from engine.errors import DatabaseUnavailable, ValidationError
from engine.queue import Queue
from engine.runs import fire_run_hooks
from engine.store import Failure
from support.proxy import TcpProxy, unix_socket_of
from support.postgres import register_flows_for


@pytest.fixture(autouse=True)
def registered_flows(request: pytest.FixtureRequest) -> None:
    """The flows these tests enqueue to, registered as an engine would (enqueue refuses unknown flows)."""
    register_flows_for(request, "batch", "cut", "dd", "f", "other", "warm-up", "x")


def one(conn: psycopg.Connection, sql: str, params: Any = None) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0] if len(row) == 1 else row


def dropped(proxy: TcpProxy, n: int = 1) -> bool:
    """The proxy counts a drop just after closing the socket the client already saw fail."""
    deadline = time.monotonic() + 5
    while proxy.drops_done < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return proxy.drops_done == n


@pytest.fixture
def proxy(dsn: str) -> Any:
    with TcpProxy(unix_socket_of(dsn)) as p:
        yield p


def _claimed_batch(queue: Queue, conn: psycopg.Connection, worker: str, run_id: str) -> tuple[int, list[int]]:
    queue.enqueue_many("f", [{"n": i} for i in range(3)], run_id=run_id)
    token = store.new_claim_token()
    rows = store.claim_batch(conn, "f", worker, 10, token)
    return token, sorted(r[0] for r in rows)


def _dead(job_id: int) -> Failure:
    return Failure(job_id, "ValueError", "bad input", None, True, 0.0)


def test_retried_ack_returns_the_first_outcome(queue: Queue, conn: psycopg.Connection, dsn: str,
                                               proxy: TcpProxy) -> None:
    worker = "w-ack-drop-1"
    token, ids = _claimed_batch(queue, conn, worker, "run-1")
    ack_id = store.new_ack_id()
    args = (worker, token, ids[:2], ['{"ok": 1}', None], [_dead(ids[2])])
    flaky = psycopg.connect(proxy.dsn(dsn), autocommit=True)
    proxy.drop_after_reply(worker.encode())
    with pytest.raises(psycopg.OperationalError):
        store.ack_batch(flaky, *args, ack_id=ack_id)
    assert dropped(proxy)
    # The first try committed: the jobs are done and dead, the run finished.
    assert one(conn, "SELECT count(*) FROM skiplock.jobs_done WHERE id = ANY(%s)", (ids[:2],)) == 2
    assert one(conn, "SELECT status::text FROM skiplock.jobs WHERE id = %s", (ids[2],)) == "dead"
    retried = store.ack_batch(conn, *args, ack_id=ack_id)
    assert (retried.completed, retried.retried, retried.dead_ids, retried.finished_runs, retried.refused) == (
        2, 0, [ids[2]], ["run-1"], 0)
    assert store.ack_receipt_get(conn, ack_id, 3) == retried
    # The retry changed nothing more: the run's counts and the archive are as the first try left them.
    assert one(conn, "SELECT completed, dead FROM skiplock.runs WHERE id = 'run-1'") == (2, 1)
    assert one(conn, "SELECT count(*) FROM skiplock.jobs_done") == 2


def test_retried_ack_without_an_ack_id_reports_everything_refused(queue: Queue, conn: psycopg.Connection,
                                                                  dsn: str, proxy: TcpProxy) -> None:
    """What the ack id fixes: the same fault without one (the behaviour before it)."""
    worker = "w-ack-drop-2"
    token, ids = _claimed_batch(queue, conn, worker, "run-2")
    flaky = psycopg.connect(proxy.dsn(dsn), autocommit=True)
    proxy.drop_after_reply(worker.encode())
    with pytest.raises(psycopg.OperationalError):
        store.ack_batch(flaky, worker, token, ids, None)
    retried = store.ack_batch(conn, worker, token, ids, None)
    assert (retried.completed, retried.finished_runs, retried.refused) == (0, [], 3)


def test_ack_retried_while_the_first_try_still_runs_gets_its_outcome(queue: Queue, conn: psycopg.Connection,
                                                                     dsn: str) -> None:
    """The retry arrives before the first try commits: it waits for the rows, finds them gone, and
    reads the receipt the first try committed."""
    worker = "w-ack-race"
    token, ids = _claimed_batch(queue, conn, worker, "run-3")
    ack_id = store.new_ack_id()
    first = psycopg.connect(dsn)
    first.execute("SELECT 1")  # open the transaction
    first_result = store.ack_batch(first, worker, token, ids, None, ack_id=ack_id)
    outcome: list[Any] = []
    second = psycopg.connect(dsn, autocommit=True)
    thread = threading.Thread(target=lambda: outcome.append(
        store.ack_batch(second, worker, token, ids, None, ack_id=ack_id)))
    thread.start()
    deadline = time.monotonic() + 10
    while one(conn, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database()") == 0:
        assert time.monotonic() < deadline, "the retry never waited for the first try"
        time.sleep(0.02)
    first.commit()
    thread.join(10)
    assert outcome == [first_result] and first_result.completed == 3 and first_result.refused == 0


def test_queue_ack_retries_by_itself_under_one_ack_id(queue: Queue, conn: psycopg.Connection, dsn: str,
                                                      proxy: TcpProxy) -> None:
    worker = "w-ack-api"
    token, ids = _claimed_batch(queue, conn, worker, "run-4")
    with Queue(proxy.dsn(dsn)) as flaky:
        proxy.drop_after_reply(worker.encode())
        result = flaky.ack(worker, token, ids, [{"r": 1}, {"r": 2}, {"r": 3}])
    assert dropped(proxy)
    assert (result.completed, result.finished_runs, result.refused) == (3, ["run-4"], 0)


def test_retried_run_hook_claim_gets_the_run_back(queue: Queue, conn: psycopg.Connection, dsn: str,
                                                  proxy: TcpProxy) -> None:
    worker = "w-hook"
    token, ids = _claimed_batch(queue, conn, worker, "run-5")
    ack = store.ack_batch(conn, worker, token, ids, None)
    assert ack.finished_runs == ["run-5"]
    claimer = store.new_hook_claimer()
    flaky = psycopg.connect(proxy.dsn(dsn), autocommit=True)
    proxy.drop_after_reply(claimer.encode())
    with pytest.raises(psycopg.OperationalError):
        store.run_claim_hook(flaky, "run-5", claimer)
    assert one(conn, "SELECT hook_fired_at IS NOT NULL FROM skiplock.runs WHERE id = 'run-5'")
    # Before: the retry got nothing and the hook never fired. Now the claimer's retry gets the run,
    # and nobody else does.
    assert store.run_claim_hook(conn, "run-5", None) is None
    assert store.run_claim_hook(conn, "run-5", store.new_hook_claimer()) is None
    fired: list[tuple[str, dict[str, Any]]] = []
    claimed = fire_run_hooks(conn, ["run-5"], {"f": lambda run, summary: fired.append((run, summary))},
                             __import__("logging").getLogger("test"), claimer=claimer)
    assert [c.run for c in claimed] == ["run-5"]
    assert fired == [("run-5", {"run": "run-5", "flow": "f", "total": 3, "completed": 3, "dead": 0})]


def test_enqueue_many_retries_a_batch_that_committed_exactly_once(dsn: str, conn: psycopg.Connection,
                                                                  proxy: TcpProxy) -> None:
    payloads = [{"n": i} for i in range(100)]
    with Queue(proxy.dsn(dsn)) as flaky:
        flaky.enqueue("warm-up", {})  # connect and check the schema before the fault
        proxy.drop_after_reply(b"COMMIT")
        result = flaky.enqueue_many("batch", payloads, run_id="load-1")
    assert dropped(proxy)
    assert result.replayed and (result.inserted, result.skipped) == (100, 0) and result.batch_key
    assert one(conn, "SELECT count(*) FROM skiplock.jobs WHERE flow = 'batch'") == 100
    assert one(conn, "SELECT total FROM skiplock.runs WHERE id = 'load-1'") == 100
    # A caller's own retry with the key the result names inserts nothing either.
    again = Queue(dsn).enqueue_many("batch", payloads, run_id="load-1", batch_key=result.batch_key)
    assert again.replayed and again.inserted == 100
    assert one(conn, "SELECT count(*) FROM skiplock.jobs WHERE flow = 'batch'") == 100
    assert one(conn, "SELECT total FROM skiplock.runs WHERE id = 'load-1'") == 100
    with pytest.raises(ValidationError, match="was used for flow 'batch', not 'other'"):
        Queue(dsn).enqueue_many("other", payloads, batch_key=result.batch_key)


def test_enqueue_many_dedupe_path_replays_its_counts(queue: Queue, dsn: str, conn: psycopg.Connection,
                                                     proxy: TcpProxy) -> None:
    queue.enqueue("dd", {}, dedupe_key="k0")
    with Queue(proxy.dsn(dsn)) as flaky:
        flaky.enqueue("warm-up", {})
        proxy.drop_after_reply(b"COMMIT")
        result = flaky.enqueue_many("dd", [{"n": i} for i in range(3)], dedupe_keys=["k0", "k1", "k2"])
    assert result.replayed and (result.inserted, result.skipped) == (2, 1)
    assert one(conn, "SELECT count(*) FROM skiplock.jobs WHERE flow = 'dd'") == 3


def test_enqueue_many_that_cannot_reach_the_database_names_its_key(dsn: str, conn: psycopg.Connection,
                                                                   proxy: TcpProxy) -> None:
    with Queue(proxy.dsn(dsn)) as flaky:
        flaky.enqueue("warm-up", {})
        flaky._retry_for = 1.0  # the default retries for SAFE_RETRY_SECONDS
        proxy.cut()
        with pytest.raises(DatabaseUnavailable, match=r"enqueue of batch 'key-7' \(2 jobs of cut\) failed"):
            flaky.enqueue_many("cut", [{}, {}], batch_key="key-7")
        proxy.restore()
        assert flaky.enqueue_many("cut", [{}, {}], batch_key="key-7").replayed is False
    assert one(conn, "SELECT count(*) FROM skiplock.jobs WHERE flow = 'cut'") == 2
    assert "password" not in str(proxy.dsn(dsn))


def test_enqueue_many_on_a_callers_connection_does_not_retry(dsn: str, proxy: TcpProxy) -> None:
    """A connection the caller gave cannot be replaced: its error comes back as it was."""
    flaky = psycopg.connect(proxy.dsn(dsn), autocommit=True)
    queue = Queue(conn=flaky)
    queue.enqueue("warm-up", {})
    proxy.cut()
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        queue.enqueue_many("x", [{}])
    assert time.monotonic() - started < 5


def test_enqueue_many_to_a_database_never_reached_fails_at_once(dsn: str, proxy: TcpProxy) -> None:
    """Nothing can have committed, and a bad DSN must stay a quick one-line error."""
    proxy.cut()
    started = time.monotonic()
    with Queue(proxy.dsn(dsn)) as queue, pytest.raises(DatabaseUnavailable):
        queue.enqueue_many("x", [{}])
    assert time.monotonic() - started < 5


@pytest.mark.slow
def test_engine_ack_whose_reply_is_lost_is_retried_to_its_first_outcome(dsn: str, proxy: TcpProxy,
                                                                         start_engine: Any, tmp_path: Any) -> None:
    """A real `engine run` through the proxy: the ack of a batch that ends a run commits, its reply is
    lost, and the worker's retry under the same ack id gets the first outcome back. Every job ran
    once, the run's hook fired once, and the engine saw nothing refused or rescued."""
    from support.engines import BASE, log_has, rows, tail
    from support.exec_handlers import read_timed

    timed, hooks = tmp_path / "timed.txt", tmp_path / "hooks.txt"
    marker = "drop-the-reply-to-this-ack"
    with Queue(dsn) as q:
        q.enqueue_many("batch", [{"n": i, **({"mark": marker} if i == 5 else {})} for i in range(10)],
                       run_id="r-lost-reply")
    config = BASE + """
[flows.batch]
handler = "support.exec_handlers:marked"
batch_size = 10
on_complete = "support.handlers:on_run_complete"
"""
    proxy.drop_after_reply(marker.encode())
    engine = start_engine(proxy.dsn(dsn), config, "--workers", "1", "--flows", "batch", "--drain",
                          env={"SKIPLOCK_TEST_TIMED": str(timed), "SKIPLOCK_TEST_HOOKS": str(hooks)})
    assert engine.wait(60) == 0, tail(engine)
    assert proxy.drops_done == 1, "the ack's reply was dropped after the server committed it"
    assert sorted(r[0] for r in read_timed(str(timed))) == list(range(10)), "every job ran exactly once"
    assert [line.split()[:4] for line in hooks.read_text().splitlines()] == [["r-lost-reply", "10", "10", "0"]]
    assert rows(dsn, "SELECT count(*), max(attempts) FROM skiplock.jobs_done") == [(10, 1)]
    assert rows(dsn, "SELECT completed, dead FROM skiplock.runs WHERE id = 'r-lost-reply'") == [(10, 0)]
    # The retry's answer is the first outcome, so the engine's own counts are right too.
    assert rows(dsn, "SELECT sum(completed)::int FROM skiplock.stats_minute WHERE flow = 'batch'") == [(10,)]
    assert not log_has(engine, "refused") and not log_has(engine, "rescued"), tail(engine)
    assert not log_has(engine, "worker died"), tail(engine)
