"""Running: the jobs running now, longest running first: flow, worker, for how long, attempt, the
progress their handlers report (ctx.progress) and any cancel request. `c` cancels the selected job
(confirmed; hidden in read-only mode): its worker stops it and it ends cancelled within the flow's
cancel_grace. Read again on every snapshot while shown."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from console import format as fmt
from console.data import RunningPage
from console.messages import ActionDone, CancelRunning, LoadRunning, OpenJob, RunningFailed, RunningLoaded
from console.screens.base import ConsoleScreen
from console.screens.modals import ConfirmScreen
from console.widgets.tables import Table, sync_rows
from engine.queue import RunningJob

COLUMNS = (("id", "Job"), ("flow", "Flow"), ("worker", "Worker"), ("for", "Running for"), ("attempt", "Attempt"),
           ("progress", "Progress"), ("message", "Doing"), ("run", "Run"))


class RunningScreen(ConsoleScreen):
    FILTER_HINT = "flow:NAME  free text (worker, run, progress message)"
    BINDINGS = [
        Binding("c", "cancel_running", "Cancel job", id="skiplock.running.cancel"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.page: RunningPage | None = None
        self.error: str | None = None
        self._drawn: tuple[object, ...] | None = None

    def body(self) -> ComposeResult:
        yield Static("", id="running-title", classes="title")
        yield Table(id="running", cursor_type="row")

    def on_mount(self) -> None:
        self.query_one("#running", DataTable).add_columns(*[(label, key) for key, label in COLUMNS])
        self.query_one("#running", DataTable).focus()
        super().on_mount()
        self.reload()

    def on_screen_resume(self) -> None:
        super().on_screen_resume()
        if self.ready:
            self.reload()

    # -- data -------------------------------------------------------------------------------------------

    def reload(self) -> None:
        self.ask(LoadRunning())

    def on_running_loaded(self, message: RunningLoaded) -> None:
        self.page = message.page
        self.error = None
        self.update_view({"all"})

    def on_running_failed(self, message: RunningFailed) -> None:
        self.error = message.error
        self._drawn = None
        self.update_view({"all"})

    def on_action_done(self, message: ActionDone) -> None:
        self.reload()

    def visible(self) -> list[RunningJob]:
        if self.page is None:
            return []
        wanted = self.filter
        return [j for j in self.page.jobs
                if (not wanted.flow or j.flow == wanted.flow)
                and wanted.matches_text(j.id, j.flow, j.claimed_by, j.run_id, j.progress_message)]

    # -- drawing ------------------------------------------------------------------------------------------

    def update_view(self, changed: set[str]) -> None:
        if "snapshot" in changed and self.is_current:
            self.reload()  # not part of the snapshot: read at its pace
        if not ({"all"} & changed):
            return
        page = self.page
        drawn = (id(page), self.error, self.filter, self.console.read_only)
        if drawn == self._drawn:
            return
        self._drawn = drawn
        title = Text("Running ", style="bold")
        if self.error is not None:
            title.append(f"(cannot read: {self.error})", style="bold red")
            self.query_one("#running-title", Static).update(title)
            return
        if page is None:
            title.append("(loading…)", style="dim")
            self.query_one("#running-title", Static).update(title)
            return
        theme = self.console.current_theme
        shown = self.visible()
        rows = []
        for job in shown:
            since = job.claimed_at.timestamp() if job.claimed_at is not None else None
            progress: Text | str = fmt.DASH
            if job.progress is not None:
                progress = fmt.bar(round(job.progress * 1000), 1000, width=12)
            doing = Text(fmt.clip(job.progress_message, 40))
            if job.cancel_requested_at is not None:
                doing = Text("cancel requested", style=f"bold {theme.warning or 'yellow'}")
            rows.append((str(job.id), [
                str(job.id), job.flow, job.claimed_by or fmt.DASH,
                fmt.duration(page.now - since) if since is not None else fmt.DASH,
                f"{job.attempts} of {job.max_attempts}", progress, doing, job.run_id or "",
            ]))
        sync_rows(self.query_one("#running", DataTable), rows)
        text = f"{len(page.jobs):,} job(s) running now" + (" (list limit)" if len(page.jobs) >= page.limit else "")
        if len(shown) != len(page.jobs):
            text += f", {len(shown):,} shown"
        reporting = sum(1 for j in page.jobs if j.progress is not None)
        if reporting:
            text += f", {reporting:,} reporting progress"
        title.append(text, style="dim")
        title.append(self.filter_label(), style="bold")
        self.query_one("#running-title", Static).update(title)

    # -- actions ------------------------------------------------------------------------------------------

    def current(self) -> RunningJob | None:
        key = self.cursor_key(self.query_one("#running", DataTable))
        if key is None or self.page is None:
            return None
        return next((j for j in self.page.jobs if str(j.id) == key), None)

    def action_cancel_running(self) -> None:
        job = self.current()
        if job is None:
            self.notify("no running job here", severity="warning")
            return
        if job.cancel_requested_at is not None:
            self.notify(f"job {job.id}: cancel already requested", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.ask(CancelRunning([job.id]))
            else:
                self.notify("cancelled: nothing changed", timeout=3)

        self.app.push_screen(ConfirmScreen(
            "Cancel running job", f"Cancel job {job.id} ({job.flow}), running on {job.claimed_by}?\n"
            "Its worker stops it (cancel_grace) and it ends cancelled, never retried.", "Cancel job"), answered)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        key = event.row_key.value
        if key is not None and event.data_table.id == "running":
            self.ask(OpenJob(int(str(key))))
