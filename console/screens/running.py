"""Running: the jobs running now, longest running first: flow, worker, for how long, attempt, the
progress their handlers report (ctx.progress) and any cancel request. `c` cancels the selected job
(confirmed; hidden in read-only mode): its worker stops it and it ends cancelled within the flow's
cancel_grace. Read again on every snapshot while shown."""

from __future__ import annotations

from rich.text import Text

from console import format as fmt
from console.data import RunningPage
from console.messages import CancelRunning, LoadRunning
from console.screens.base import WriteBinding
from console.screens.listing import PagedScreen, Row
from engine.queue import RunningJob

COLUMNS = (("id", "Job"), ("flow", "Flow"), ("worker", "Worker"), ("for", "Running for"), ("attempt", "Attempt"),
           ("progress", "Progress"), ("message", "Doing"), ("run", "Run"))


class RunningScreen(PagedScreen[RunningPage, RunningJob]):
    NAME = "Running"
    TABLES = (("running", COLUMNS),)
    LIVE = frozenset({"snapshot"})  # not part of the snapshot: read at its pace
    FILTER_HINT = "flow:NAME  free text (worker, run, progress message)"
    BINDINGS = [
        WriteBinding("c", "cancel_running", "Cancel job", id="skiplock.running.cancel"),
    ]

    def load(self) -> LoadRunning:
        return LoadRunning()

    def items(self, page: RunningPage) -> list[RunningJob]:
        return page.jobs

    def key_of(self, item: RunningJob) -> str:
        return str(item.id)

    def matches(self, item: RunningJob) -> bool:
        wanted = self.filter
        return ((not wanted.flow or item.flow == wanted.flow)
                and wanted.matches_text(item.id, item.flow, item.claimed_by, item.run_id, item.progress_message))

    def job_of(self, key: str) -> int | None:
        return int(key)

    def rows(self, page: RunningPage, shown: list[RunningJob]) -> list[Row]:
        theme = self.console.current_theme
        rows: list[Row] = []
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
        return rows

    def summary(self, page: RunningPage, shown: list[RunningJob]) -> Text:
        text = f"{len(page.jobs):,} job(s) running now" + (" (list limit)" if len(page.jobs) >= page.limit else "")
        if len(shown) != len(page.jobs):
            text += f", {len(shown):,} shown"
        reporting = sum(1 for j in page.jobs if j.progress is not None)
        if reporting:
            text += f", {reporting:,} reporting progress"
        return Text(text, style="dim")

    def action_cancel_running(self) -> None:
        job = self.current()
        if job is None:
            self.notify("no running job here", severity="warning")
            return
        if job.cancel_requested_at is not None:
            self.notify(f"job {job.id}: cancel already requested", severity="warning")
            return
        self.confirm("Cancel running job", f"Cancel job {job.id} ({job.flow}), running on {job.claimed_by}?\n"
                     "Its worker stops it (cancel_grace) and it ends cancelled, never retried.", "Cancel job",
                     lambda: self.ask(CancelRunning([job.id])))
