"""Claim cost of flow control (issue 15 items 4-5) as ratios to the plain claim in the same run.

One process claims B=100 and acks each batch (one statement each, autocommit) until the flow is
empty; only the claim calls are timed. Three flows on one database, drained in interleaved rounds so
they see the same machine:
- plain: claim_batch, what every flow without limits sends;
- rated: claim_rated with a rate that never binds (the cost of the bucket row, not of waiting);
- keyed: claim_keyed, 10,000 distinct keys (smoke: 2,000) in the payload, concurrency_per_key = 1; one
  job per key is already running (held by another claimer) for a tenth of the keys, so the pick skips blocked
  keys as in production.
Figures: microseconds per claim (and per job) and the ratio to plain (lower is better).
"""

from __future__ import annotations

import time

import psycopg

from bench.conftest import Target, figure, record, size
from engine import db, store
from engine.queue import Queue

KEYS = size(10_000, 2_000)
JOBS = size(50_000, 4_000)  # five (smoke: two) jobs per key
BATCH = 100
ROUNDS = size(3, 1)
FAST = 1e6  # jobs per second: a rate limit that never binds


def _enqueue(dsn: str, flow: str, jobs: int, keyed: bool) -> None:
    with Queue(dsn) as q:
        payloads = [{"n": i, "customer": f"c{i % KEYS}"} if keyed else {"n": i} for i in range(jobs)]
        q.enqueue_many(flow, payloads, allow_unknown_flow=True)


def _block_keys(conn: psycopg.Connection, flow: str) -> None:
    """A tenth of the keys have a job running under another claimer: their other jobs are blocked."""
    with conn.transaction():
        ids = store.claim_keyed(conn, flow, "holder", KEYS // 10, store.new_claim_token(), 5,
                                key_field="customer", per_key=1)
    assert len(ids) == KEYS // 10


def _drain(conn: psycopg.Connection, kind: str, flow: str) -> tuple[float, int, int]:
    """(seconds spent in claims, claims, jobs) until nothing more can be claimed."""
    spent, claims, jobs = 0.0, 0, 0
    while True:
        token = store.new_claim_token()
        start = time.perf_counter()
        if kind == "plain":
            rows = store.claim_batch(conn, flow, "bench", BATCH, token)
        elif kind == "rated":
            rows = store.claim_rated(conn, flow, "bench", BATCH, token, 5, rate=FAST, burst=FAST)
        else:
            with conn.transaction():
                rows = store.claim_keyed(conn, flow, "bench", BATCH, token, 5, key_field="customer", per_key=1)
        spent += time.perf_counter() - start
        if not rows:
            return spent, claims, jobs
        claims += 1
        jobs += len(rows)
        ids = [r[0] for r in rows]
        store.ack_batch(conn, "bench", token, ids, [None] * len(ids))


def test_claim_cost_with_flow_control(benchmark, bench_dsn: str) -> None:
    def run() -> dict[str, list[tuple[float, int, int]]]:
        results: dict[str, list[tuple[float, int, int]]] = {"plain": [], "rated": [], "keyed": []}
        with db.connect(bench_dsn) as conn:
            for _ in range(ROUNDS):
                for kind in ("plain", "rated", "keyed"):
                    flow = f"fc_{kind}"
                    conn.execute("DELETE FROM skiplock.jobs WHERE flow = %s", (flow,))
                    _enqueue(bench_dsn, flow, JOBS, keyed=kind == "keyed")
                    conn.execute("VACUUM ANALYZE skiplock.jobs")
                    if kind == "rated":
                        store.rate_bucket_ensure(conn, flow, FAST)
                    if kind == "keyed":
                        _block_keys(conn, flow)
                    results[kind].append(_drain(conn, kind, flow))
        return results

    results = benchmark.pedantic(run, rounds=1, iterations=1)

    def per_claim(kind: str) -> float:  # best round, microseconds per claim
        return min(spent / claims * 1e6 for spent, claims, _ in results[kind] if claims)

    plain = per_claim("plain")
    figure("flow_control_claim", {kind: [{"seconds": s, "claims": c, "jobs": j} for s, c, j in rounds]
                                  for kind, rounds in results.items()})
    record(Target(f"claim B={BATCH}, plain (claim_batch)", plain, "us/claim"))
    record(Target(f"claim B={BATCH}, rate limit (claim_rated)", per_claim("rated"), "us/claim", "plain claim", plain))
    record(Target(f"claim B={BATCH}, per-key 1, {KEYS:,} keys (claim_keyed)", per_claim("keyed"), "us/claim",
                  "plain claim", plain))
    benchmark.extra_info.update({kind: per_claim(kind) for kind in results})
    for kind, rounds in results.items():
        # keyed: the blocked keys' jobs stay (the holder's own and the rest of those keys)
        expected = sum(1 for i in range(JOBS) if i % KEYS >= KEYS // 10) if kind == "keyed" else JOBS
        assert all(jobs == expected for _, _, jobs in rounds), (kind, rounds)
