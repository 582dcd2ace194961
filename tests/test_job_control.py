"""Job control in the worker (issue 14): cancelling running jobs (async, cooperative sync,
uncooperative sync, a missed NOTIFY), Snooze in every executor and in engine.testing, ctx.progress
through `engine jobs show`. Real `engine run` processes; judged from execution records and the
tables, not from the engine's own counters."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from engine.config import FlowConfig
from engine.errors import JobCancelled, Snooze, ValidationError
from engine.handlers import check_progress
from engine.queue import Queue
from engine.testing import make_context, run_pending
from support.cli import engine, ok
from support.control_handlers import read_events
from support.engines import BASE, rows, tail, wait_for
from support.postgres import register_flows, scalar

GRACE = 1.0  # cancel_grace of these tests' flows


def flow(name: str, handler: str, *extra: str) -> str:
    return "\n".join([f"[flows.{name}]", f'handler = "support.control_handlers:{handler}"',
                      f'cancel_grace = "{GRACE:g}s"', *extra]) + "\n"


def status_of(dsn: str, job_id: int) -> str | None:
    hot = scalar(dsn, "SELECT status::text FROM skiplock.jobs WHERE id = %s", (job_id,))
    return hot or scalar(dsn, "SELECT status FROM skiplock.jobs_done WHERE id = %s", (job_id,))


def started(path: Path, n: int) -> tuple[int, float] | None:
    return next(((pid, at) for m, pid, event, at in read_events(str(path)) if m == n and event == "start"), None)


# mode: (handler, extra flow keys, quick handler, how the cancel is asked)
CASES = {
    "asyncio": ("async_wait", (), "async_quick", "cancel"),
    "asyncio-uncooperative": ("async_swallow", (), "async_quick", "cancel"),
    "inline-cooperative": ("cooperative", (), "quick", "cancel"),
    "inline-uncooperative": ("stubborn", (), "quick", "cancel"),
    "threads-uncooperative": ("stubborn", ("concurrency_per_worker = 2",), "quick", "cancel"),
    "inline-missed-notify": ("cooperative", (), "quick", "update"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cancel_of_a_running_job_ends_it_cancelled_and_the_worker_keeps_serving(
        case: str, dsn: str, start_engine, tmp_path: Path) -> None:
    handler, extra, quick, how = CASES[case]
    timed = tmp_path / "timed.txt"
    config = BASE + flow("slow", handler, *extra) + flow("fast", quick, *extra)
    register_flows(dsn, "slow", "fast")
    eng = start_engine(dsn, config, "--workers", "1", env={"SKIPLOCK_TEST_TIMED": str(timed)})
    with Queue(dsn) as queue:
        job_id = queue.enqueue("slow", {"n": 1}, run_id="r1")
        queue.enqueue("fast", {"n": 2}, run_id="r1")
        wait_for(lambda: started(timed, 1), 20, message=f"the slow job to start\n{tail(eng)}")
        wait_for(lambda: status_of(dsn, job_id) == "running", 5, message="the slow job running")
        if handler not in ("stubborn", "async_swallow"):  # the handler's progress reaches `jobs show`
            wait_for(lambda: queue.job(job_id).progress is not None, 5, message="progress written")
            job = queue.job(job_id)
            assert (job.progress, job.progress_message) == ((0.25, "step 1 of 4") if handler == "cooperative"
                                                            else (0.5, None))
            if case == "inline-cooperative":  # and through the CLI (once: each call is a process start)
                shown = json.loads(ok(engine("jobs", "show", str(job_id), "--json", dsn=dsn)))
                assert (shown["progress"], shown["progress_message"]) == (0.25, "step 1 of 4")
                text = ok(engine("jobs", "show", str(job_id), dsn=dsn))
                assert "progress 25% step 1 of 4" in text, text
        asked = time.monotonic()
        if how == "cancel":
            assert queue.cancel([job_id]).requested == [job_id]
        else:  # no NOTIFY: only the worker's periodic check can find it
            scalar(dsn, "UPDATE skiplock.jobs SET cancel_requested_at = now() WHERE id = %s RETURNING 1", (job_id,))
        wait_for(lambda: status_of(dsn, job_id) == "cancelled", GRACE + 3, interval=0.02,
                 message=f"the job cancelled\n{tail(eng)}")
        took = time.monotonic() - asked
        assert took <= GRACE + 1.0, took
        # Ended once, cancelled, never retried; history says so; the run counted it.
        assert rows(dsn, "SELECT status, attempts, errors -> -1 ->> 'type' FROM skiplock.jobs_done WHERE id = %s",
                    (job_id,)) == [("cancelled", 1, "JobCancelled")]
        assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs WHERE id = %s", (job_id,)) == 0
        # The same worker process serves the next jobs.
        pid = started(timed, 1)[0]
        for n in (3, 4):
            queue.enqueue("fast", {"n": n})
        wait_for(lambda: {m for m, p, e, _ in read_events(str(timed)) if e == "quick" and p == pid} >= {2, 3, 4},
                 10, message=f"the worker to serve more jobs\n{tail(eng)}")
        assert rows(dsn, "SELECT total, completed, dead, cancelled, finished_at IS NOT NULL FROM skiplock.runs "
                         "WHERE id = 'r1'") == [(1, 1, 0, 1, True)]
        events = {e for m, _, e, _ in read_events(str(timed)) if m == 1}
        if handler.startswith("async"):
            assert "task-cancelled" in events and "end" not in events
        if handler == "cooperative":
            assert "saw-cancel" in events and "end" not in events
        # Cancelling it again: nothing changes, and the report says why.
        assert queue.cancel([job_id]).unchanged == {job_id: "already cancelled"}
    if case == "inline-cooperative":  # the CLI's report of it: exit 1, nothing changed
        out = engine("cancel", str(job_id), dsn=dsn)
        assert out.returncode == 1 and "already cancelled" in out.stdout + out.stderr, out
    eng.stop()


def test_snooze_does_not_burn_an_attempt_in_any_executor(dsn: str, start_engine, tmp_path: Path) -> None:
    """Three snoozes with max_attempts = 1, then success: inline, threads, asyncio and batch flows."""
    timed = tmp_path / "timed.txt"
    config = (BASE + flow("s_inline", "snooze_thrice", "max_attempts = 1")
              + flow("s_threads", "snooze_thrice", "max_attempts = 1", "concurrency_per_worker = 2")
              + flow("s_async", "async_snooze_thrice", "max_attempts = 1")
              + flow("s_batch", "batch_snooze_thrice", "max_attempts = 1", "batch = true"))
    names = ("s_inline", "s_threads", "s_async", "s_batch")
    register_flows(dsn, *names)
    with Queue(dsn) as queue:
        ids = {name: queue.enqueue(name, {"n": i}) for i, name in enumerate(names)}
    eng = start_engine(dsn, config, "--workers", "1", env={"SKIPLOCK_TEST_TIMED": str(timed)})
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done") == 4, 20,
             message=f"four snoozed jobs to complete\n{tail(eng)}")
    for name, job_id in ids.items():
        [(status, attempts, result, history)] = rows(
            dsn, "SELECT status, attempts, result, errors FROM skiplock.jobs_done WHERE id = %s", (job_id,))
        assert (status, attempts, result) == ("completed", 1, {"snoozes": 3, "attempt": 1}), name
        assert [e["snoozed"] for e in history] == [True, True, True] and [e["attempt"] for e in history] == [1, 1, 1]
    runs = [(n, e) for n, _, e, _ in read_events(str(timed))]
    assert sorted(runs) == sorted((i, f"run-{k}") for i in range(4) for k in range(4))
    # No failure counted in the per-minute stats (the telemetry ticks every 0.25 s here).
    wait_for(lambda: scalar(dsn, "SELECT coalesce(sum(completed), 0) FROM skiplock.stats_minute") == 4, 5,
             message="stats of the completions")
    assert scalar(dsn, "SELECT coalesce(sum(failed) + sum(dead), 0) FROM skiplock.stats_minute") == 0
    eng.stop()


def test_engine_testing_supports_snooze_and_progress(dsn: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SKIPLOCK_TEST_TIMED", str(tmp_path / "timed.txt"))
    ctx = make_context("f")
    ctx.progress(0.5, "half")
    ctx.progress(1)
    assert ctx.progress_reports == [(0.5, "half"), (1.0, None)]
    ctx.cancelled = True
    with pytest.raises(JobCancelled):
        ctx.check_cancelled()

    register_flows(dsn, "snz")
    with Queue(dsn) as queue:
        job_id = queue.enqueue("snz", {"n": 1})
    config = FlowConfig("snz", handler="support.control_handlers:snooze_thrice", max_attempts=1)
    outcomes = run_pending(config, dsn=dsn)
    assert [o.status for o in outcomes] == ["snoozed"] and isinstance(outcomes[0].error, Snooze)
    assert rows(dsn, "SELECT status::text, attempts FROM skiplock.jobs WHERE id = %s", (job_id,)) == [("pending", 0)]


@pytest.mark.parametrize("fraction,message,error", [
    (1.5, None, "fraction must be a finite number from 0 to 1, got 1.5"),
    (float("nan"), None, "got nan"),
    (True, None, "got True"),
    ("0.5", None, "got '0.5'"),
    (0.5, 7, "message must be a str or None, got int"),
    (0.5, "x" * 201, "message is 201 characters, at most 200"),
    (0.5, "a\x00b", "NUL"),
])
def test_progress_arguments_are_checked_with_one_clear_line(fraction, message, error) -> None:
    with pytest.raises(ValidationError, match="ctx.progress") as raised:
        check_progress(fraction, message)
    assert error in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("delay", [-1, float("inf"), "5", None])
def test_snooze_refuses_a_bad_delay(delay) -> None:
    with pytest.raises(ValidationError, match="Snooze"):
        Snooze(delay)
