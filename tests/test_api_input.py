"""Hostile input through the Python API: the project's own error type with one line naming the
parameter, before anything reaches the database, which is left unchanged (issue 11 items 4-6)."""

from __future__ import annotations

import pytest

from support.postgres import register_flows_for, scalar
from engine.errors import ValidationError
from engine.queue import DeadLetterFilter, Queue


@pytest.fixture(autouse=True)
def registered_flows(request: pytest.FixtureRequest) -> None:
    """The flow these tests enqueue to, registered as an engine would (enqueue refuses unknown flows)."""
    register_flows_for(request, "emails")


def jobs(dsn: str) -> int:
    return int(scalar(dsn, "SELECT count(*) FROM skiplock.jobs"))


@pytest.mark.parametrize(("call", "message"), [
    (lambda q: q.enqueue("emails", {}, run_id="night\udcff"), "run id is not valid UTF-8 text (byte 0xff at position 5)"),
    (lambda q: q.enqueue_many("emails", [{}], dedupe_keys=["k\ud800"]),
     "item 0: dedupe key is not valid UTF-8 text (lone surrogate U+D800 at position 1)"),
    (lambda q: q.dead_letters(DeadLetterFilter(error_type="E\udcfe")),
     "error type is not valid UTF-8 text (byte 0xfe at position 1)"),
    (lambda q: q.dead_letters(DeadLetterFilter(error_type="\x00")),  # found by tests/test_fuzz.py
     "error type '\\x00' must not contain control characters"),
    (lambda q: q.pause("noop\n"), "flow name 'noop\\n' is invalid"),
    (lambda q: q.enqueue("noop\n", {}), "flow name 'noop\\n' is invalid"),
    (lambda q: q.enqueue("emails", {}, max_attempts=2**31), "max_attempts 2147483648 must be an integer from 1 to"),
    (lambda q: q.enqueue("emails", {}, delay=99999999999 * 86400.0), "delay 8639999999913600.0 must be a number of seconds from 0 to 3153600000"),
    (lambda q: q.enqueue("emails", {}, delay=float("nan")), "delay nan must be a number of seconds"),
    (lambda q: q.retry_dead(DeadLetterFilter(ids=[10**20])), "job id 100000000000000000000 must be an integer"),
    (lambda q: q.job(10**20), "job id 100000000000000000000 must be an integer"),
    (lambda q: q.dead_letters(limit=-1), "limit -1 must be an integer from 0 to 2147483647"),
    (lambda q: q.purge_completed(60.0, slice_size=0), "slice_size 0 must be an integer from 1 to 2147483647"),
    (lambda q: q.purge_completed(36500000 * 86400.0), "retention 3153600000000.0 must be a number of seconds"),
])
def test_api_refuses(queue: Queue, dsn: str, call, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        call(queue)
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)
    assert jobs(dsn) == 0


def test_dsn_with_a_lone_surrogate() -> None:
    with pytest.raises(ValidationError, match=r"the DSN is not valid UTF-8 text \(byte 0xff at position 6\)"):
        Queue("host=x\udcff")
