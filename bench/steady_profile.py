"""Where a steady-state job's cost goes, engine against the raw pair, at one offered rate both sustain.

    python -m bench.steady_profile [--rate 3000] [--seconds 20] [--rounds 2] [--dsn DSN]
    python -m bench.steady_profile --ramp 7000,10000,14000,21000 --seconds 10

Without --dsn it starts its own PostgreSQL (default durability) with pg_stat_statements loaded. Each
round runs the raw pair, then the engine (2 workers, batch 500, the steady flow of test_steady.py),
each on a fresh database, and prints per completed job: WAL bytes by resource manager
(pg_walinspect), heap and index tuple writes (pg_stat_user_tables), the server's CPU (every
postgres process, /proc), the clients' CPU (engine processes, producer), and the statements that
took the server's time (pg_stat_statements). These figures do not move with the machine's load;
the rates beside them do.

--ramp runs steady steps instead (bench/steady.py's), the raw pair and the engine in turn at each
offered rate, so a change of load hits both sides alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg

from bench.conftest import new_database
from bench.steady import RawPair, engine_step
from bench.workloads import STAMP, Engine

EXTENSIONS = "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; CREATE EXTENSION IF NOT EXISTS pg_walinspect"
WAL_STATS = """
SELECT "resource_manager/record_type", count, combined_size, fpi_size FROM pg_get_wal_stats(%s::pg_lsn, pg_current_wal_lsn())
WHERE count > 0 ORDER BY combined_size DESC
"""
TUPLES = """
SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del FROM pg_stat_user_tables
WHERE n_tup_ins + n_tup_upd + n_tup_del > 0 ORDER BY relname
"""
STATEMENTS = """
SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 70), calls, rows, total_exec_time, wal_bytes::bigint
FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY total_exec_time DESC LIMIT 8
"""


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def _postgres_pids(postmaster: int | None) -> list[int]:
    if postmaster is None:  # --dsn without --postmaster: no server CPU
        return []
    proc = psutil.Process(postmaster)
    return [postmaster, *(c.pid for c in proc.children(recursive=True))]


ACTIVITY = """
SELECT pid, CASE WHEN backend_type <> 'client backend' THEN backend_type
                 WHEN application_name LIKE '%%-supervisor' THEN 'supervisor'
                 WHEN application_name LIKE '%%-load' OR query LIKE 'COPY bench_raw_jobs%%' THEN 'producer'
                 WHEN application_name LIKE 'skiplock-bench%%' OR query LIKE 'SELECT%%pg_get_wal_stats%%' THEN 'bench'
                 WHEN application_name LIKE '%%-pool' OR application_name LIKE 'skiplock%%' THEN 'workers'
                 WHEN query LIKE '%%bench_raw_jobs%%' THEN 'consumers'
                 ELSE 'other' END
