"""Jobs: the job browser, any state (pending, scheduled, running, dead, completed, cancelled).

The `/` line narrows what is read (flow:, status:a,b, run:, age:>D, payload.KEY:VALUE go to SQL
through `Queue.list_jobs`, one bounded, index-backed statement per state); free text and age:< are
applied to the rows read. Bulk actions work on the rows listed, each guarded by status in SQL: cancel
the pending and scheduled ones, retry the dead ones, purge the dead and cancelled ones. Each asks for
confirmation and is not offered in read-only mode.
"""

from __future__ import annotations

import orjson
from rich.text import Text

from console import format as fmt
from console.data import JobsPage
from console.messages import CancelJobs, CancelRunning, LoadJobs, PurgeCancelled, PurgeJobs, RetryJobs
from console.screens.base import WriteBinding
from console.screens.listing import PagedScreen, Row
from engine.queue import LIST_STATUSES, JobFilter, JobSummary

COLUMNS = (("id", "Job"), ("flow", "Flow"), ("status", "Status"), ("attempts", "Attempts"), ("run", "Run"),
           ("since", "Since"), ("error", "Error"), ("payload", "Payload"))
WAITING = ("pending", "scheduled")
STATUS_STYLE = {"pending": "", "scheduled": "dim", "running": "bold", "dead": "bold red", "completed": "green",
                "cancelled": "yellow"}


