"""Jobs: the job browser, any state (pending, scheduled, running, dead, completed, cancelled).

The `/` line narrows what is read (flow:, status:a,b, run:, age:>D, payload.KEY:VALUE go to SQL
through `Queue.list_jobs`, one bounded, index-backed statement per state); free text and age:< are
applied to the rows read. Bulk actions work on the rows listed, each guarded by status in SQL: cancel
the pending and scheduled ones, retry the dead ones, purge the dead and cancelled ones. Each asks for
confirmation and is not offered in read-only mode.
"""

from __future__ import annotations

import time

import orjson
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from console import format as fmt
from console.messages import (ActionDone, CancelJobs, CancelRunning, JobsFailed, JobsLoaded, LoadJobs, OpenJob,
                              PurgeCancelled, PurgeJobs, RetryJobs)
from console.data import JobsPage
from console.screens.base import ConsoleScreen
from console.screens.modals import ConfirmScreen
from console.widgets.tables import Table, sync_rows
from engine.queue import LIST_STATUSES, JobFilter, JobSummary

COLUMNS = (("id", "Job"), ("flow", "Flow"), ("status", "Status"), ("attempts", "Attempts"), ("run", "Run"),
           ("since", "Since"), ("error", "Error"), ("payload", "Payload"))
WAITING = ("pending", "scheduled")
STATUS_STYLE = {"pending": "", "scheduled": "dim", "running": "bold", "dead": "bold red", "completed": "green",
                "cancelled": "yellow"}