FROM pg_stat_activity
"""


class Sampler(threading.Thread):
    """CPU seconds of every postgres process (labelled by what it serves) and of this process's
    children (the engine, the producer, the raw pair), sampled every 0.2 s: processes that exit
    before the step ends keep their last sample."""

    def __init__(self, dsn: str, postmaster: int | None, engine: int | None) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.postmaster = postmaster
        self.engine = engine
        self.stop = threading.Event()
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.labels: dict[int, str] = {}
        self.sample()

    def sample(self) -> None:
        labels = dict(self.conn.execute(ACTIVITY).fetchall())
        server = _postgres_pids(self.postmaster)
        engine = set()
        if self.engine is not None:
            try:
                engine = {self.engine, *(c.pid for c in psutil.Process(self.engine).children(recursive=True))}
            except psutil.NoSuchProcess:
                pass
        clients = [c.pid for c in psutil.Process().children(recursive=True)]
        for pid in [*server, *clients]:
            cpu = _cpu([pid]) if pid != self.postmaster else psutil.Process(pid).cpu_times().user  # not its children's
            if pid in server:
                label = "server " + labels.get(pid, "postmaster" if pid == self.postmaster else self.labels.get(pid, "other")).replace("skiplock-", "")
            else:
                label = "client " + ("engine" if pid in engine else "bench processes")
            if label.endswith("other") and pid in self.labels:
                label = self.labels[pid]
            self.labels[pid] = label
            self.first.setdefault(pid, cpu if not self.last else 0.0)
            self.last[pid] = cpu

    def run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                self.sample()
            except (psutil.Error, psycopg.Error):
                pass

    def finish(self) -> dict[str, float]:
        self.stop.set()
        self.join()
        self.sample()
        self.conn.close()
        out: dict[str, float] = {}
        for pid, cpu in self.last.items():
            out[self.labels[pid]] = out.get(self.labels[pid], 0.0) + cpu - self.first[pid]
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


class Probe:
    """Counters of one database around one step."""

    def __init__(self, dsn: str, postmaster: int | None, engine: int | None) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.dsn = dsn
        self.postmaster = postmaster
        self.engine = engine
        self.conn.execute(EXTENSIONS)

    def start(self) -> None:
        self.conn.execute("SELECT pg_stat_statements_reset(), pg_stat_reset()")
        self.lsn = self.conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        self.sampler = Sampler(self.dsn, self.postmaster, self.engine)
        self.sampler.start()

    def end(self, completed: int) -> dict[str, Any]:
        cpu = self.sampler.finish()
        server_cpu = sum(v for k, v in cpu.items() if k.startswith("server"))
        client_cpu = sum(v for k, v in cpu.items() if k.startswith("client"))
        time.sleep(1.2)  # backends flush their table statistics at most once a second
        n = max(completed, 1)
        wal = [(rm, count / n, size / n, fpi / n) for rm, count, size, fpi in self.conn.execute(WAL_STATS, (self.lsn,))]
        tuples = [(name, ins / n, upd / n, hot / n, dele / n) for name, ins, upd, hot, dele in self.conn.execute(TUPLES)]
        statements = [(q, calls, rows, ms * 1000 / n, wal_bytes / n)
                      for q, calls, rows, ms, wal_bytes in self.conn.execute(STATEMENTS)]
        return {"completed": completed, "wal_per_job": sum(s for _, _, s, _ in wal), "wal": wal, "tuples": tuples,
                "server_cpu_us_per_job": server_cpu * 1e6 / n, "client_cpu_us_per_job": client_cpu * 1e6 / n,
                "statements": statements,
                "cpu_us_per_job": {k: v * 1e6 / n for k, v in cpu.items()}}

    def close(self) -> None:
        self.conn.close()


def show(name: str, rate: float, figures: dict[str, Any]) -> None:
    print(f"\n== {name}: {figures['completed']} jobs, {figures['achieved']:.0f} j/s of {rate:.0f} offered, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"   WAL {figures['wal_per_job']:.0f} B/job; server CPU {figures['server_cpu_us_per_job']:.0f} us/job; "
          f"clients {figures['client_cpu_us_per_job']:.0f} us/job")
    print("   cpu " + ", ".join(f"{k} {v:.0f}" for k, v in figures["cpu_us_per_job"].items() if v >= 0.5))
    for rm, count, size, fpi in figures["wal"][:8]:
        print(f"   wal {rm:12} {count:6.2f} rec/job {size:7.1f} B/job (fpi {fpi:.1f})")
    for rel, ins, upd, hot, dele in figures["tuples"]:
        print(f"   tuples {rel:22} ins {ins:.2f} upd {upd:.2f} (hot {hot:.2f}) del {dele:.2f}")
    for q, calls, rows, us, wal in figures["statements"]:
        print(f"   {us:7.1f} us/job {wal:6.0f} B/job {calls:6} calls {rows:8} rows  {q}")


def run(server: str, postmaster: int, rate: float, seconds: float, rounds: int, workdir: Path) -> list[dict[str, Any]]:
    out = []
    for r in range(rounds):
        raw_dsn = new_database(server)
        raw = RawPair(raw_dsn)
        probe = Probe(raw_dsn, postmaster, None)
        probe.start()
        step = raw.step(rate, seconds)
        figures = probe.end(step.completed) | {"achieved": step.achieved, "sustained": step.sustained}
        probe.close()
        show(f"raw pair round {r}", rate, figures)
        out.append({"side": "raw", "round": r, **figures})

        dsn = new_database(server)
        flows = {"steady": {"handler": STAMP, "batch_size": 500}}
        with Engine(dsn, workdir, 2, flows, name=f"profile-{r}") as engine:
            engine.queue.resume("steady")
            assert engine.process is not None
            probe = Probe(dsn, postmaster, engine.process.pid)
            probe.start()
            step = engine_step(engine, "steady", rate, seconds)
            figures = probe.end(step.completed) | {"achieved": step.achieved, "sustained": step.sustained}
            probe.close()
        show(f"engine round {r}", rate, figures)
        out.append({"side": "engine", "round": r, **figures})
    return out


def ramp_interleaved(server: str, rates: list[float], seconds: float, workdir: Path) -> list[dict[str, Any]]:
    """The raw pair and the engine at the same offered rates, a step of each in turn (so both see the
    same machine), until each side has failed two steps."""
    raw = RawPair(new_database(server))
    failed = {"raw": 0, "engine": 0}
    out: list[dict[str, Any]] = []
    flows = {"steady": {"handler": STAMP, "batch_size": 500}}
    with Engine(new_database(server), workdir, 2, flows, name="ramp") as engine:
        engine.queue.resume("steady")
        for rate in rates:
            for side in ("raw", "engine"):
                if failed[side] >= 2:
                    continue
                load = os.getloadavg()[0]
                s = raw.step(rate, seconds) if side == "raw" else engine_step(engine, "steady", rate, seconds)
                failed[side] += 0 if s.sustained else 1
                print(f"{side:6} offered {rate:7.0f} completed {s.achieved:7.0f}/s sustained {s.sustained!s:5} "
                      f"shed {s.shed:6} backlog {s.backlog_end:6} WAL {s.wal_per_job:5.0f} B/job load {load:.1f}",
                      flush=True)
                out.append({"side": side, "load": load, **s.to_dict()})
    best = {side: max([o["rate"] for o in out if o["side"] == side and o["sustained"]] or [0.0])
            for side in ("raw", "engine")}
    print(f"best sustained: raw {best['raw']:.0f}, engine {best['engine']:.0f} j/s"
          + (f" ({best['engine'] / best['raw']:.0%})" if best["raw"] else ""))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.steady_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=3000.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dsn", help="a server with pg_stat_statements in shared_preload_libraries (superuser)")
    parser.add_argument("--postmaster", type=int, help="with --dsn: the server's postmaster pid, for its CPU")
    parser.add_argument("--ramp", metavar="RATES", help="instead: interleaved steady steps of both sides at "
                        "these offered rates (comma-separated j/s), --seconds each")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--explain", metavar="LOG", help="log sampled plans (auto_explain: ANALYZE, BUFFERS, WAL) "
                        "of the engine's statements and copy the server's log here")
    args = parser.parse_args(argv)
    from engine.embedded import EmbeddedPostgres, make_temp_dir

    workdir = make_temp_dir("skiplock-profile-")
    server = None
    try:
        if args.dsn:
            dsn, postmaster = args.dsn, args.postmaster
        else:
            settings = {"max_connections": "300", "shared_preload_libraries": "pg_stat_statements",
                        "track_io_timing": "on"}
            if args.explain:
                settings.update({"session_preload_libraries": "auto_explain", "auto_explain.log_min_duration": "0",
                                 "auto_explain.log_analyze": "on", "auto_explain.log_buffers": "on",
                                 "auto_explain.log_wal": "on", "auto_explain.sample_rate": "0.01"})
            server = EmbeddedPostgres(workdir / "data", settings=settings).start()
            dsn = server.dsn("postgres")
            assert server.process is not None
            postmaster = server.process.pid
        if args.ramp:
            figures = ramp_interleaved(dsn, [float(r) for r in args.ramp.split(",")], args.seconds, workdir)
        else:
            figures = run(dsn, postmaster, args.rate, args.seconds, args.rounds, workdir)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1, default=str))
    finally:
        if server is not None:
            server.stop()
            if args.explain:
                shutil.copy(workdir / "data.log", args.explain)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
