"""Faults on the many-flows path: one worker claims several plain flows in one claim_flows statement
and DeferredAcks (engine/worker/process.py) acks their batches in one statement (store.ack_across),
each flow's rows fenced by that claim's tokens. The promises of the single-flow ack hold there too:
a row rescued and re-claimed is refused, a deferred ack whose COMMIT's reply is lost is retried to its
first outcome (per flow), and a worker killed between the claim and the deferred ack loses nothing
and completes nothing twice."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest

from engine import store
from engine.queue import Queue
from engine.store import AckPart, AckResult, Failure
from engine.worker.process import DUE_PROBE_MIN
from support.engines import BASE, log_has, rows, tail, wait_for
from support.handlers import read_records
from support.postgres import register_flows
from support.proxy import TcpProxy, unix_socket_of

# More flows than DUE_PROBE_MIN, so the worker claims across them; jobs per flow such that one
# claim_flows statement (at most batch_size = 100 jobs) takes them all.
FLOWS = [f"d{i:02d}" for i in range(DUE_PROBE_MIN + 2)]
PER_FLOW = 3
TOTAL = len(FLOWS) * PER_FLOW
RUNS = ("r-even", "r-odd")


def flows_config(handler: str) -> str:
    return BASE + "".join(f'\n[flows.{name}]\nhandler = "{handler}"\non_complete = "support.handlers:on_run_complete"\n'
                          for name in FLOWS)


def enqueue_spread(dsn: str, extra: dict[int, dict[str, Any]]) -> None:
    """PER_FLOW jobs in each flow, numbered 0..TOTAL-1, in two runs spanning every flow."""
    register_flows(dsn, *FLOWS)
    with Queue(dsn) as q:
        for f, name in enumerate(FLOWS):
            for k in range(PER_FLOW):
                n = f * PER_FLOW + k
                q.enqueue(name, {"n": n, **extra.get(n, {})}, run_id=RUNS[n % 2])


def assert_runs_finished_once(dsn: str, hooks: Path) -> None:
    lines = sorted(line.split()[:4] for line in hooks.read_text().splitlines())
    assert lines == [[run, str(TOTAL // 2), str(TOTAL // 2), "0"] for run in RUNS], "each run's hook fired once"
    assert rows(dsn, "SELECT id, completed, dead FROM skiplock.runs ORDER BY id") == \
        [(run, TOTAL // 2, 0) for run in RUNS]


def ack_transactions_over_several_flows(dsn: str) -> int:
    """Transactions that completed jobs of more than one flow: only DeferredAcks writes those (each
    flow's own ack is a statement of its own), and it acks only what claim_flows handed out."""
    return rows(dsn, """SELECT count(*) FROM (SELECT xmin::text FROM skiplock.jobs_done GROUP BY 1
                        HAVING count(DISTINCT flow) > 1) AS t""")[0][0]


def test_ack_across_fences_each_flow_and_counts_per_flow(dsn: str, queue: Queue, conn: psycopg.Connection) -> None:
    """One ack_across statement for three flows' batches of one claim_flows: each flow's outcome comes
    back on its own (completed, retried, dead under that flow's max_attempts, refused where a row was
    released and re-claimed by another worker); the run that ended goes to the first part alone; a
    retry with the same ack id gets the same split from the receipt and changes nothing."""
    register_flows(dsn, "ax", "ay", "az")
    queue.enqueue_many("ax", [{"n": i} for i in range(3)])
    queue.enqueue_many("ay", [{"n": i} for i in range(2)])
    queue.enqueue_many("az", [{"n": i} for i in range(2)], run_id="r-az")
    base = store.new_claim_token()
    claims = [store.FlowClaim("ax", 10, base ^ 0, 5), store.FlowClaim("ay", 10, base ^ 1, 1),
              store.FlowClaim("az", 10, base ^ 2, 5)]
    (ax, ay, az) = [sorted(r[0] for r in got) for got in store.claim_flows(conn, "w-across", claims, 10)]
    assert (len(ax), len(ay), len(az)) == (3, 2, 2)
    # ax's third job goes back and another worker claims it: this worker's ack of it must be refused.
    assert store.release_batch(conn, "w-across", base ^ 0, [ax[2]]) == 1
    assert [r[0] for r in store.claim_batch(conn, "ax", "w-other", 10, store.new_claim_token())] == [ax[2]]

    def transient(job_id: int) -> Failure:
        return Failure(job_id, "ValueError", "try again", None, False, 30.0)
    parts = [AckPart("ax", base ^ 0, ax, ['{"r": 0}', None, '{"r": 2}'], [], 5),
             AckPart("ay", base ^ 1, ay[:1], None, [transient(ay[1])], 1),  # 1 attempt: the failure is dead
             AckPart("az", base ^ 2, az[:1], None, [transient(az[1])], 5)]
    ack_id = store.new_ack_id()
    first = store.ack_across(conn, "w-across", parts, ack_id=ack_id)
    assert first == [AckResult(2, 0, [], [], 1), AckResult(1, 0, [ay[1]], [], 0), AckResult(1, 1, [], [], 0)]
    assert rows(dsn, "SELECT status::text FROM skiplock.jobs WHERE id = %s", (ax[2],)) == [("running",)]
    assert rows(dsn, "SELECT id, result FROM skiplock.jobs_done WHERE flow = 'ax' ORDER BY id") == \
        [(ax[0], {"r": 0}), (ax[1], None)]
    assert rows(dsn, "SELECT id, status::text FROM skiplock.jobs WHERE flow IN ('ay', 'az') ORDER BY id") == \
        [(ay[1], "dead"), (az[1], "pending")]
    # The run ends when its retried job completes, under a single-flow ack: its own claim, its own token.
    assert rows(dsn, "UPDATE skiplock.jobs SET run_at = now() WHERE id = %s RETURNING id", (az[1],)) == [(az[1],)]
    token = store.new_claim_token()
    assert [r[0] for r in store.claim_batch(conn, "az", "w-across", 10, token)] == [az[1]]
    second = [AckPart("az", token, [az[1]], None, [], 5), AckPart("ax", base, [], None, [], 5)]
    assert store.ack_across(conn, "w-across", second, ack_id=store.new_ack_id()) == \
        [AckResult(1, 0, [], ["r-az"], 0), AckResult(0, 0, [], [], 0)]
    # The first ack again, same id (its reply lost): the receipt's split, nothing changed.
    assert store.ack_across(conn, "w-across", parts, ack_id=ack_id) == first
    assert rows(dsn, "SELECT count(*) FROM skiplock.jobs_done") == [(5,)]
    assert rows(dsn, "SELECT by_flow FROM skiplock.ack_receipts WHERE id = %s", (ack_id,)) == \
        [({"ax": [2, 0], "ay": [1, 0], "az": [1, 1]},)]


@pytest.fixture
def proxy(dsn: str) -> Any:
    with TcpProxy(unix_socket_of(dsn)) as p:
        yield p


def test_deferred_ack_whose_commit_reply_is_lost_is_retried_to_its_first_outcome(
        dsn: str, proxy: TcpProxy, start_engine: Any, tmp_path: Path) -> None:
    """The deferred ack's transaction commits (one ack of it carries the marker), the COMMIT's reply
    is lost, and the retry under the same ack ids gets the first outcomes back: every job ran once,
    each run's hook fired once, the engine's counts are right, nothing refused or rescued."""
    from support.exec_handlers import read_timed

    timed, hooks = tmp_path / "timed.txt", tmp_path / "hooks.txt"
    marker = "drop-the-commit-of-this-deferred-ack"
    enqueue_spread(dsn, {TOTAL // 2: {"mark": marker}})
    proxy.drop_after_reply(marker.encode(), at=b"COMMIT")
    engine = start_engine(proxy.dsn(dsn), flows_config("support.exec_handlers:marked"),
                          "--workers", "1", "--drain",
                          env={"SKIPLOCK_TEST_TIMED": str(timed), "SKIPLOCK_TEST_HOOKS": str(hooks)})
    assert engine.wait(60) == 0, tail(engine)
    assert proxy.drops_done == 1, "the deferred ack's COMMIT reply was dropped after the server committed it"
    assert ack_transactions_over_several_flows(dsn) == 1, "one deferred ack acked every flow's batch"
    assert sorted(r[0] for r in read_timed(str(timed))) == list(range(TOTAL)), "every job ran exactly once"
    assert rows(dsn, "SELECT count(*), count(DISTINCT id), max(attempts) FROM skiplock.jobs_done") == [(TOTAL, TOTAL, 1)]
    assert_runs_finished_once(dsn, hooks)
    # The retry's answers are the first outcomes, so the engine's own counts are right too.
    assert rows(dsn, "SELECT sum(completed)::int FROM skiplock.stats_minute") == [(TOTAL,)]
    assert not log_has(engine, "refused") and not log_has(engine, "rescued"), tail(engine)
    assert not log_has(engine, "worker died"), tail(engine)


def test_worker_killed_between_claim_and_deferred_ack_loses_nothing(
        dsn: str, start_engine: Any, tmp_path: Path) -> None:
    """kill -9 of the worker while it runs the batches of one claim_flows statement (the earlier
    flows' handlers done, their acks deferred): every claimed job is rescued, runs again, and is
    completed exactly once; each run finishes once."""
    record, hooks = tmp_path / "record.txt", tmp_path / "hooks.txt"
    slow = TOTAL // 2  # a middle flow's job: the flows before it have run, their acks wait
    enqueue_spread(dsn, {slow: {"sleep": 2.0}})
    engine = start_engine(dsn, flows_config("support.handlers:record_slow"), "--workers", "1", "--drain",
                          env={"SKIPLOCK_TEST_RECORD": str(record), "SKIPLOCK_TEST_HOOKS": str(hooks)})
    victim = wait_for(lambda: next((pid for n, pid in read_records(str(record)) if n == slow), None), 30,
                      message="the slow job to start")
    ran_before = {n for n, _ in read_records(str(record))}
    assert ran_before >= set(range(PER_FLOW * (slow // PER_FLOW))), "the earlier flows' batches ran first"
    # One statement claimed every flow's jobs under a token each; the batches that ran wait for the ack.
    assert rows(dsn, """SELECT count(*), count(DISTINCT flow), count(DISTINCT claim_token) FROM skiplock.jobs
                        WHERE status = 'running'""") == [(TOTAL, len(FLOWS), len(FLOWS))]
    assert rows(dsn, "SELECT count(*) FROM skiplock.jobs_done") == [(0,)]
    os.kill(victim, signal.SIGKILL)
    assert engine.wait(60) == 0, tail(engine)

    assert rows(dsn, "SELECT count(*) FROM skiplock.jobs") == [(0,)], tail(engine)
    assert rows(dsn, "SELECT count(*), count(DISTINCT id) FROM skiplock.jobs_done") == [(TOTAL, TOTAL)]
    assert rows(dsn, "SELECT sum(completed)::int FROM skiplock.stats_minute") == [(TOTAL,)], "completed once each"
    runs = Counter(n for n, _ in read_records(str(record)))
    assert set(runs) == set(range(TOTAL)), "a job never ran"
    # What the victim ran before its deferred ack runs again (at least once); nothing runs a third time.
    assert {n for n, c in runs.items() if c == 2} == ran_before and set(runs.values()) <= {1, 2}
    rescued = rows(dsn, """SELECT count(*), count(DISTINCT flow), min(attempts), max(attempts) FROM skiplock.jobs_done
                           WHERE errors @> '[{"type": "WorkerLost"}]'""")
    assert rescued == [(TOTAL, len(FLOWS), 2, 2)], "every job the statement claimed was rescued, once"
    assert_runs_finished_once(dsn, hooks)
    died = log_has(engine, "worker died")
    assert len(died) == 1 and died[0]["exit_code"] == -signal.SIGKILL, tail(engine)
    assert sum(line["rescued"] for line in log_has(engine, "rescued jobs")) == TOTAL, tail(engine)
