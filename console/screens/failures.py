"""Failures: a live feed of failed attempts as the engine reports them, newest first."""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding

from console import format as fmt
from console.messages import ClearFailures
from console.screens.listing import Row, TableScreen
from console.state import FailureRow
from console.widgets.tables import sync_rows

COLUMNS = (("time", "Time"), ("flow", "Flow"), ("job", "Job"), ("attempt", "Attempt"), ("outcome", "Outcome"),
           ("error", "Error"), ("message", "Message"))
MAX_ROWS = 200  # the newest; the filter reaches all MAX_FAILURES kept


class FailuresScreen(TableScreen):
    NAME = "Failures"
    TABLES = (("failures", COLUMNS),)
    REDRAW_ON = frozenset({"all", "tick"})  # every redraw the app asks for: the feed lives in its state
    FILTER_HINT = "flow:NAME error:TYPE status:dead|retrying age:<10m  free text"
    BINDINGS = [
        Binding("c", "clear", "Clear feed", id="skiplock.failures.clear"),
    ]

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

    def drawn_key(self) -> tuple[object, ...]:
        return (self.console.state.failures_version, self.filter)

    def draw(self) -> None:
        theme = self.console.current_theme
        tz = self.console.tz
        rows: list[Row] = []
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
        sync_rows(self.main_table(), rows)
        self.show_title(self._summary(len(shown)))

    def _summary(self, shown: int) -> Text:
        state = self.console.state
        listed = len(state.failures)
        if not listed and not state.failures_dropped:
            text = "none yet: failed attempts appear here as the engines report them"
        else:
            text = f"{listed:,} listed" if shown == listed else f"{shown:,} of {listed:,} listed match"
        if shown >= MAX_ROWS:
            text += f" (the newest {MAX_ROWS} shown: filter to reach the rest)"
        summary = Text().append(text, style="dim")
        if state.failures_dropped:
            # Workers send a sample of each tick's failures and count the rest: those are in no row.
            summary.append(f"  ·  {state.failures_dropped:,} more failed attempt(s) counted, not sampled", style="dim")
        summary.append("  ·  live over NOTIFY; 'dead letter' rows read at attach", style="dim")
        return summary

    def action_clear(self) -> None:
        self.ask(ClearFailures())

    def job_of(self, key: str) -> int | None:
        return int(key.split(":", 1)[0])  # job:attempt:source
