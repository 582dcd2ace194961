"""Schedules: each schedule's next fire time, last fire, last job and its outcome, paused or not;
pause/resume (p) and trigger now (t, confirmed). Read again on every snapshot while shown."""

from __future__ import annotations

from rich.text import Text

from console import format as fmt
from console.data import SchedulePage
from console.messages import LoadSchedules, SetSchedulePaused, TriggerSchedule
from console.screens.base import WriteBinding
from console.screens.listing import PagedScreen, Row
from engine.queue import Schedule
from engine.schedules import describe

COLUMNS = (("name", "Schedule"), ("flow", "Flow"), ("when", "When"), ("state", "State"), ("next", "Next fire"),
           ("last", "Last fired"), ("job", "Last job"), ("outcome", "Outcome"))


class SchedulesScreen(PagedScreen[SchedulePage, Schedule]):
    NAME = "Schedules"
    TABLES = (("schedules", COLUMNS),)
    LIVE = frozenset({"snapshot"})  # the schedules are not part of the snapshot: read them at its pace
    EMPTY = "none yet: add one with `engine schedule add`, or a [schedules.NAME] table in the config"
    FILTER_HINT = "flow:NAME status:active|paused|disabled  free text"
    BINDINGS = [
        WriteBinding("p", "toggle_schedule", "Pause/resume", id="skiplock.schedules.pause"),
        WriteBinding("t", "trigger_schedule", "Trigger now", id="skiplock.schedules.trigger"),
    ]

    def load(self) -> LoadSchedules:
        return LoadSchedules()

    def items(self, page: SchedulePage) -> list[Schedule]:
        return page.schedules

    def key_of(self, item: Schedule) -> str:
        return item.name

    def matches(self, item: Schedule) -> bool:
        wanted = self.filter
        return ((not wanted.flow or item.flow == wanted.flow) and (not wanted.status or item.state == wanted.status)
                and wanted.matches_text(item.name, item.flow, item.cron, item.last_outcome))

    def job_of(self, key: str) -> int | None:
        schedule = next((s for s in self.listed() if s.name == key), None)
        return schedule.last_job_id if schedule is not None and schedule.last_job_id else None

    def rows(self, page: SchedulePage, shown: list[Schedule]) -> list[Row]:
        theme = self.console.current_theme
        tz = self.console.tz
        outcome_styles = {"completed": theme.success or "green", "dead": f"bold {theme.error or 'red'}",
                          "running": theme.accent or "", "pending": theme.warning or "", "gone": "dim"}
        state_styles = {"active": theme.success or "green", "paused": f"bold {theme.warning or 'yellow'}"}
        rows: list[Row] = []
        for s in shown:
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
                Text(s.state, style=state_styles.get(s.state, "dim")),
                next_at or fmt.DASH, last or fmt.DASH,
                f"#{s.last_job_id}" if s.last_job_id else fmt.DASH,
                Text(s.last_outcome or fmt.DASH, style=outcome_styles.get(s.last_outcome or "", "")),
            ]))
        return rows

    def summary(self, page: SchedulePage, shown: list[Schedule]) -> Text:
        paused = sum(1 for s in page.schedules if s.paused)
        from_config = sum(1 for s in page.schedules if s.source == "config")
        text = f"{len(page.schedules)} schedule(s), {from_config} from the config" + (f", {paused} paused" if paused else "")
        if len(shown) != len(page.schedules):
            text += f", {len(shown)} shown"
        summary = Text().append(text, style="dim")
        tz = self.console.tz
        summary.append("  ·  times in " + (str(tz) if tz is not None else "local time"), style="dim")
        return summary

    # -- actions ------------------------------------------------------------------------------------------

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
        self.confirm("Trigger schedule", f"Enqueue one job of {schedule.name} ({schedule.flow}) now?\n"
                     "Its ticks are left as they are.", "Trigger", lambda: self.ask(TriggerSchedule(schedule.name)),
                     danger=False)
