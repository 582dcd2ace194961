"""Stages (issue 15): Next(...) hand-off inserted by the parent's ack, runs that grow and seal, the
pipeline view. Real PostgreSQL, real engines; the fault that would break each guarantee is applied.

SKIPLOCK_STAGES_ITEMS=10000 runs the kill -9 pipeline at the issue's full size (default 2,000).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from engine import store
from engine.config import FlowConfig
from engine.errors import RunNotFound, ValidationError
from engine.pipelines import chains
from engine.queue import DeadLetterFilter, Queue
from engine.testing import run_pending
from support.engines import BASE, rows, tail, wait_for
from support.postgres import register_flows, scalar

ITEMS = int(os.environ.get("SKIPLOCK_STAGES_ITEMS", "2000"))
SUPPORT = Path(__file__).resolve().parent / "support"


def _records(path: Path) -> list[tuple[str, int, int, int]]:
    if not path.exists():
        return []
    return [(f, int(i), int(c), int(p)) for f, i, c, p in (line.split() for line in path.read_text().splitlines())]


def _kids(*items: tuple[int, str, str]) -> store.Children:
    kids = store.Children()
    for parent, flow, payload in items:
        kids.add(parent, flow, payload, 0, 0.0, None, None)
    return kids


# ---------------------------------------------------------------------------------------------
# The ack statement itself: fenced children, receipts, run growth


def test_a_refused_ack_creates_no_child_and_a_retried_ack_none_twice(dsn, queue):
    register_flows(dsn, "a", "b")
    job_id = queue.enqueue("a", {"n": 1}, run_id="r1")
    with psycopg.connect(dsn, autocommit=True) as conn:
        store.worker_register(conn, "w1", "e1", "h", 1, ["a"], "t")
        store.worker_register(conn, "w2", "e1", "h", 2, ["a"], "t")
        token1 = store.new_claim_token()
        assert [r[0] for r in store.claim_batch(conn, "a", "w1", 10, token1)] == [job_id]
        # The fault: w1 is lost and its job rescued and claimed by w2 while w1 still runs it.
        store.worker_mark_lost(conn, {"w1": "test"})
        assert store.rescue(conn, 30.0).rescued == 1
        token2 = store.new_claim_token()
        assert [r[0] for r in store.claim_batch(conn, "a", "w2", 10, token2)] == [job_id]

        late = store.ack_batch(conn, "w1", token1, [job_id], None, (), ack_id=store.new_ack_id(),
                               children=_kids((job_id, "b", '{"from": "w1"}')))
        assert (late.completed, late.refused, late.children) == (0, 1, 0)
        assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs WHERE parent_id = %s", (job_id,)) == 0
        assert scalar(dsn, "SELECT total FROM skiplock.runs WHERE id = 'r1'") == 1

        ack_id = store.new_ack_id()
        kids = _kids((job_id, "b", '{"from": "w2", "k": 1}'), (job_id, "b", '{"from": "w2", "k": 2}'))
        first = store.ack_batch(conn, "w2", token2, [job_id], None, (), ack_id=ack_id, children=kids)
        assert (first.completed, first.children, first.finished_runs) == (1, 2, [])
        # The same ack again (its first reply lost): the recorded outcome, no child inserted twice.
        again = store.ack_batch(conn, "w2", token2, [job_id], None, (), ack_id=ack_id, children=kids)
        assert (again.completed, again.refused, again.children) == (1, 0, 2)
    children = rows(dsn, "SELECT flow, payload ->> 'from', run_id, parent_id FROM skiplock.jobs "
                         "WHERE parent_id = %s ORDER BY id", (job_id,))
    assert children == [("b", "w2", "r1", job_id), ("b", "w2", "r1", job_id)]
    # The run grew in the same statement: 1 + 2 jobs, 1 completed, not finished.
    assert rows(dsn, "SELECT total, completed, finished_at IS NULL FROM skiplock.runs WHERE id = 'r1'") == [(3, 1, True)]
    assert rows(dsn, "SELECT parent_flow, child_flow FROM skiplock.flow_links") == [("a", "b")]


def test_children_of_failed_parents_are_dropped_and_dedupe_keys_hold(dsn, queue):
    register_flows(dsn, "a", "b")
    ids = [queue.enqueue("a", {"n": n}, run_id="r2") for n in range(3)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        token = store.new_claim_token()
        store.claim_batch(conn, "a", "w", 10, token)
        kids = store.Children()
        kids.add(ids[0], "b", '{"k": 0}', 0, 0.0, None, "same")
        kids.add(ids[1], "b", '{"k": 1}', 0, 0.0, None, "same")  # one unfinished job per key
        kids.add(ids[2], "b", '{"k": 2}', 0, 0.0, None, None)  # its parent fails below
        ack = store.ack_batch(conn, "w", token, ids[:2], None,
                              [store.Failure(ids[2], "E", "boom", None, True, 0.0)], children=kids)
    assert (ack.completed, len(ack.dead_ids), ack.children) == (2, 1, 1)
    assert rows(dsn, "SELECT payload FROM skiplock.jobs WHERE flow = 'b'") == [({"k": 0},)]
    # total: 3 enqueued + 1 child actually inserted; 2 completed + 1 dead: the child keeps it open.
    assert rows(dsn, "SELECT total, completed, dead, finished_at IS NULL FROM skiplock.runs WHERE id = 'r2'") == [
        (4, 2, 1, True)]


def test_the_plain_ack_sends_no_notify(dsn, queue):
    """The children INSERT runs only when there are children: the jobs table's statement trigger would
    otherwise wake every worker on every ack."""
    register_flows(dsn, "a")
    queue.enqueue_many("a", [{"n": n} for n in range(5)])
    with psycopg.connect(dsn, autocommit=True) as listener, psycopg.connect(dsn, autocommit=True) as conn:
        listener.execute("LISTEN skiplock_enqueued")
        token = store.new_claim_token()
        claimed = store.claim_batch(conn, "a", "w", 10, token)
        store.ack_batch(conn, "w", token, [r[0] for r in claimed], None, (), ack_id=store.new_ack_id())
        assert list(listener.notifies(timeout=0.3, stop_after=1)) == []


# ---------------------------------------------------------------------------------------------
# Runs: sealing, growth, reopening


def test_a_chunked_run_finishes_only_once_sealed(dsn, queue):
    register_flows(dsn, "a")
    with pytest.raises(ValidationError, match="seal applies to a run"):
        queue.enqueue_many("a", [{"n": 1}], seal=False)
    queue.enqueue_many("a", [{"n": 1}, {"n": 2}], run_id="chunked", seal=False)
    result = Queue(dsn).run("chunked")
    assert result[0].sealed is False
    with psycopg.connect(dsn, autocommit=True) as conn:
        token = store.new_claim_token()
        claimed = store.claim_batch(conn, "a", "w", 10, token)
        ack = store.ack_batch(conn, "w", token, [r[0] for r in claimed], None, ())
    assert ack.finished_runs == []  # every job ended, but more chunks may follow
    queue.enqueue_many("a", [{"n": 3}], run_id="chunked", seal=False)
    sealed = queue.seal_run("chunked")
    assert (sealed.was_sealed, sealed.finished, sealed.total) == (False, False, 3)
    assert queue.seal_run("chunked").was_sealed
    with psycopg.connect(dsn, autocommit=True) as conn:
        token = store.new_claim_token()
        claimed = store.claim_batch(conn, "a", "w", 10, token)
        ack = store.ack_batch(conn, "w", token, [r[0] for r in claimed], None, ())
    assert ack.finished_runs == ["chunked"]
    with pytest.raises(RunNotFound, match="run 'nope' not found"):
        queue.seal_run("nope")


def test_a_seal_after_the_last_job_finishes_the_run_at_once(dsn, queue):
    register_flows(dsn, "a")
    queue.enqueue("a", {"n": 1}, run_id="late-seal", seal=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        token = store.new_claim_token()
        claimed = store.claim_batch(conn, "a", "w", 10, token)
        assert store.ack_batch(conn, "w", token, [r[0] for r in claimed], None, ()).finished_runs == []
        sealed = queue.seal_run("late-seal")
        assert sealed.finished
        # No ack will claim its hook: the rescue pass's sweep takes it at once, not 10 s later.
        assert [r.run for r in store.runs_claim_orphaned_hooks(conn, ["a"])] == ["late-seal"]


def test_retrying_a_dead_job_reopens_its_finished_run(dsn, queue):
    register_flows(dsn, "a")
    queue.enqueue_many("a", [{"n": 1}, {"n": 2}], run_id="reopen")
    with psycopg.connect(dsn, autocommit=True) as conn:
        token = store.new_claim_token()
        a, b = [r[0] for r in store.claim_batch(conn, "a", "w", 10, token)]
        ack = store.ack_batch(conn, "w", token, [a], None, [store.Failure(b, "E", "x", None, True, 0.0)])
        assert ack.finished_runs == ["reopen"]
        assert store.run_claim_hook(conn, "reopen", "c1") is not None
    assert queue.retry_dead(DeadLetterFilter(ids=[b])) == [b]
    info, _ = queue.run("reopen")
    assert (info.finished_at, info.reopened, info.dead) == (None, 1, 0)
    with psycopg.connect(dsn, autocommit=True) as conn:
        token = store.new_claim_token()
        store.claim_batch(conn, "a", "w", 10, token)
        assert store.ack_batch(conn, "w", token, [b], None, ()).finished_runs == ["reopen"]
        # Finished again; its flow fires the hook once (default): nothing to claim this time.
        assert store.run_claim_hook(conn, "reopen", "c2") is None


# ---------------------------------------------------------------------------------------------
# engine.testing: the same rules in-process


def test_run_pending_inserts_children_and_refuses_bad_next(dsn, queue, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPLOCK_TEST_RECORD", str(tmp_path / "record"))
    register_flows(dsn, "bad", "last")
    parent = queue.enqueue("bad", {"item": 1, "kind": "ok"}, run_id="t")
    for kind in ("unknown", "payload", "mixed", "option"):
        queue.enqueue("bad", {"item": 2, "kind": kind}, max_attempts=1)
    outcomes = run_pending(FlowConfig("bad", "support.stage_handlers:bad_next"), dsn=dsn)
    by_kind = {o.payload["kind"]: o for o in outcomes}
    assert by_kind["ok"].status == "completed" and by_kind["ok"].result is None
    assert str(by_kind["option"].error) == "Next('last'): priority 1000000 must be an integer from -32768 to 32767"
    assert "flow 'no_such_flow' is unknown" in str(by_kind["unknown"].error)
    assert "payload must be a JSON object, got list" in str(by_kind["payload"].error)
    assert "fan-out list must hold only Next" in str(by_kind["mixed"].error)
    assert rows(dsn, "SELECT flow, parent_id, run_id FROM skiplock.jobs WHERE parent_id IS NOT NULL") == [
        ("last", parent, "t")]


# ---------------------------------------------------------------------------------------------
# Real engines


def _config(flows: str, **global_keys: str) -> str:
    return BASE + "".join(f"{k} = {v}\n" for k, v in global_keys.items()) + flows


def _oldest_worker_pid(dsn: str) -> int | None:
    """The live worker that started first: kills go round the slots, so no slot reaches the
    supervisor's crash-loop limit (10 early deaths in a row)."""
    found = rows(dsn, "SELECT pid FROM skiplock.workers WHERE state NOT IN ('stopped', 'lost') "
                      "ORDER BY started_at LIMIT 1")
    return found[0][0] if found else None


