"""Schedules: each schedule's next fire time, last fire, last job and its outcome, paused or not;
pause/resume (p) and trigger now (t, confirmed). Read again on every snapshot while shown."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from console import format as fmt
from console.data import SchedulePage
from console.messages import (ActionDone, LoadSchedules, OpenJob, SchedulesFailed, SchedulesLoaded, SetSchedulePaused,
                              TriggerSchedule)
from console.screens.base import ConsoleScreen
from console.screens.modals import ConfirmScreen
from console.widgets.tables import Table, sync_rows
from engine.queue import Schedule
from engine.schedules import describe

COLUMNS = (("name", "Schedule"), ("flow", "Flow"), ("when", "When"), ("state", "State"), ("next", "Next fire"),
           ("last", "Last fired"), ("job", "Last job"), ("outcome", "Outcome"))


class SchedulesScreen(ConsoleScreen):
    FILTER_HINT = "flow:NAME status:active|paused|disabled  free text"
    BINDINGS = [
        Binding("p", "toggle_schedule", "Pause/resume", id="skiplock.schedules.pause"),
        Binding("t", "trigger_schedule", "Trigger now", id="skiplock.schedules.trigger"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.page: SchedulePage | None = None
        self.error: str | None = None
        self._drawn: tuple[object, ...] | None = None

    def body(self) -> ComposeResult:
        yield Static("", id="schedules-title", classes="title")
        yield Table(id="schedules", cursor_type="row")

    def on_mount(self) -> None:
        self.query_one("#schedules", DataTable).add_columns(*[(label, key) for key, label in COLUMNS])
        self.query_one("#schedules", DataTable).focus()
        super().on_mount()
        self.reload()

    def on_screen_resume(self) -> None:
        super().on_screen_resume()
        if self.ready:
            self.reload()

    # -- data -----------------------------------------------------------------------------------------

    def reload(self) -> None:
        self.ask(LoadSchedules())

    def on_schedules_loaded(self, message: SchedulesLoaded) -> None:
        self.page = message.page
        self.error = None
        self.update_view({"all"})

    def on_schedules_failed(self, message: SchedulesFailed) -> None:
        self.error = message.error
        self.update_view({"all"})

    def on_action_done(self, message: ActionDone) -> None:
        self.reload()

    def visible(self) -> list[Schedule]:
        if self.page is None:
            return []
        wanted = self.filter
        return [s for s in self.page.schedules
                if (not wanted.flow or s.flow == wanted.flow)
                and (not wanted.status or s.state == wanted.status)
                and wanted.matches_text(s.name, s.flow, s.cron, s.last_outcome)]

    # -- drawing ------------------------------------------------------------------------------------------

    def update_view(self, changed: set[str]) -> None:
        if "snapshot" in changed and self.is_current:
            self.reload()  # the schedules are not part of the snapshot: read them at its pace
        if not ({"all"} & changed):
            return
        page = self.page
        drawn = (id(page), self.error, self.filter, self.console.read_only)
        if drawn == self._drawn:
            return
        self._drawn = drawn
        title = Text("Schedules ", style="bold")
        if page is None:
            title.append(f"(cannot read: {self.error})" if self.error else "(loading…)", style="dim")
            self.query_one("#schedules-title", Static).update(title)
            return
        theme = self.console.current_theme
        tz = self.console.tz
        outcome_styles = {"completed": theme.success or "green", "dead": f"bold {theme.error or 'red'}",
                          "running": theme.accent or "", "pending": theme.warning or "", "gone": "dim"}
        shown = self.visible()
        rows = []
        for s in shown:
            state_style = {"active": theme.success or "green", "paused": f"bold {theme.warning or 'yellow'}"}
            next_at = None
            if s.state == "active" and s.next_at is not None:
                at = s.next_at.timestamp()
                next_at = f"{fmt.when(at, page.now, tz)}  in {fmt.duration(at - page.now)}"
            last = None
            if s.last_fired_at is not None:
                at = s.last_fired_at.timestamp()
                last = f"{fmt.when(at, page.now, tz)}  {fmt.age(page.now - at)} ago"
            rows.append((s.name, [
                Text(s.name, style="bold"), s.flow,
                (s.cron + (f" ({s.timezone})" if s.timezone != "UTC" else "")) if s.cron
                else describe(s.cron, s.every_ms),
                Text(s.state, style=state_style.get(s.state, "dim")),
                next_at or fmt.DASH, last or fmt.DASH,
                f"#{s.last_job_id}" if s.last_job_id else fmt.DASH,
                Text(s.last_outcome or fmt.DASH, style=outcome_styles.get(s.last_outcome or "", "")),
            ]))
        sync_rows(self.query_one("#schedules", DataTable), rows)
        paused = sum(1 for s in page.schedules if s.paused)
        from_config = sum(1 for s in page.schedules if s.source == "config")
        text = f"{len(page.schedules)} schedule(s), {from_config} from the config" + (f", {paused} paused" if paused else "")
        if len(shown) != len(page.schedules):
            text += f", {len(shown)} shown"
        title.append(text, style="dim")
        title.append("  ·  times in " + (str(tz) if tz is not None else "local time"), style="dim")
        title.append(self.filter_label(), style="bold")
        self.query_one("#schedules-title", Static).update(title)

    # -- actions ------------------------------------------------------------------------------------------

    def current(self) -> Schedule | None:
        key = self.cursor_key(self.query_one("#schedules", DataTable))
        if key is None or self.page is None:
            return None
        return next((s for s in self.page.schedules if s.name == key), None)

    def action_toggle_schedule(self) -> None:
        schedule = self.current()
        if schedule is None:
            self.notify("no schedule here", severity="warning")
            return
        self.ask(SetSchedulePaused(schedule.name, not schedule.paused))

    def action_trigger_schedule(self) -> None:
        schedule = self.current()
        if schedule is None:
            self.notify("no schedule here", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.ask(TriggerSchedule(schedule.name))
            else:
                self.notify("cancelled: nothing changed", timeout=3)

        self.app.push_screen(ConfirmScreen("Trigger schedule", f"Enqueue one job of {schedule.name} "
                                           f"({schedule.flow}) now?\nIts ticks are left as they are.", "Trigger",
                                           danger=False), answered)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        schedule = self.current()
        if schedule is not None and schedule.last_job_id:
            self.ask(OpenJob(schedule.last_job_id))
