"""A stop signal that arrives while the supervisor forks a worker is not lost.

Two windows, each hit on purpose from inside the real `engine run` (wrappers around
EngineLiveness.spawned, which runs between a worker's fork and its slot taking the process, and
around the worker's entry point):
- the supervisor's SIGTERM handler runs while a worker is being forked, so it cannot see that worker
  yet (seen in CI: the engine then waited out the grace period and exited 5 instead of 0);
- a worker gets SIGTERM right after its fork, before its own handler is in (it inherited the
  supervisor's, and ran on as if never told).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.cli import base_env
from tests.support.engines import EngineProcess, log_has, tail, wait_for

REPO = Path(__file__).resolve().parents[1]

# argv[1]: "supervisor" (SIGTERM to the supervisor itself while slot 1 is being forked) or "worker"
# (the first worker sends itself SIGTERM as the first thing it does after the fork, before its own
# handler is in); the rest is `engine`'s command line.
RACE = """
import os, signal, sys
import engine.worker
from engine import liveness
target, calls = sys.argv.pop(1), [0]
real_spawned, real_main = liveness.EngineLiveness.spawned, engine.worker.worker_main
def spawned(self, index, worker_id, pid):
    calls[0] += 1
    if target == "supervisor" and calls[0] == 2:
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, before the slot holds this worker
    return real_spawned(self, index, worker_id, pid)
def worker_main(spec, log_format):
    if target == "worker" and spec.worker_id.endswith(":0.1"):
        os.kill(os.getpid(), signal.SIGTERM)
    return real_main(spec, log_format)
liveness.EngineLiveness.spawned, engine.worker.worker_main = spawned, worker_main
from engine.cli import main
main(sys.argv[1:])
"""

CONFIG = """
[global]
log_format = "json"
grace_period = 3

[flows.quick]
handler = "engine.flows.builtin:noop"
"""


def start(dsn: str, tmp_path: Path, target: str, workers: int) -> EngineProcess:
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    log_path = tmp_path / "engine.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-c", RACE, target, "run", "--config", str(config),
                                    "--workers", str(workers)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                   env=base_env(SKIPLOCK_DSN=dsn))
    return EngineProcess(process, log_path)


def stopped_workers(engine: EngineProcess) -> set[str]:
    return {r["worker"] for r in log_has(engine, "worker stopped", reason="signal")}


def test_sigterm_while_a_worker_is_forked_stops_that_worker_too(dsn: str, tmp_path: Path) -> None:
    engine = start(dsn, tmp_path, "supervisor", 2)
    started = time.monotonic()
    code = engine.wait(60)
    elapsed = time.monotonic() - started
    assert code == 0, tail(engine)  # was 5: the worker forked under the handler ran until the grace period killed it
    assert not log_has(engine, "did not stop within the grace period"), tail(engine)
    # Both first-generation workers drained on the signal.
    assert {w.rsplit(":", 1)[1] for w in stopped_workers(engine)} == {"0.1", "1.1"}, tail(engine)
    assert elapsed < 3, f"{elapsed:.1f}s: the stop waited for the grace period\n{tail(engine)}"


def test_sigterm_to_a_worker_before_its_handler_is_in_stops_it(dsn: str, tmp_path: Path) -> None:
    engine = start(dsn, tmp_path, "worker", 1)
    try:
        wait_for(lambda: any(w.endswith(":0.1") for w in stopped_workers(engine)), 10,
                 message="the first worker to stop on the SIGTERM sent right after its fork")
        # The worker's own handler took it: the supervisor's, inherited through the fork, would have
        # logged its "stopping:" line from the worker.
        assert not log_has(engine, "stopping:"), tail(engine)
    finally:
        engine.signal(signal.SIGTERM)
        code = engine.wait(30)
    assert code == 0, tail(engine)
