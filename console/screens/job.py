"""Job detail: state, timeline (enqueued, each attempt with its error and traceback, rescue, end),
payload as pretty JSON, run and result. Pushed on top of the screen it was opened from."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from rich.console import Group
from rich.json import JSON
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Static

from console import format as fmt
from console.messages import ActionDone, JobLoaded, LoadJob, PurgeJobs, RetryJobs
from console.screens.base import BaseScreen, WriteBinding
from console.widgets.header import StatusHeader
from console.widgets.keybar import KeyBar
from engine.explain import Explanation
from engine.queue import Job
from engine.store import ChildJob

OPERATOR_RETRY = "retried"


def timeline(job: Job, now: float) -> list[tuple[float, str, str, str]]:
    """(time, event, detail, traceback) in order."""
    entries: list[tuple[float, str, str, str]] = [
        (job.created_at.timestamp(), "enqueued",
         f"priority {job.priority}" + (f", run {job.run_id}" if job.run_id else "")
         + (f", dedupe key {job.dedupe_key}" if job.dedupe_key else ""), ""),
    ]
    previous = 0  # the attempt number of the entry before: attempts only restart after an operator retry
    last_at = job.created_at.timestamp()
    for entry in job.errors:
        at = entry.get("at")
        when = _when(at)
        worker = entry.get("worker") or "?"
        attempt = int(entry.get("attempt") or 0)
        if entry.get("snoozed"):  # Snooze(delay): the attempt was given back, the next one has its number
            entries.append((when, "snoozed", f"attempt {attempt} on {worker}: back in {entry.get('delay')}s, "
                            "no attempt counted", ""))
            previous, last_at = attempt - 1, when
            continue
        if entry.get("cancelled"):
            entries.append((when, "cancelled", f"attempt {attempt} on {worker}: stopped at an operator's request",
                            ""))
            previous, last_at = attempt, when
            continue
        if previous and attempt <= previous:
            entries.append((last_at, OPERATOR_RETRY, _retried_detail(when_known=False), ""))
        previous, last_at = attempt, when
        if entry.get("type") == "WorkerLost":
            entries.append((when, "rescued", f"attempt {entry.get('attempt')}: worker {worker} stopped heartbeating; "
                            "the job went back to pending", ""))
            continue
        permanent = " (permanent)" if entry.get("permanent") else ""
        entries.append((when, f"attempt {entry.get('attempt')} failed",
                        f"on {worker}: {entry.get('type')}{permanent}: {entry.get('message')}",
                        str(entry.get("traceback") or "")))
    # After the last recorded failure: fewer attempts used than that failure's number means the
    # operator's retry reset them (attempts count the one running or completed too).
    used = job.attempts - (1 if job.status in ("running", "completed") else 0)
    if previous and used < previous:
        if job.status == "pending":  # nothing touched the row since the retry (it sets updated_at)
            entries.append((job.updated_at.timestamp(), OPERATOR_RETRY, _retried_detail(), ""))
        else:
            entries.append((last_at, OPERATOR_RETRY, _retried_detail(when_known=False), ""))
    if job.status == "running" and job.claimed_at is not None:
        entries.append((job.claimed_at.timestamp(), f"attempt {job.attempts} running", f"claimed by {job.claimed_by}",
                        ""))
    if job.status == "pending" and job.run_at is not None:
        due = job.run_at.timestamp()
        label = "retry scheduled" if job.attempts else "scheduled"
        entries.append((due, label if due > now else "waiting", f"attempt {job.attempts + 1} of {job.max_attempts}"
                        + (f", due in {fmt.duration(due - now)}" if due > now else ""), ""))
    if job.status == "completed":
        if job.claimed_at is not None:
            entries.append((job.claimed_at.timestamp(), f"attempt {job.attempts} claimed", f"by {job.claimed_by}", ""))
        if job.finished_at is not None:
            entries.append((job.finished_at.timestamp(), "completed", "", ""))
    if job.status == "dead" and job.finished_at is not None:
        entries.append((job.finished_at.timestamp(), "dead letter",
                        f"after {job.attempts} of {job.max_attempts} attempt(s): {job.error_type}", ""))
    entries.sort(key=lambda e: e[0])
    return entries


def _retried_detail(when_known: bool = True) -> str:
    # The store keeps no record of a retry (dlq_retry resets attempts and keeps the error history), so
    # the timeline infers it from attempt numbers that start again.
    detail = "by an operator: dead letter back to pending, attempts restart"
    return detail if when_known else detail + " (when is not recorded)"


def _when(value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return 0.0
    if isinstance(value, datetime):
        return value.timestamp()
    return 0.0


class JobScreen(BaseScreen):
    BINDINGS = [
        Binding("escape,backspace", "back", "Back", id="skiplock.job.back"),
        WriteBinding("r", "retry", "Retry", id="skiplock.job.retry"),
        WriteBinding("x", "purge", "Purge", id="skiplock.job.purge"),
    ]

    def __init__(self, job_id: int) -> None:
        super().__init__()
        self.job_id = job_id
        self.job: Job | None = None
        self.child_jobs: list[ChildJob] = []
        self.missing = False

    def compose(self) -> ComposeResult:
        yield StatusHeader(id="status")
        yield Static(Text(f"Job {self.job_id}  (loading…)", style="bold"), id="job-title", classes="title")
        with VerticalScroll(id="job-body"):
            yield Static("", id="job-why", classes="box")
            yield Static("", id="job-timeline", classes="box")
            with Horizontal(id="job-data"):
                yield Static("", id="job-payload", classes="box")
                yield Static("", id="job-result", classes="box")
        yield KeyBar()

    def on_mount(self) -> None:
        self.query_one("#job-why", Static).display = False  # shown for jobs that have not ended
        self.ready = True
        self.update_header()
        self.query_one("#job-body").focus()
        self.ask(LoadJob(self.job_id))

    def on_job_loaded(self, message: JobLoaded) -> None:
        if message.job_id == self.job_id:
            self.child_jobs = message.children
            self.job_loaded(message.job)
            self.show_explanation(message.explanation)

    def on_action_done(self, message: ActionDone) -> None:
        if not message.error:
            self.ask(LoadJob(self.job_id))  # show what the retry or purge did

    def job_loaded(self, job: Job | None) -> None:
        self.job = job
        self.missing = job is None
        self.refresh_bindings()
        title = self.query_one("#job-title", Static)
        if job is None:
            title.update(Text(f"Job {self.job_id} not found: it was purged, or completed and removed by "
                              "retention", style="bold"))
            return
        theme = self.console.current_theme
        status_style = {"dead": f"bold {theme.error}", "completed": f"bold {theme.success}",
                        "running": f"bold {theme.accent}", "pending": f"bold {theme.warning}"}.get(job.status, "bold")
        head = Text()
        head.append(f"Job {job.id}", style="bold")
        head.append("  ·  flow ")
        head.append(job.flow, style="bold")
        head.append("  ·  ")
        head.append(job.status.upper(), style=status_style)
        head.append(f"  ·  attempt {job.attempts} of {job.max_attempts}")
        if job.run_id:
            head.append(f"  ·  run {job.run_id}")
        if job.parent_id is not None:
            head.append(f"  ·  parent job {job.parent_id}")
        if job.error_type:
            head.append(f"  ·  last error {job.error_type}: {fmt.clip(job.error_message, 60)}")
        if job.status == "running" and job.cancel_requested_at is not None:
            head.append("  ·  cancel requested", style=f"bold {theme.warning}")
        if job.progress is not None:
            head.append("  ·  progress ")
            head.append(fmt.bar(round(job.progress * 1000), 1000, width=10))
            if job.progress_message:
                head.append(f"  {job.progress_message}")
        title.update(head)
        tz = self.console.tz
        lines = Text()
        lines.append("Timeline\n", style="bold underline")
        for at, event, detail, trace in timeline(job, self.console.now()):
            lines.append(f"{fmt.stamp(at, tz)}  ", style="dim")
            style = (f"bold {theme.error}" if ("failed" in event or event == "dead letter")
                     else f"bold {theme.accent}" if event == OPERATOR_RETRY else "bold")
            lines.append(f"{event:<18}", style=style)
            lines.append(f" {detail}\n")
            if trace:
                for trace_line in trace.rstrip().splitlines()[-12:]:
                    lines.append(f"{'':22}{trace_line}\n", style="dim")
        self.query_one("#job-timeline", Static).update(lines)
        payload = Group(Text("Payload", style="bold underline"), JSON(orjson.dumps(job.payload).decode()))
        self.query_one("#job-payload", Static).update(payload)
        result = Text("Result\n", style="bold underline")
        if job.status == "completed":
            result_body: Any = JSON(orjson.dumps(job.result).decode()) if job.result is not None else Text("null")
        else:
            result_body = Text(f"none yet ({job.status})", style="dim")
        parts: list[Any] = [result, result_body]
        children = self.child_jobs
        if children:
            kids = Text(f"\nNext stage: {len(children)} job(s)\n", style="bold underline")
            for child in children[:20]:
                kids.append(f"job {child.id}  {child.flow}  {child.status}\n")
            if len(children) > 20:
                kids.append(f"… and {len(children) - 20} more (engine jobs show {job.id})\n", style="dim")
            parts.append(kids)
        self.query_one("#job-result", Static).update(Group(*parts))

    def show_explanation(self, explanation: Explanation | None) -> None:
        """The "why is it waiting" box: each reason on its own line (engine explain's text)."""
        box = self.query_one("#job-why", Static)
        if explanation is None or explanation.status not in ("pending", "scheduled", "running"):
            box.display = False
            return
        text = Text()
        text.append("Why it is not running now\n" if explanation.status != "running" else "Running\n",
                    style="bold underline")
        for reason in explanation.reasons:
            text.append(f"{reason.message}\n")
        box.update(text)
        box.display = True

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        allowed = super().check_action(action, parameters)
        if allowed is False:
            return False
        if action in ("retry", "purge"):
            return True if (self.job is not None and self.job.status == "dead") else None
        return True

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_retry(self) -> None:
        if self.job is None or self.job.status != "dead":
            return
        job_id = self.job_id
        self.confirm("Retry dead letter", f"Retry job {job_id}?", "Retry", lambda: self.ask(RetryJobs([job_id])))

    def action_purge(self) -> None:
        if self.job is None or self.job.status != "dead":
            return
        job_id = self.job_id
        self.confirm("Purge dead letter", f"Delete job {job_id} for good?", "Purge", lambda: self.ask(PurgeJobs([job_id])))
