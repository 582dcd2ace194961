"""Runs: firing a finished run's on-complete hook, once, from whichever process sees it first.

The acking worker claims the runs its ack finished and fires their hooks here; the supervisor's
rescue pass claims those a worker never got to (it died in between) with runs_claim_orphaned_hooks
and fires them on hook threads (engine/hooks.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import psycopg

from engine import store
from engine.store import RunSummary

RunHook = Callable[[str, dict[str, Any]], Any]


def claim_finished_runs(conn: psycopg.Connection[Any], run_ids: Iterable[str],
                        claimer: str | None = None) -> list[RunSummary]:
    """Claim each finished run; exactly one caller wins each. Safe to retry as a whole with the same
    `claimer` (store.run_claim_hook): the retry gets back the runs the lost try had claimed."""
    return [summary for summary in (store.run_claim_hook(conn, run_id, claimer) for run_id in run_ids)
            if summary is not None]


def fire_claimed(claimed: Iterable[RunSummary], hooks: Mapping[str, RunHook | None],
                 log: logging.Logger | logging.LoggerAdapter[Any],
                 on_finished: Callable[[RunSummary], None] | None = None) -> None:
    """Call each claimed run's flow hook (a run of a flow without one is skipped). `on_finished` sees
    each run before its hook (the worker sends run_finished there). A hook that raises is logged and
    does not stop the others. Kept apart from the claim so that a retried claim never fires twice."""
    for summary in claimed:
        if on_finished is not None:
            on_finished(summary)
        hook = hooks.get(summary.flow)
        if hook is None:
            continue
        try:
            hook(summary.run, summary.as_dict())
        except Exception:
            log.exception("on_complete hook of run %s failed", summary.run, extra={"run": summary.run})


def fire_run_hooks(
    conn: psycopg.Connection[Any],
    run_ids: Iterable[str],
    hooks: Mapping[str, RunHook | None],
    log: logging.Logger | logging.LoggerAdapter[Any],
    on_finished: Callable[[RunSummary], None] | None = None,
    claimer: str | None = None,
) -> list[RunSummary]:
    """claim_finished_runs, then fire_claimed. Returns the claimed runs."""
    claimed = claim_finished_runs(conn, run_ids, claimer)
    fire_claimed(claimed, hooks, log, on_finished)
    return claimed