class JobsScreen(PagedScreen[JobsPage, JobSummary]):
    NAME = "Jobs"
    TABLES = (("jobs", COLUMNS),)
    REDRAW_ON = frozenset({"all", "jobs"})
    EMPTY = "none: no job is pending, scheduled, running or dead, and none ended in the last 24 h"
    FILTER_HINT = "flow:NAME status:dead,pending run:ID age:>1h payload.KEY:VALUE  free text"
    BINDINGS = [
        WriteBinding("c", "cancel_one", "Cancel job", id="skiplock.jobs.cancel"),
        WriteBinding("C", "cancel_matching", "Cancel pending shown", id="skiplock.jobs.cancel_matching"),
        WriteBinding("R", "retry_dead_matching", "Retry dead shown", id="skiplock.jobs.retry_dead"),
        WriteBinding("X", "purge_matching", "Purge dead/cancelled shown", id="skiplock.jobs.purge"),
    ]

    # -- data -------------------------------------------------------------------------------------------

    def where(self) -> JobFilter | None:
        """The part of the filter SQL applies; None (and a notice) when status: names no job state."""
        statuses = None
        if self.filter.status:
            statuses = [s.strip() for s in self.filter.status.split(",") if s.strip()]
            wrong = [s for s in statuses if s not in LIST_STATUSES]
            if wrong:
                self.error = f"status: {', '.join(wrong)} is not a job state ({', '.join(LIST_STATUSES)})"
                return None
        payload = {}
        for key, text in self.filter.payload:
            try:
                payload[key] = orjson.loads(text)
            except orjson.JSONDecodeError:
                payload[key] = text
        return JobFilter(flow=self.filter.flow, statuses=statuses, run_id=self.filter.run,
                         older_than=self.filter.older_than, payload=payload or None)

    def load(self) -> LoadJobs | None:
        where = self.where()
        return LoadJobs(where) if where is not None else None

    def filter_changed(self) -> None:
        self.error = None
        self.reload()

    def items(self, page: JobsPage) -> list[JobSummary]:
        return page.jobs

    def key_of(self, item: JobSummary) -> str:
        return str(item.id)

    def matches(self, item: JobSummary) -> bool:
        wanted = self.filter
        if wanted.newer_than is not None:
            moment = _moment(item)
            assert self.page is not None
            if not wanted.matches_age(self.page.now - moment if moment is not None else None):
                return False
        return wanted.matches_text(item.id, item.flow, item.status, item.run_id, item.error_type, item.error_message,
                                   orjson.dumps(item.payload).decode())

    def job_of(self, key: str) -> int | None:
        return int(key)

    # -- drawing ------------------------------------------------------------------------------------------

    def rows(self, page: JobsPage, shown: list[JobSummary]) -> list[Row]:
        tz = self.console.tz
        rows: list[Row] = []
        for job in shown:
            status = Text(job.status, style=STATUS_STYLE.get(job.status, ""))
            if job.cancel_requested_at is not None:
                status.append(" (cancel requested)", style="yellow")
            moment = _moment(job)
            rows.append((str(job.id), [
                str(job.id), job.flow, status, f"{job.attempts} of {job.max_attempts}", job.run_id or "",
                fmt.stamp(moment, tz) if moment is not None else "",
                fmt.clip(job.error_message, 40), fmt.clip(orjson.dumps(job.payload).decode(), 40),
            ]))
        return rows

    def summary(self, page: JobsPage, shown: list[JobSummary]) -> Text:
        counts: dict[str, int] = {}
        for job in shown:
            counts[job.status] = counts.get(job.status, 0) + 1
        more = " (list limit; narrow the filter)" if len(page.jobs) >= page.limit else ""
        summary = Text().append(f"{len(shown):,} shown{more}", style="dim")
        if counts:
            summary.append("  " + "  ".join(f"{s} {counts[s]:,}" for s in LIST_STATUSES if s in counts), style="dim")
        summary.append("  completed/cancelled: last 24 h", style="dim")
        return summary

    # -- actions ------------------------------------------------------------------------------------------

    def _ids(self, *statuses: str) -> list[int]:
        return [j.id for j in self.visible() if j.status in statuses]

    def action_cancel_one(self) -> None:
        job = self.current()
        if job is not None and job.status == "running" and job.cancel_requested_at is None:
            self.confirm("Cancel running job", f"Cancel job {job.id} ({job.flow}), running on {job.claimed_by}?\n"
                          "Its worker stops it (cancel_grace) and it ends cancelled, never retried.", "Cancel job",
                          lambda: self.ask(CancelRunning([job.id])))
            return
        if job is None or job.status not in WAITING:
            self.notify("only a pending, scheduled or running job can be cancelled", severity="warning")
            return
        self.confirm("Cancel job", f"Cancel job {job.id} ({job.flow}, {job.status})?\nIt will never run.",
                      "Cancel job", lambda: self.ask(CancelJobs([job.id])))

    def action_cancel_matching(self) -> None:
        ids = self._ids(*WAITING)
        if not ids:
            self.notify("no pending or scheduled job shown", severity="warning")
            return
        self.confirm("Cancel pending jobs", f"Cancel the {len(ids)} pending or scheduled job(s) shown?\n"
                      f"Jobs: {fmt.id_list(ids)}\nThey will never run.", "Cancel jobs",
                      lambda: self.ask(CancelJobs(ids)))

    def action_retry_dead_matching(self) -> None:
        ids = self._ids("dead")
        if not ids:
            self.notify("no dead job shown", severity="warning")
            return
        self.confirm("Retry dead jobs", f"Retry the {len(ids)} dead job(s) shown?\nJobs: {fmt.id_list(ids)}",
                      "Retry", lambda: self.ask(RetryJobs(ids)))

    def action_purge_matching(self) -> None:
        dead, cancelled = self._ids("dead"), self._ids("cancelled")
        if not dead and not cancelled:
            self.notify("no dead or cancelled job shown", severity="warning")
            return

        def purge() -> None:
            if dead:
                self.ask(PurgeJobs(dead))
            if cancelled:
                self.ask(PurgeCancelled(cancelled))

        self.confirm("Purge jobs", f"Delete {len(dead)} dead and {len(cancelled)} cancelled job(s) shown for good?\n"
                      f"Jobs: {fmt.id_list(dead + cancelled)}", "Purge", purge)


def _moment(job: JobSummary) -> float | None:
    """When the job entered its state: due (pending, scheduled), claimed (running), ended (others)."""
    when = {"pending": job.run_at, "scheduled": job.run_at, "running": job.claimed_at}.get(job.status, job.finished_at)
    return when.timestamp() if when is not None else None
