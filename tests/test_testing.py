"""engine.testing: a handler called with a test context, and a flow's pending jobs run in-process
against the real database, with the engine's outcome rules (retry, dead letters, ctx.pg rollback)."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from engine.queue import Queue
from engine.testing import Enqueued, job_context, make_context, run_pending  # noqa: F401 (job_context: a fixture)
from support.context_handlers import write
from support.postgres import register_flows_for, scalar


@pytest.fixture(autouse=True)
def registered_flows(request: pytest.FixtureRequest) -> None:
    """The flows these tests enqueue to, registered as an engine would (enqueue refuses unknown flows)."""
    register_flows_for(request, "ctx_follow_up", "doomed", "plain")

RESULTS_DDL = "CREATE TABLE ctx_results (job_id bigint PRIMARY KEY, n integer NOT NULL, flow text NOT NULL, xact bigint)"
CONFIG = """
[flows.plain]
handler = "support.context_handlers:write"
backoff = { base = "1h", cap = "1h", jitter = 0 }
[flows.doomed]
handler = "support.context_handlers:write"
permanent_errors = ["RuntimeError"]
"""


def test_a_context_for_a_direct_call(conn: psycopg.Connection, job_context) -> None:
    conn.execute(RESULTS_DDL)
    ctx = job_context("plain", job_id=7, attempt=2, pg=conn)
    assert write({"n": 1, "follow_up": True}, ctx) == {"n": 1}
    assert ctx.enqueued == [Enqueued("ctx_follow_up", {"parent": 7})]  # captured, not inserted
    assert conn.execute("SELECT job_id, n, flow FROM ctx_results").fetchall() == [(7, 1, "plain")]
    assert scalar(conn.info.dsn, "SELECT count(*) FROM skiplock.jobs") == 0
    assert (ctx.job_id, ctx.attempt, ctx.flow, ctx.cancelled) == (7, 2, "plain", False)
    ctx.cancelled = True
    assert ctx.cancelled and make_context(cancelled=True).cancelled
    with pytest.raises(RuntimeError, match="no Postgres connection"):
        make_context().pg


def test_run_pending_applies_the_engines_outcome_rules(dsn: str, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(RESULTS_DDL)
    with Queue(dsn) as queue:
        ok = queue.enqueue("plain", {"n": 1, "follow_up": True})
        dead = queue.enqueue("plain", {"n": 2, "fail": True}, max_attempts=1)
        retry = queue.enqueue("plain", {"n": 3, "fail": True}, max_attempts=3)
        swallowed = queue.enqueue("plain", {"n": 4, "swallow": True}, max_attempts=1)
        later = queue.enqueue("plain", {"n": 5}, delay=3600)
        permanent = queue.enqueue("doomed", {"n": 6, "fail": True})
    outcomes = {o.job_id: o for o in run_pending("plain", dsn=dsn, config=config)}
    assert {i: o.status for i, o in outcomes.items()} == {ok: "completed", dead: "dead", retry: "retry",
                                                          swallowed: "dead"}
    assert later not in outcomes  # not due
    assert outcomes[ok].result == {"n": 1} and outcomes[ok].attempt == 1
    assert isinstance(outcomes[dead].error, RuntimeError)
    assert "ctx.pg failed and the handler went on" in str(outcomes[swallowed].error)
    # the database says the same: ctx.pg committed only for the job that completed, its follow-up exists
    assert scalar(dsn, "SELECT array_agg(n ORDER BY n) FROM ctx_results") == [1]
    assert scalar(dsn, "SELECT result FROM skiplock.jobs_done WHERE id = %s", (ok,)) == {"n": 1}
    assert scalar(dsn, "SELECT payload FROM skiplock.jobs WHERE flow = 'ctx_follow_up'") == {"parent": ok}
    assert scalar(dsn, "SELECT status::text || ' ' || attempts FROM skiplock.jobs WHERE id = %s", (retry,)) == "pending 1"
    assert scalar(dsn, "SELECT errors->0->>'type' FROM skiplock.jobs WHERE id = %s", (dead,)) == "RuntimeError"
    [doomed] = run_pending("doomed", dsn=dsn, config=config)
    assert (doomed.job_id, doomed.status) == (permanent, "dead")  # permanent_errors: not retried
    assert scalar(dsn, "SELECT attempts FROM skiplock.jobs WHERE id = %s", (permanent,)) == 1
    assert run_pending("plain", dsn=dsn, config=config) == []  # nothing due is left


def test_run_pending_names_an_unknown_flow(dsn: str, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    with pytest.raises(KeyError, match=f"flow 'nope' is not configured in {config}"):
        run_pending("nope", dsn=dsn, config=config)
