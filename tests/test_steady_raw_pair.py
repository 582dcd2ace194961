"""The steady bench's raw pair fails a step at once when a child dies without its result."""

import multiprocessing
import os
import time

import pytest

from bench.steady import _next_result


def test_a_dead_child_fails_the_step_with_its_exit_code():
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=os._exit, args=(3,))
    child.start()
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exit code 3"):
        _next_result(ctx.Queue(), [child], 600)
    assert time.monotonic() - started < 30