PIPELINE = """
[flows.parse]
handler = "support.stage_handlers:parse"
batch_size = 50
max_attempts = 20
backoff = { base = "0.05s", cap = "0.2s" }

[flows.chunk]
handler = "support.stage_handlers:chunk"
concurrency_per_worker = 4
batch_size = 50
max_attempts = 20
backoff = { base = "0.05s", cap = "0.2s" }

[flows.embed]
handler = "support.stage_handlers:embed"
concurrency_per_worker = 20
batch_size = 50
max_attempts = 20
backoff = { base = "0.05s", cap = "0.2s" }
"""


def test_three_stage_pipeline_under_kill_9(dsn, start_engine, tmp_path):
    """parse (inline) -> chunk (threads, fan-out 2) -> embed (asyncio), workers killed -9 every 0.6 s
    (9 kills, 3 per worker slot: under the supervisor's crash-loop limit of 10 early deaths):
    every item's final stage completes exactly once, every chain parse -> chunk -> embed is whole,
    and no stage job exists twice."""
    record = tmp_path / "record"
    register_flows(dsn, "parse", "chunk", "embed")
    Queue(dsn).enqueue_many("parse", [{"item": i} for i in range(ITEMS)], run_id="docs")
    engine = start_engine(dsn, _config(PIPELINE), "--workers", "3",
                          env={"SKIPLOCK_TEST_RECORD": str(record), "SKIPLOCK_TEST_STAGE_SLEEP": "0.001"})
    kills = 0
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        done = scalar(dsn, "SELECT finished_at IS NOT NULL FROM skiplock.runs WHERE id = 'docs'")
        if done:
            break
        time.sleep(0.6)
        pid = _oldest_worker_pid(dsn)
        if pid is not None and kills < 9:
            try:
                os.kill(pid, signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
    else:
        state = rows(dsn, "SELECT flow, status::text, count(*) FROM skiplock.jobs GROUP BY 1, 2 ORDER BY 1, 2")
        run = rows(dsn, "SELECT total, completed, dead, sealed FROM skiplock.runs WHERE id = 'docs'")
        done = rows(dsn, "SELECT flow, count(*) FROM skiplock.jobs_done GROUP BY 1 ORDER BY 1")
        pytest.fail(f"the pipeline's run did not finish after {kills} kills: run {run}, jobs {state}, done {done}; "
                    f"engine log: {tail(engine, 3000)}")
    assert kills >= 2, "the test must kill workers while the pipeline runs"
    assert engine.process.poll() is None

    done = rows(dsn, "SELECT id, flow, payload, parent_id, run_id FROM skiplock.jobs_done")
    assert not rows(dsn, "SELECT id FROM skiplock.jobs"), "nothing left pending, running or dead"
    by_id = {r[0]: r for r in done}
    per_flow = Counter(r[1] for r in done)
    assert per_flow == {"parse": ITEMS, "chunk": ITEMS, "embed": 2 * ITEMS}
    # Exactly one job per (stage, item, chunk): no stage job duplicated.
    keys = Counter((r[1], r[2]["item"], r[2].get("chunk")) for r in done)
    assert max(keys.values()) == 1
    # Every chain is whole: embed -> chunk -> parse through parent_id, same item, same run.
    for job_id, flow, payload, parent_id, run_id in done:
        assert run_id == "docs"
        if flow == "parse":
            assert parent_id is None
            continue
        parent = by_id[parent_id]
        assert parent[1] == {"chunk": "parse", "embed": "chunk"}[flow]
        assert parent[2]["item"] == payload["item"]
    # Execution records: every completed embed ran, and the run counted each job once.
    ran = Counter((f, i, c) for f, i, c, _ in _records(record) if f == "embed")
    assert set(ran) == {("embed", i, c) for i in range(ITEMS) for c in range(2)}
    assert rows(dsn, "SELECT total, completed, dead FROM skiplock.runs WHERE id = 'docs'") == [
        (4 * ITEMS, 4 * ITEMS, 0)]
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done WHERE status = 'completed'") == 4 * ITEMS


EXECUTORS = """
[flows.inline_a]
handler = "support.stage_handlers:first"
[flows.threads_a]
handler = "support.stage_handlers:first"
concurrency_per_worker = 4
[flows.asyncio_a]
handler = "support.stage_handlers:first_async"
[flows.batch_a]
handler = "support.stage_handlers:first_batch"
batch = true
[flows.tx_inline_a]
handler = "support.stage_handlers:first"
transactional = true
[flows.tx_threads_a]
handler = "support.stage_handlers:first"
transactional = true
concurrency_per_worker = 4
[flows.tx_batch_a]
handler = "support.stage_handlers:first_batch"
batch = true
transactional = true
[flows.auto_a]
handler = "support.stage_handlers:to_next_by_config"
next = "last"
[flows.bad]
handler = "support.stage_handlers:bad_next"
max_attempts = 1
[flows.last]
handler = "support.stage_handlers:last"
"""
MODES = ("inline", "threads", "asyncio", "batch", "tx_inline", "tx_threads", "tx_batch", "auto")


def test_every_executor_hands_off_in_its_ack(dsn, start_engine, tmp_path):
    record = tmp_path / "record"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE stage_writes (job_id bigint, flow text)")
    register_flows(dsn, *(f"{m}_a" for m in MODES), "bad", "last")
    queue = Queue(dsn)
    for mode in MODES:
        queue.enqueue_many(f"{mode}_a", [{"item": i, "to": "last", "write": True} for i in range(10)], run_id=mode)
    queue.enqueue("bad", {"item": 0, "kind": "unknown"}, run_id="bad")
    engine = start_engine(dsn, _config(EXECUTORS), "--workers", "2", "--drain",
                          env={"SKIPLOCK_TEST_RECORD": str(record)})
    assert engine.wait(90) == 0
    for mode in MODES:
        parents = rows(dsn, "SELECT id FROM skiplock.jobs_done WHERE flow = %s", (f"{mode}_a",))
        kids = rows(dsn, "SELECT parent_id, run_id, payload ->> 'item' FROM skiplock.jobs_done "
                         "WHERE flow = 'last' AND run_id = %s", (mode,))
        assert len(parents) == 10 and sorted(k[0] for k in kids) == sorted(p[0] for p in parents), mode
        assert rows(dsn, "SELECT total, completed, finished_at IS NOT NULL FROM skiplock.runs WHERE id = %s",
                    (mode,)) == [(20, 20, True)], mode
    # A result beside the child is stored; a `next` flow stores its result and hands it on.
    assert rows(dsn, "SELECT DISTINCT result ? 'first' FROM skiplock.jobs_done WHERE flow = 'inline_a'") == [(True,)]
    assert rows(dsn, "SELECT DISTINCT payload ->> 'seen' FROM skiplock.jobs_done WHERE run_id = 'auto' "
                     "AND flow = 'last'") == [("true",)]
    # Transactional flows: the handler's writes committed with the ack that inserted the child.
    assert {f for (f,) in rows(dsn, "SELECT DISTINCT flow FROM stage_writes")} >= {"tx_inline_a", "tx_threads_a"}
    # A bad Next fails its parent with one line and creates nothing.
    assert rows(dsn, "SELECT status, error_message FROM skiplock.jobs WHERE flow = 'bad'") == [
        ("dead", "Next('no_such_flow'): flow 'no_such_flow' is unknown: no engine has registered it "
                 "(declare it in the config, or start an engine that serves it)")]
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done WHERE run_id = 'bad'") == 0


HOOKED = """
[flows.grow]
handler = "support.stage_handlers:grow"
on_complete = "support.handlers:on_run_complete"
concurrency_per_worker = 4

[flows.fragile]
handler = "support.stage_handlers:fail_once_then_next"
on_complete = "support.handlers:on_run_complete"
max_attempts = 1

[flows.last]
handler = "support.stage_handlers:last"
"""


def test_a_run_grown_by_its_jobs_and_a_chunked_producer_fires_once_after_the_last_job(dsn, start_engine,
                                                                                   tmp_path):
    record, hooks, marker = tmp_path / "record", tmp_path / "hooks", tmp_path / "marker"
    register_flows(dsn, "grow", "fragile", "last")
    queue = Queue(dsn)
    env = {"SKIPLOCK_TEST_RECORD": str(record), "SKIPLOCK_TEST_HOOKS": str(hooks),
           "SKIPLOCK_TEST_MARKER": str(marker)}
    start_engine(dsn, _config(HOOKED), "--workers", "2", env=env)
    # Chunk 1 runs to the end (and grows by its own children) before chunk 2 exists.
    queue.enqueue_many("grow", [{"item": i, "sleep": 0.01} for i in range(20)], run_id="grown", seal=False)
    wait_for(lambda: scalar(dsn, "SELECT completed FROM skiplock.runs WHERE id = 'grown'") == 40, 60,
             message="chunk 1 and its children done")
    time.sleep(0.5)
    assert not hooks.exists(), "an unsealed run must not finish"
    queue.enqueue_many("grow", [{"item": i, "sleep": 0.05} for i in range(20, 40)], run_id="grown", seal=False)
    queue.seal_run("grown")
    wait_for(lambda: hooks.exists(), 60, message="the run's hook")
    time.sleep(1.0)  # a second firing would come now
    [line] = hooks.read_text().splitlines()
    assert line.split()[:4] == ["grown", "80", "80", "0"]
    last_job = scalar(dsn, "SELECT max(finished_at) FROM skiplock.jobs_done WHERE run_id = 'grown'")
    fired = scalar(dsn, "SELECT hook_fired_at FROM skiplock.runs WHERE id = 'grown'")
    assert fired >= last_job

    # A dead stage job of a finished run, retried: the run reopens, the job resumes at its own
    # stage and hands off; the hook (once by default) does not fire again.
    queue.enqueue("fragile", {"item": 7}, run_id="again")
    wait_for(lambda: hooks.read_text().count("again ") == 1, 30, message="the fragile run's first finish")
    [dead] = rows(dsn, "SELECT id FROM skiplock.jobs WHERE flow = 'fragile' AND status = 'dead'")
    marker.write_text("up")
    queue.retry_dead(DeadLetterFilter(ids=[dead[0]]))
    wait_for(lambda: scalar(dsn, "SELECT finished_at IS NOT NULL AND completed = 2 FROM skiplock.runs "
                                 "WHERE id = 'again'"), 30, message="the reopened run finished again")
    assert rows(dsn, "SELECT total, completed, dead, reopened FROM skiplock.runs WHERE id = 'again'") == [(2, 2, 0, 1)]
    assert rows(dsn, "SELECT flow, parent_id FROM skiplock.jobs_done WHERE run_id = 'again' ORDER BY id") == [
        ("fragile", None), ("last", dead[0])]
    time.sleep(1.0)
    assert hooks.read_text().count("again ") == 1


# ---------------------------------------------------------------------------------------------
# The pipeline view and the CLI


def test_chains_order_stages_and_cut_cycles():
    assert chains([("chunk", "embed"), ("parse", "chunk"), ("x", "y"), ("embed", "embed")]) == [
        ["parse", "chunk", "embed"], ["x", "y"]]
    assert chains([("a", "b"), ("b", "a")]) == [["a", "b"]]
    assert chains([("a", "b"), ("a", "c"), ("c", "d")]) == [["a", "b", "c", "d"]]


def _cli(dsn: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SKIPLOCK_DSN": dsn,
           "PYTHONPATH": f"{SUPPORT.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("SKIPLOCK_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True,
                          env=env, input=stdin, timeout=60)


def test_cli_runs_seal_show_status_and_jobs_show(dsn):
    register_flows(dsn, "parse", "chunk", "embed")
    bad = _cli(dsn, "enqueue", "parse", "--payload", '{"item": 1}', "--no-seal")
    assert (bad.returncode, bad.stderr) == (2, "engine: error: --no-seal applies to a run: give --run RUN too\n")
    unknown = _cli(dsn, "runs", "seal", "nope")
    assert (unknown.returncode, unknown.stderr) == (2, "engine: error: run 'nope' not found\n")

    ok = _cli(dsn, "enqueue", "parse", "--payload", '{"item": 1}', "--count", "3", "--run", "R", "--no-seal")
    assert ok.returncode == 0, ok.stderr
    show = _cli(dsn, "runs", "show", "R")
    assert show.returncode == 0 and "open, not sealed" in show.stdout, show.stdout
    # Stage jobs: complete one parse job by hand with a Next child, as a worker's ack would.
    queue = Queue(dsn)
    token, jobs = queue.claim("parse", "w", 1)
    ack = queue.ack("w", token, [jobs[0].id], children=_kids((jobs[0].id, "chunk", '{"item": 1}')))
    assert ack.children == 1
    sealed = _cli(dsn, "runs", "seal", "R")
    assert sealed.returncode == 0 and "it finishes after its last job (1 of 4 ended)" in sealed.stdout, sealed.stdout
    show = _cli(dsn, "runs", "show", "R")
    lines = show.stdout.splitlines()
    assert lines[1] == "jobs 4: 1 completed, 0 dead, 0 cancelled"
    assert [line.split()[:4] for line in lines[3:]] == [["parse", "2", "0", "0"], ["chunk", "1", "0", "0"]]

    status = _cli(dsn, "status")
    assert "pipeline parse" in status.stdout and "-> chunk" in status.stdout, status.stdout
    parent = _cli(dsn, "jobs", "show", str(jobs[0].id))
    [child_id] = [r[0] for r in rows(dsn, "SELECT id FROM skiplock.jobs WHERE parent_id = %s", (jobs[0].id,))]
    assert f"  job {child_id}  chunk  pending" in parent.stdout, parent.stdout
    child = _cli(dsn, "jobs", "show", str(child_id))
    assert f"parent: job {jobs[0].id}" in child.stdout


# ---------------------------------------------------------------------------------------------
# The example: seed 004's document pipeline


def test_engine_dev_runs_the_pipeline_example(dsn, tmp_path):
    env = {**os.environ, "SKIPLOCK_DSN": dsn}
    env.pop("SKIPLOCK_ENV", None)
    env.pop("SKIPLOCK_CONFIG", None)
    result = subprocess.run([sys.executable, "-m", "engine.cli", "dev", "--example", "pipeline", "--workers", "2",
                             "--data-dir", str(tmp_path / "data"), "--seconds", "90", "--no-console"],
                            capture_output=True, text=True, env=env, timeout=150)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "pipeline parse" in out and "-> chunk" in out and "-> embed" in out, out
    run_id = out.split("as run ")[1].split()[0]
    info = rows(dsn, "SELECT finished_at IS NOT NULL, total, completed, dead FROM skiplock.runs WHERE id = %s",
                (run_id,))
    [(finished, total, completed, dead)] = info
    assert finished and dead == 1 and completed == total - 1
    chunks = scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done WHERE flow = 'embed' AND run_id = %s", (run_id,))
    assert scalar(dsn, "SELECT count(*) FROM pipeline_embeddings") == chunks > 300
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs WHERE status = 'dead' AND flow = 'parse'") == 1
