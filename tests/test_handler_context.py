"""The handler context through a real `engine run`: ctx.pg commits with the handler (default flows) or
with the batch's ack (`transactional = true`), failed jobs' writes roll back, ctx.enqueue joins the ack's
transaction, undeclared sources are refused by name. Plus the `transactional` config key.

"Same transaction as the ack" is checked with PostgreSQL's own bookkeeping: the handler stores
pg_current_xact_id() (its top-level transaction, also inside a savepoint) with its result, and the xmin
of the job's jobs_done row is the transaction of the ack that inserted it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import load_settings
from engine.errors import ConfigError
from engine.queue import Queue
from support.postgres import register_flows_for, scalar

CONFIG = """
[global]
heartbeat_interval = "1s"
stale_after = "3s"
[flows.ctx_tx]
handler = "support.context_handlers:write"
transactional = true
batch_size = 50
[flows.ctx_plain]
handler = "support.context_handlers:write"
batch_size = 50
"""

RESULTS_DDL = ("CREATE TABLE ctx_results (job_id bigint PRIMARY KEY, n integer NOT NULL, flow text NOT NULL, "
               "xact bigint NOT NULL)")


@pytest.fixture(autouse=True)
def registered_flows(request: pytest.FixtureRequest) -> None:
    """The flows these tests enqueue to, registered as an engine would (enqueue refuses unknown flows)."""
    register_flows_for(request, "ctx_tx", "ctx_plain", "ctx_follow_up")


def _xmin_pairs(dsn: str, flow: str) -> list[tuple[int, int | None, int | None]]:
    """(job id, transaction of its result row, of its ack) for the flow's completed jobs."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT d.id, r.xact %% 4294967296, d.xmin::text::bigint FROM skiplock.jobs_done d "
            "LEFT JOIN ctx_results r ON r.job_id = d.id WHERE d.flow = %s ORDER BY d.id", (flow,)).fetchall()


@pytest.mark.slow
def test_ctx_pg_commits_with_the_ack_only_in_transactional_flows(dsn, start_engine):
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(RESULTS_DDL)
    ok = [{"n": i} for i in range(10)]
    with Queue(dsn) as queue:
        for flow in ("ctx_tx", "ctx_plain"):
            queue.enqueue_many(flow, ok)
            queue.enqueue(flow, {"n": 100, "fail": True}, max_attempts=1)
            queue.enqueue(flow, {"n": 101, "swallow": True}, max_attempts=1)
            queue.enqueue(flow, {"n": 102, "source": "surveyhub"}, max_attempts=1)
            queue.enqueue(flow, {"n": 103, "follow_up": True, "fail": True}, max_attempts=1)
            queue.enqueue(flow, {"n": 104, "follow_up": True})
    engine = start_engine(dsn, CONFIG, "--workers", "1", "--flows", "ctx_tx,ctx_plain", "--drain")
    assert engine.wait(60) == 0, engine.log_path.read_text()[-3000:]

    for flow in ("ctx_tx", "ctx_plain"):
        done = _xmin_pairs(dsn, flow)
        assert len(done) == 11, (flow, done)  # 10 plain jobs and the one with a follow-up
        assert all(result_xmin is not None for _, result_xmin, _ in done), done
        same = [result_xmin == ack_xmin for _, result_xmin, ack_xmin in done]
        if flow == "ctx_tx":
            assert all(same), f"transactional: every result must commit with its ack: {done}"
        else:
            assert not any(same), f"default flow: results commit before the ack: {done}"
        # Failed jobs' writes rolled back; each failure is a dead letter with its own message.
        assert scalar(dsn, "SELECT count(*) FROM ctx_results WHERE flow = %s AND n >= 100 AND n < 104",
                      (flow,)) == 0
        dead = dict(psycopg.connect(dsn, autocommit=True).execute(
            "SELECT (payload->>'n')::int, error_message FROM skiplock.jobs WHERE flow = %s AND status = 'dead'",
            (flow,)).fetchall())
        assert sorted(dead) == [100, 101, 102, 103], dead
        assert "fails after writing" in dead[100]
        assert "does not declare source 'surveyhub'" in dead[102]
    # A statement error the handler swallowed: COMMIT would silently roll back, so the job fails.
    messages = dict(psycopg.connect(dsn, autocommit=True).execute(
        "SELECT flow, error_message FROM skiplock.jobs WHERE (payload->>'n')::int = 101").fetchall())
    assert all("handler went on" in messages[flow] for flow in ("ctx_tx", "ctx_plain")), messages

    # Follow-ups enqueued through ctx.enqueue: in a transactional flow they roll back with a failed job;
    # in a default flow they are committed at once, whatever the job does next.
    follow = psycopg.connect(dsn, autocommit=True).execute(
        "SELECT p.flow, (p.payload->>'n')::int FROM skiplock.jobs f JOIN "
        "(SELECT id, flow, payload FROM skiplock.jobs UNION ALL SELECT id, flow, payload FROM skiplock.jobs_done) p "
        "ON p.id = (f.payload->>'parent')::bigint WHERE f.flow = 'ctx_follow_up' ORDER BY 1, 2").fetchall()
    assert follow == [("ctx_plain", 103), ("ctx_plain", 104), ("ctx_tx", 104)], follow


@pytest.mark.slow
def test_lost_batch_transaction_fails_the_batch_and_runs_it_again(dsn, start_engine):
    """The batch's connection dies mid-batch: nothing of it committed, so every job of the batch fails
    (transiently) and runs again; each ends with exactly one result, committed with its ack."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(RESULTS_DDL)
    with Queue(dsn) as queue:
        queue.enqueue_many("ctx_tx", [{"n": i, "kill": i == 3} for i in range(6)])
    config = CONFIG.replace("transactional = true\n", 'transactional = true\nbackoff = { base = "100ms" }\n')
    engine = start_engine(dsn, config, "--workers", "1", "--flows", "ctx_tx", "--drain", "--wait-scheduled")
    assert engine.wait(60) == 0, engine.log_path.read_text()[-3000:]
    done = _xmin_pairs(dsn, "ctx_tx")
    assert len(done) == 6 and all(r == a for _, r, a in done), done
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT attempts, errors->0->>'message' FROM skiplock.jobs_done").fetchall()
    assert all(attempts == 2 for attempts, _ in rows), rows
    assert all(m.startswith("batch transaction lost before commit") for _, m in rows), rows
    assert "batch transaction lost before commit" in engine.log_path.read_text()


def test_transactional_flow_option(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[global]\ntransactional = false\n[flows.a]\nhandler = "m:f"\ntransactional = true\n'
                      '[flows.b]\nhandler = "m:f"\n')
    settings = load_settings(config, environ={})
    assert settings.flows["a"].transactional is True
    assert settings.flows["b"].transactional is False
    settings = load_settings(config, environ={"SKIPLOCK__FLOWS__B__TRANSACTIONAL": "true"})
    assert settings.flows["b"].transactional is True
    config.write_text('[flows.a]\nhandler = "m:f"\ntransactional = "yes"\n')
    with pytest.raises(ConfigError, match=r"flows\.a\.transactional must be true or false"):
        load_settings(config, environ={})
