"""Fast start and stop (issue 12 item 7): `engine run --drain` on an empty queue exits in under 0.4 s,
and an idle engine exits on SIGTERM in under 0.3 s.

Each figure is the median of RUNS runs (the best and the worst beside it: the machine is shared, so
the best shows what the code costs and the median what a run meets). A 2-worker engine, one no-op
flow, a database of its own with nothing queued. The empty drain runs from the spawn of `python -m
engine.cli run --drain` to its exit (interpreter start and imports count); the SIGTERM stop from the
signal to the exit, once every worker registered and the supervisor LISTENs (bench/workloads.py's
readiness), after a second of idling.

The empty drain is timed twice, interleaved: as the environment runs it, and with the bytecode of
every module cached, as an installed package has it. Where PYTHONDONTWRITEBYTECODE is set (this
machine), a source tree's modules are compiled on every start: about 0.12 s of the engine's own.
"""

from __future__ import annotations

import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from bench.conftest import REPORT, Target, record, size
from bench.workloads import NOOP, REPO, Engine, _die_with_parent, _toml_flow

RUNS = size(10, 3)
WORKERS = 2
IDLE_S = 1.0


def _env(dsn: str, repo: Path, bytecode_cache: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKIPLOCK_")}
    env.update({"SKIPLOCK_DSN": dsn, "PYTHONPATH": str(repo)})
    if bytecode_cache is not None:  # written by the first run, read by the next ones
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(bytecode_cache)
    return env


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def empty_drain_seconds(dsn: str, workdir: Path, repo: Path = REPO,
                        bytecode_cache: Path | None = None) -> tuple[float, float]:
    """One `engine run --drain` on a queue with nothing in it: seconds from spawn to exit, and the CPU
    seconds of the engine and its workers (load-independent, unlike the first)."""
    config = workdir / "empty-drain.toml"
    config.write_text("[global]\nlog_format = \"json\"\n\n" + _toml_flow("noop", {"handler": NOOP}) + "\n")
    log_path = workdir / "empty-drain.log"
    with open(log_path, "wb") as log:
        cpu = _children_cpu()
        started = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", "engine.cli", "run", "--config", str(config), "--workers",
                                str(WORKERS), "--flows", "noop", "--drain"], stdout=log, stderr=subprocess.STDOUT,
                               env=_env(dsn, repo, bytecode_cache), cwd=repo, preexec_fn=_die_with_parent)
        elapsed = time.perf_counter() - started
        cpu = _children_cpu() - cpu
    if code != 0:
        raise AssertionError(f"empty drain exited {code}: see {log_path}")
    return elapsed, cpu


def sigterm_stop_seconds(dsn: str, workdir: Path, repo: Path = REPO) -> float:
    """An idle engine, ready and idling for IDLE_S: SIGTERM to exit."""
    engine = Engine(dsn, workdir, WORKERS, {"idle": {"handler": NOOP}}, name="idle-stop")
    engine.start()  # waits until every worker registered and the supervisor LISTENs
    assert engine.process is not None and engine.conn is not None
    try:
        time.sleep(IDLE_S)
        started = time.perf_counter()
        engine.process.send_signal(signal.SIGTERM)
        code = engine.process.wait(60)
        elapsed = time.perf_counter() - started
    finally:
        engine.conn.close()
        engine.conn = None
        if engine.process.poll() is None:
            engine.process.kill()
            engine.process.wait()
    if code != 0:
        raise AssertionError(f"idle engine exited {code} on SIGTERM: see {engine.log_path}")
    return elapsed


def _summary(seconds: list[float]) -> dict[str, float | list[float]]:
    return {"median": statistics.median(seconds), "best": min(seconds), "max": max(seconds), "runs": seconds}


def test_empty_drain_and_idle_sigterm(benchmark, bench_dsn: str, workdir: Path) -> None:
    with psycopg.connect(bench_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO skiplock.flows (name) VALUES ('noop'), ('idle') ON CONFLICT DO NOTHING")

    bytecode_cache = workdir / "bytecode"
    empty_drain_seconds(bench_dsn, workdir, bytecode_cache=bytecode_cache)  # fills the cache, not timed

    def run() -> tuple[list[float], list[float], list[float], list[float]]:
        drains, cpus, cached, stops = [], [], [], []
        for _ in range(RUNS):  # interleaved, so the load of the moment hits all three
            seconds, cpu = empty_drain_seconds(bench_dsn, workdir)
            drains.append(seconds)
            cpus.append(cpu)
            cached.append(empty_drain_seconds(bench_dsn, workdir, bytecode_cache=bytecode_cache)[0])
            stops.append(sigterm_stop_seconds(bench_dsn, workdir))
        return drains, cpus, cached, stops

    load = os.getloadavg()[0]
    drains, cpus, cached, stops = benchmark.pedantic(run, rounds=1, iterations=1)
    figures = {"empty_drain": _summary(drains), "empty_drain_cpu": _summary(cpus),
               "empty_drain_bytecode_cached": _summary(cached), "idle_sigterm": _summary(stops),
               "workers": WORKERS, "loadavg": [load, os.getloadavg()[0]]}
    REPORT.figures["startup"] = figures
    for key, label, goal in (("empty_drain", "engine run --drain, empty queue, spawn to exit", 0.4),
                             ("idle_sigterm", "idle engine, SIGTERM to exit", 0.3)):
        f = figures[key]
        record(Target(f"{label} (median of {len(drains)})", f["median"], "s", goal=goal, lower_is_better=True))
        record(Target(f"  best / worst: {f['best']:.3f} / {f['max']:.3f} s", f["best"], "s"))
    record(Target("  empty drain, CPU of the engine's processes (median)", figures["empty_drain_cpu"]["median"], "s"))
    record(Target("  empty drain, bytecode cached as installed (median)",
                  figures["empty_drain_bytecode_cached"]["median"], "s"))
