"""A console that stops reading must not pin PostgreSQL's NOTIFY queue (issue 10 item 8, its
second half; the busy worker's half is in tests/test_executors.py).

A LISTENing backend whose client does not read blocks in ClientWrite once the socket buffers are
full, and from then on the queue's tail cannot pass it: pg_notification_queue_usage() grows for
every channel until NOTIFY (the enqueue trigger, the rescue, the ticks) fails. The console's feed is
stopped here with SIGSTOP (a console suspended by Ctrl-Z); the engine's rescue leader ends its
backend, the queue empties while the console is still stopped, and the console reconnects by itself
when it runs again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from support.engines import BASE, SUPPORT_DIR, log_has, tail, wait_for
from support.postgres import scalar
from engine.telemetry import CONSOLE_APPLICATION_NAME, EVENTS_CHANNEL

BURST = "SELECT pg_notify(%s, i::text || repeat('x', 7900)) FROM generate_series(1, 1000) i"  # ~8 MB


def _console_backends(dsn: str) -> int:
    return int(scalar(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                      (CONSOLE_APPLICATION_NAME,)))


@pytest.mark.slow
def test_a_console_that_stops_reading_does_not_pin_the_notify_queue(dsn, start_engine):
    engine = start_engine(dsn, BASE + '[flows.noop]\nhandler = "engine.flows.builtin:noop"\n',
                          "--workers", "1", "--flows", "noop")
    env = {**os.environ, "PYTHONPATH": f"{SUPPORT_DIR.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    console = subprocess.Popen([sys.executable, "-m", "support.feed_child", dsn], stdout=subprocess.PIPE, env=env)
    try:
        assert console.stdout is not None and console.stdout.readline().strip() == b"connected"
        console.send_signal(signal.SIGSTOP)
        peak = 0.0
        deadline = time.monotonic() + 30
        # Keep notifying (as a busy fleet does) until the leader has ended the stalled backend.
        while not log_has(engine, "ended console connections that stopped reading"):
            assert time.monotonic() < deadline, tail(engine)
            scalar(dsn, BURST, (EVENTS_CHANNEL,))
            peak = max(peak, float(scalar(dsn, "SELECT pg_notification_queue_usage()")))
            time.sleep(0.2)
        assert peak > 0, "the stopped console's backend pinned the queue (the fault this test injects)"
        wait_for(lambda: float(scalar(dsn, "SELECT pg_notification_queue_usage()")) == 0.0, 10,
                 message="the NOTIFY queue to empty while the console is still stopped")
        assert _console_backends(dsn) == 0
        console.send_signal(signal.SIGCONT)
        assert console.stdout.readline().strip() == b"connected", "the console reconnects by itself"
        wait_for(lambda: _console_backends(dsn) == 1, 10, message="the console's new LISTEN connection")
    finally:
        console.send_signal(signal.SIGCONT)
        console.kill()
        console.wait(10)
    assert engine.process.poll() is None, tail(engine)