class JobsScreen(ConsoleScreen):
    FILTER_HINT = "flow:NAME status:dead,pending run:ID age:>1h payload.KEY:VALUE  free text"
    BINDINGS = [
        Binding("c", "cancel_one", "Cancel job", id="skiplock.jobs.cancel"),
        Binding("C", "cancel_matching", "Cancel pending shown", id="skiplock.jobs.cancel_matching"),
        Binding("R", "retry_dead_matching", "Retry dead shown", id="skiplock.jobs.retry_dead"),
        Binding("X", "purge_matching", "Purge dead/cancelled shown", id="skiplock.jobs.purge"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.page: JobsPage | None = None
        self.error: str | None = None
        self.loaded_at = 0.0
        self._drawn: tuple[object, ...] | None = None

    def body(self) -> ComposeResult:
        yield Static("", id="jobs-title", classes="title")
        yield Table(id="jobs", cursor_type="row")

    def on_mount(self) -> None:
        self.query_one("#jobs", DataTable).add_columns(*[(label, key) for key, label in COLUMNS])
        self.query_one("#jobs", DataTable).focus()
        super().on_mount()
        self.reload()

    def on_screen_resume(self) -> None:
        super().on_screen_resume()
        if self.ready and time.monotonic() - self.loaded_at > self.console.refresh_interval:
            self.call_after_refresh(self.reload)

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

    def reload(self) -> None:
        where = self.where()
        if where is None:
            self.page = None
            self._drawn = None
            self.update_view({"all"})
            return
        self.ask(LoadJobs(where))

    def on_jobs_loaded(self, message: JobsLoaded) -> None:
        if message.page.where != self.where():
            return  # an older filter's answer arrived late
        self.page = message.page
        self.loaded_at = time.monotonic()
        self.error = None
        self.update_view({"all"})

    def on_jobs_failed(self, message: JobsFailed) -> None:
        if message.where == self.where():
            self.error = message.error
            self._drawn = None
            self.update_view({"all"})

    def on_action_done(self, message: ActionDone) -> None:
        self.reload()

    def filter_changed(self) -> None:
        self.error = None
        self.reload()

    def visible(self) -> list[JobSummary]:
        if self.page is None:
            return []
        wanted = self.filter
        shown = []
        for job in self.page.jobs:
            moment = _moment(job)
            age = self.page.now - moment if moment is not None else None
            if wanted.newer_than is not None and not wanted.matches_age(age):
                continue
            if not wanted.matches_text(job.id, job.flow, job.status, job.run_id, job.error_type, job.error_message,
                                       orjson.dumps(job.payload).decode()):
                continue
            shown.append(job)
        return shown

    # -- drawing ------------------------------------------------------------------------------------------

    def update_view(self, changed: set[str]) -> None:
        if not ({"all", "jobs"} & changed):
            return
        page = self.page
        drawn = (id(page), self.filter, self.error, self.console.read_only)
        if drawn == self._drawn:
            return
        self._drawn = drawn
        title_widget = self.query_one("#jobs-title", Static)
        if self.error is not None:
            title_widget.update(Text(f"Jobs  {self.error}", style="bold red"))
            sync_rows(self.query_one("#jobs", DataTable), [])
            return
        if page is None:
            title_widget.update(Text("Jobs  (loading…)", style="bold"))
            return
        tz = self.console.tz
        jobs = self.visible()
        rows = []
        for job in jobs:
            status = Text(job.status, style=STATUS_STYLE.get(job.status, ""))
            if job.cancel_requested_at is not None:
                status.append(" (cancel requested)", style="yellow")
            moment = _moment(job)
            rows.append((str(job.id), [
                str(job.id), job.flow, status, f"{job.attempts} of {job.max_attempts}", job.run_id or "",
                fmt.stamp(moment, tz) if moment is not None else "",
                fmt.clip(job.error_message, 40), fmt.clip(orjson.dumps(job.payload).decode(), 40),
            ]))
        sync_rows(self.query_one("#jobs", DataTable), rows)
        counts: dict[str, int] = {}
        for job in jobs:
            counts[job.status] = counts.get(job.status, 0) + 1
        title = Text("Jobs ", style="bold")
        more = " (list limit; narrow the filter)" if len(page.jobs) >= page.limit else ""
        title.append(f"{len(jobs):,} shown{more}", style="dim")
        if counts:
            title.append("  " + "  ".join(f"{s} {counts[s]:,}" for s in LIST_STATUSES if s in counts), style="dim")
        title.append("  completed/cancelled: last 24 h", style="dim")
        title.append(self.filter_label(), style="bold")
        title_widget.update(title)

    # -- actions ------------------------------------------------------------------------------------------

    def current(self) -> JobSummary | None:
        key = self.cursor_key(self.query_one("#jobs", DataTable))
        if key is None or self.page is None:
            return None
        return next((j for j in self.page.jobs if str(j.id) == key), None)

    def _ids(self, *statuses: str) -> list[int]:
        return [j.id for j in self.visible() if j.status in statuses]

    def _confirm(self, title: str, body: str, label: str, then: object) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                then()  # type: ignore[operator]
            else:
                self.notify("cancelled: nothing changed", timeout=3)

        self.app.push_screen(ConfirmScreen(title, body, label), answered)

    def action_cancel_one(self) -> None:
        job = self.current()
        if job is not None and job.status == "running" and job.cancel_requested_at is None:
            self._confirm("Cancel running job", f"Cancel job {job.id} ({job.flow}), running on {job.claimed_by}?\n"
                          "Its worker stops it (cancel_grace) and it ends cancelled, never retried.", "Cancel job",
                          lambda: self.ask(CancelRunning([job.id])))
            return
        if job is None or job.status not in WAITING:
            self.notify("only a pending, scheduled or running job can be cancelled", severity="warning")
            return
        self._confirm("Cancel job", f"Cancel job {job.id} ({job.flow}, {job.status})?\nIt will never run.",
                      "Cancel job", lambda: self.ask(CancelJobs([job.id])))

    def action_cancel_matching(self) -> None:
        ids = self._ids(*WAITING)
        if not ids:
            self.notify("no pending or scheduled job shown", severity="warning")
            return
        self._confirm("Cancel pending jobs", f"Cancel the {len(ids)} pending or scheduled job(s) shown?\n"
                      f"Jobs: {_list_ids(ids)}\nThey will never run.", "Cancel jobs",
                      lambda: self.ask(CancelJobs(ids)))

    def action_retry_dead_matching(self) -> None:
        ids = self._ids("dead")
        if not ids:
            self.notify("no dead job shown", severity="warning")
            return
        self._confirm("Retry dead jobs", f"Retry the {len(ids)} dead job(s) shown?\nJobs: {_list_ids(ids)}",
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

        self._confirm("Purge jobs", f"Delete {len(dead)} dead and {len(cancelled)} cancelled job(s) shown for good?\n"
                      f"Jobs: {_list_ids(dead + cancelled)}", "Purge", purge)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        key = event.row_key.value
        if key is not None and event.data_table.id == "jobs":
            self.ask(OpenJob(int(str(key))))


def _moment(job: JobSummary) -> float | None:
    """When the job entered its state: due (pending, scheduled), claimed (running), ended (others)."""
    when = {"pending": job.run_at, "scheduled": job.run_at, "running": job.claimed_at}.get(job.status, job.finished_at)
    return when.timestamp() if when is not None else None


def _list_ids(ids: list[int], shown: int = 12) -> str:
    text = ", ".join(str(i) for i in ids[:shown])
    return text + (f" and {len(ids) - shown} more" if len(ids) > shown else "")
