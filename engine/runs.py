"""Runs: firing a finished run's on-complete hook, once, from whichever process sees it first.

The acking worker fires the hooks of the runs its ack finished; the supervisor's rescue pass fires
those the worker never got to (it died in between). Both go through `fire_run_hooks`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import psycopg

from engine import store
from engine.store import RunSummary

RunHook = Callable[[str, dict[str, Any]], Any]


def fire_run_hooks(
    conn: psycopg.Connection[Any],
    run_ids: Iterable[str],
    hooks: Mapping[str, RunHook | None],
    log: logging.Logger | logging.LoggerAdapter[Any],
    on_finished: Callable[[RunSummary], None] | None = None,
    claimer: str | None = None,
) -> list[RunSummary]:
    """Claim each finished run (exactly one caller wins it) and call its flow's hook.

    `hooks` maps a flow name to its on_complete callable; a run of a flow without one is still
    claimed. `on_finished` sees each claimed run before its hook (the worker sends run_finished
    there). A hook that raises is logged and does not stop the others. Returns the claimed runs.
    `claimer` (store.run_claim_hook): give the same one when retrying after a lost connection.
    """
    claimed: list[RunSummary] = []
    for run_id in run_ids:
        summary = store.run_claim_hook(conn, run_id, claimer)
        if summary is None:
            continue
        claimed.append(summary)
        if on_finished is not None:
            on_finished(summary)
        hook = hooks.get(summary.flow)
        if hook is None:
            continue
        try:
            hook(run_id, summary.as_dict())
        except Exception:
            log.exception("on_complete hook of run %s failed", run_id, extra={"run": run_id})
    return claimed
