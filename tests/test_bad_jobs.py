"""One bad job fails alone (issue 10 item 4, issue 13 item 4), through a real `engine run`.

Each bad job sits in the middle of a batch with six healthy neighbours and max_attempts = 2: the bad
job ends dead with a clear error, every healthy neighbour completes with exactly one attempt (none
burned by a crash or a rescue), and nothing stays claimed.
"""

from __future__ import annotations

import pytest

from support.postgres import register_flows, scalar
from engine.queue import Queue
from support.engines import BASE, log_has, rows, tail

CASES = {
    "set": ("ResultNotStorable", "result is not JSON serializable: set"),
    "nul_result": ("ResultNotStorable", "result contains a NUL character"),
    "str_raises": ("BrokenStr", "<str() of the BrokenStr raised ValueError>"),
    "nul_message": ("RuntimeError", "bad \\x00 byte and a lone \\ud800 surrogate"),
    "sys_exit": ("SystemExit", "3"),
    "keyboard": ("KeyboardInterrupt", "KeyboardInterrupt"),
    "os_exit": ("HandlerExit", "handler called os._exit(1)"),
    "swallow_timeout": ("JobTimeout", "handler ran past its timeout"),
    "password": ("RuntimeError", "cannot connect to"),
}


def _enqueue_cases(dsn: str, kinds: list[str]) -> None:
    payloads = []
    n = 0
    for kind in kinds:  # a batch of 7 per case: three healthy, the bad one, three healthy
        for position in range(7):
            payloads.append({"n": n, **({"bad": kind} if position == 3 else {})})
            n += 1
    register_flows(dsn, "bad")  # as an engine that ran before would have
    with Queue(dsn) as q:
        q.enqueue_many("bad", payloads)


def _config(batch: int, extra: str = "") -> str:
    return BASE + f"""
[flows.bad]
handler = "support.exec_handlers:bad"
batch_size = {batch}
max_attempts = 2
timeout = "0.5s"
backoff = {{ base = "0s", cap = "0.05s", jitter = 0 }}
{extra}"""


def _check(dsn: str, kinds: list[str], expected: dict[str, tuple[str, str]]) -> None:
    healthy = rows(dsn, "SELECT attempts, count(*) FROM skiplock.jobs_done WHERE NOT payload ? 'bad' GROUP BY 1")
    assert healthy == [(1, 6 * len(kinds))], f"healthy neighbours must complete on their first attempt: {healthy}"
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs WHERE status <> 'dead'") == 0
    dead = {kind: (etype, message, attempts) for kind, etype, message, attempts in rows(
        dsn, "SELECT payload->>'bad', error_type, error_message, attempts FROM skiplock.jobs WHERE status = 'dead'")}
    for kind in kinds:
        etype, fragment = expected[kind]
        assert kind in dead, (kind, dead)
        assert dead[kind][0] == etype and fragment in dead[kind][1], (kind, dead[kind])
        assert dead[kind][2] == 2, (kind, dead[kind])
    assert "hunter2" not in str(dead.get("password", ""))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["inline", "threads", "asyncio"])
def test_bad_results_and_errors_fail_alone(dsn, start_engine, tmp_path, mode):
    # Swallowing a SIGALRM JobTimeout is an inline matter: threads and tasks have their own deadlines.
    kinds = [k for k in CASES if mode == "inline" or k != "swallow_timeout"]
    _enqueue_cases(dsn, kinds)
    extra = {"inline": "", "threads": "concurrency_per_worker = 4\n",
             "asyncio": 'concurrency_per_worker = 4\nhandler = "support.exec_handlers:async_bad"\n'}[mode]
    config = _config(7, extra)
    if mode == "asyncio":
        config = config.replace('handler = "support.exec_handlers:bad"\n', "", 1)
    engine = start_engine(dsn, config, "--workers", "1", "--flows", "bad", "--drain",
                          env={"SKIPLOCK_TEST_TIMED": str(tmp_path / "timed.txt")})
    assert engine.wait(60) == 0, tail(engine)
    _check(dsn, kinds, CASES)
    assert not log_has(engine, "worker died"), "no bad job may take its worker down"


@pytest.mark.slow
def test_fork_in_handler_child_exits_and_parent_goes_on(dsn, start_engine, tmp_path):
    _enqueue_cases(dsn, ["fork"])
    engine = start_engine(dsn, _config(7), "--workers", "1", "--flows", "bad", "--drain",
                          env={"SKIPLOCK_TEST_TIMED": str(tmp_path / "timed.txt")})
    assert engine.wait(30) == 0, tail(engine)
    assert rows(dsn, "SELECT count(*), max(attempts) FROM skiplock.jobs_done") == [(7, 1)]
    assert scalar(dsn, "SELECT result->>'side' FROM skiplock.jobs_done WHERE payload ? 'bad'") == "parent"
    assert not log_has(engine, "worker died")


@pytest.mark.slow
def test_handler_stuck_past_its_hard_stop_fails_alone(dsn, start_engine, tmp_path):
    """It swallows every JobTimeout and keeps running: the monitor acks the three that finished,
    releases the three that never started (attempt refunded), fails the stuck one, and the worker is
    replaced; the second attempt ends the same way, dead."""
    _enqueue_cases(dsn, ["stuck"])
    engine = start_engine(dsn, _config(7), "--workers", "1", "--flows", "bad", "--drain",
                          env={"SKIPLOCK_TEST_TIMED": str(tmp_path / "timed.txt")})
    assert engine.wait(60) == 0, tail(engine)
    _check(dsn, ["stuck"], {"stuck": ("JobTimeout", "handler ran past its timeout")})
    assert log_has(engine, "handler ignored its timeout")


CRASHES = {
    "segfault": "worker exited with signal 11 (SIGSEGV) while running this job",
    "abort": "worker exited with signal 6 (SIGABRT) while running this job",
    "c_exit": "worker exited with code 7 while running this job",
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CRASHES))
def test_job_that_kills_its_worker_is_retried_alone_until_dead(dsn, start_engine, tmp_path, kind):
    """A job that kills its worker from C (issue 10 item 4's last part): its batch is rescued with a
    crash counted on each job, the claim hands each of them out alone, the neighbours complete on
    that solo attempt, and the killer dies again alone and ends dead as WorkerCrashed."""
    _enqueue_cases(dsn, [kind])
    timed = tmp_path / "timed.txt"
    engine = start_engine(dsn, _config(7), "--workers", "1", "--flows", "bad", "--drain",
                          env={"SKIPLOCK_TEST_TIMED": str(timed)})
    assert engine.wait(60) == 0, tail(engine)
    assert len(log_has(engine, "worker died")) == 2, "the first attempt in the batch, the second alone"
    (dead,) = rows(dsn, "SELECT payload->>'bad', error_type, error_message, attempts, crashes, errors "
                        "FROM skiplock.jobs WHERE status = 'dead'")
    assert dead[:5] == (kind, "WorkerCrashed", CRASHES[kind], 2, 2), dead
    assert [e["type"] for e in dead[5]] == ["WorkerLost", "WorkerCrashed"]
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs WHERE status <> 'dead'") == 0
    # The neighbours: the batch's crash used their first attempt; each then ran alone and completed.
    assert rows(dsn, "SELECT count(*), min(attempts), max(attempts) FROM skiplock.jobs_done") == [(6, 2, 2)]
    # Alone means alone: the second crash took no neighbour with it (each carries the first only).
    assert rows(dsn, "SELECT DISTINCT jsonb_path_query_array(errors, '$[*].type')::text FROM skiplock.jobs_done") \
        == [('["WorkerLost"]',)]
