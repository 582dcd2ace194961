"""Failures: a live feed of failed attempts as the engine reports them, newest first."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from console import format as fmt
from console.messages import ClearFailures, OpenJob
from console.screens.base import ConsoleScreen
from console.state import FailureRow
from console.widgets.tables import Table, sync_rows

COLUMNS = (("time", "Time"), ("flow", "Flow"), ("job", "Job"), ("attempt", "Attempt"), ("outcome", "Outcome"),
           ("error", "Error"), ("message", "Message"))
MAX_ROWS = 200  # the newest; the filter reaches all MAX_FAILURES kept


class FailuresScreen(ConsoleScreen):
    FILTER_HINT = "flow:NAME error:TYPE status:dead|retrying age:<10m  free text"
    BINDINGS = [
        Binding("c", "clear", "Clear feed", id="skiplock.failures.clear"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._drawn: tuple[object, ...] | None = None

    def body(self) -> ComposeResult:
        yield Static("", id="failures-title", classes="title")
        yield Table(id="failures", cursor_type="row")

    def on_mount(self) -> None:
        self.query_one("#failures", DataTable).add_columns(*[(label, key) for key, label in COLUMNS])
        self.query_one("#failures", DataTable).focus()
        super().on_mount()

    def visible(self) -> list[FailureRow]:
        wanted = self.filter
        now = self.console.now()
        rows = []
        for row in reversed(self.console.state.failures):
            if wanted.flow and row.flow != wanted.flow:
                continue
            if wanted.error and row.type != wanted.error:
                continue
            if wanted.status and not row.outcome.startswith(wanted.status[:4]):
                continue
            if not wanted.matches_age(now - row.at):
                continue
            if not wanted.matches_text(row.flow, row.job, row.type, row.message, row.worker):
                continue
            rows.append(row)
            if len(rows) >= MAX_ROWS:
                break
        return rows

    def update_view(self, changed: set[str]) -> None:
        state = self.console.state
        drawn = (state.failures_version, self.filter)
        if drawn == self._drawn:
            return  # nothing new: resuming the screen costs nothing
        self._drawn = drawn
        theme = self.console.current_theme
        tz = self.console.tz
        rows = []
        now = self.console.now()
        shown = self.visible()
        for row in shown:
            dead = row.outcome == "dead"
            rows.append((row.key, [
                fmt.when(row.at, now, tz),
                row.flow,
                str(row.job),
                f"{row.attempt} of {row.max_attempts}" if row.max_attempts else str(row.attempt),
                Text(("dead letter" if row.source != "live" else "dead") if dead else "retrying",
                     style=f"bold {theme.error}" if dead else (theme.warning or "")),
                Text(row.type, style="bold"),
                fmt.clip(row.message, 80),
            ]))
        sync_rows(self.query_one("#failures", DataTable), rows)
        self._update_title(len(shown))

    def _update_title(self, shown: int) -> None:
        state = self.console.state
        listed = len(state.failures)
        title = Text("Failures ", style="bold")
        text = f"{listed:,} listed" if shown == listed else f"{shown:,} of {listed:,} listed match"
        if shown >= MAX_ROWS:
            text += f" (the newest {MAX_ROWS} shown: filter to reach the rest)"
        title.append(text, style="dim")
        if state.failures_dropped:
            # Workers send a sample of each tick's failures and count the rest: those are in no row.
            title.append(f"  ·  {state.failures_dropped:,} more failed attempt(s) counted, not sampled", style="dim")
        title.append("  ·  live over NOTIFY; 'dead letter' rows read at attach", style="dim")
        title.append(self.filter_label(), style="bold")
        self.query_one("#failures-title", Static).update(title)

    def action_clear(self) -> None:
        self.ask(ClearFailures())

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        key = event.row_key.value
        if key is not None:
            self.ask(OpenJob(int(str(key).split(":", 1)[0])))
