"""Dead letters: counts by error type, the letters themselves, and the operator's retry and purge.

Every action goes through `engine.queue.Queue` (SQL guarded by `status = 'dead'`), asks for
confirmation in a modal, and reports how many rows it changed.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.timer import Timer
from textual.widgets import DataTable, Static

from console import format as fmt
from console.data import DeadLetterPage
from console.filters import Filter
from console.messages import (ActionDone, DeadLettersChanged, LoadDeadLetters, PurgeJobs, PurgeMatching, RetryJobs,
                              RetryMatching)
from console.screens.base import WriteBinding
from console.screens.listing import PagedScreen, Row
from console.screens.modals import PromptScreen
from console.widgets.tables import sync_rows
from engine.queue import DeadLetter, DeadLetterFilter

LETTER_COLUMNS = (("sel", " "), ("id", "Job"), ("flow", "Flow"), ("error", "Error"), ("message", "Message"),
                  ("attempts", "Attempts"), ("died", "Died"), ("age", "Age"))
GROUP_COLUMNS = (("flow", "Flow"), ("error", "Error type"), ("count", "Count"), ("last", "Last"),
                 ("sample", "Latest message"))
DAY = 86400.0
SETTLE_S = 0.5  # after a burst of dead-letter events, read the page once, this long after the first


class DeadLettersScreen(PagedScreen[DeadLetterPage, DeadLetter]):
    NAME = "Dead letters"
    TABLES = (("groups", GROUP_COLUMNS), ("dead", LETTER_COLUMNS))
    REDRAW_ON = frozenset({"all", "dead"})
    EMPTY = "none: a job lands here when it fails its last attempt"
    FILTER_HINT = "flow:NAME error:TYPE age:>7d age:<1h  free text"
    BINDINGS = [
        Binding("space", "toggle_select", "Select", id="skiplock.dlq.select"),
        Binding("a", "select_all", "Select all", show=False, id="skiplock.dlq.select_all"),
        Binding("e", "same_error", "Same error", show=False, id="skiplock.dlq.same_error"),
        WriteBinding("r", "retry_one", "Retry", id="skiplock.dlq.retry"),
        WriteBinding("R", "retry_selected", "Retry selected", id="skiplock.dlq.retry_selected"),
        WriteBinding("A", "retry_all", "Retry all matching", id="skiplock.dlq.retry_all"),
        WriteBinding("x", "purge_selected", "Purge", id="skiplock.dlq.purge"),
        WriteBinding("X", "purge_older", "Purge older than…", id="skiplock.dlq.purge_older"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.selected: set[int] = set()
        self._reload_timer: Timer | None = None

    # -- data -------------------------------------------------------------------------------------------

    def where(self) -> DeadLetterFilter:
        """The part of the filter SQL can apply (flow, error type, older than)."""
        return DeadLetterFilter(flow=self.filter.flow, error_type=self.filter.error,
                                older_than=self.filter.older_than)

    def load(self) -> LoadDeadLetters:
        return LoadDeadLetters(self.where())

    def on_dead_letters_changed(self, message: DeadLettersChanged) -> None:
        if not self.is_current:
            self.stale = True  # read again when shown
            return
        if not message.soon:
            self.reload()
            return
        if self._reload_timer is None:
            def fire() -> None:
                self._reload_timer = None
                if self.is_current:
                    self.reload()
                else:
                    self.stale = True

            self._reload_timer = self.set_timer(SETTLE_S, fire)

    def after_action(self, message: ActionDone) -> None:
        self.selected -= set(message.changed)  # type: ignore[arg-type]  # the app reads again (DeadLettersChanged)

    def page_loaded(self) -> None:
        self.selected &= {d.id for d in self.listed()}

    def filter_changed(self) -> None:
        self.selected.clear()
        self.update_view({"all"})
        self.reload()

    def age_now(self) -> float:
        """The time ages are counted to: the page's, or the latest snapshot's when that is newer, so
        the Age column advances with every refresh without reading the page again."""
        assert self.page is not None
        snapshot = self.console.state.snapshot
        return max(self.page.now, snapshot.now) if snapshot is not None else self.page.now

    def items(self, page: DeadLetterPage) -> list[DeadLetter]:
        return page.letters

    def key_of(self, item: DeadLetter) -> str:
        return str(item.id)

    def matches(self, item: DeadLetter) -> bool:
        age = self.age_now() - item.finished_at.timestamp() if item.finished_at else None
        return self.filter.matches_age(age) and self.filter.matches_text(
            item.id, item.flow, item.error_type, item.error_message, item.run_id)

    def job_of(self, key: str) -> int | None:
        return int(key)

    # -- drawing ------------------------------------------------------------------------------------------

    def drawn_key(self) -> tuple[object, ...]:
        now = self.age_now() if self.page is not None else None
        return (*super().drawn_key(), now, frozenset(self.selected))

    def draw(self) -> None:
        super().draw()
        if self.page is not None:
            self._draw_groups(self.page)

    def _draw_groups(self, page: DeadLetterPage) -> None:
        theme = self.console.current_theme
        groups: list[Row] = []
        for group in page.by_error:
            if self.filter.error and group["error_type"] != self.filter.error:
                continue
            key = f"{group['flow']}\x00{group['error_type']}"
            groups.append((key, [group["flow"], Text(group["error_type"], style="bold"),
                                 Text(f"{group['count']:,}", style=theme.error or "red"),
                                 fmt.stamp(group["last_at"], self.console.tz), fmt.clip(group["sample_message"], 60)]))
        table = self.query_one("#groups", DataTable)
        sync_rows(table, groups)
        table.styles.height = min(len(groups), 6) + 1
        total = sum(int(g["count"]) for g in page.by_error
                    if not self.filter.error or g["error_type"] == self.filter.error)
        title = Text("By error type ", style="bold")
        title.append(f"{total:,} dead letter(s){' in ' + self.filter.flow if self.filter.flow else ''}", style="dim")
        self.query_one("#groups-title", Static).update(title)

    def rows(self, page: DeadLetterPage, shown: list[DeadLetter]) -> list[Row]:
        theme = self.console.current_theme
        tz = self.console.tz
        now = self.age_now()
        rows: list[Row] = []
        for letter in shown:
            age = now - letter.finished_at.timestamp() if letter.finished_at else None
            mark = Text("✓", style=f"bold {theme.accent}") if letter.id in self.selected else Text(" ")
            rows.append((str(letter.id), [
                mark, str(letter.id), letter.flow, Text(letter.error_type or "?", style="bold"),
                fmt.clip(letter.error_message, 60),
                f"{letter.attempts} of {letter.max_attempts}" if letter.max_attempts else str(letter.attempts),
                fmt.stamp(letter.finished_at, tz), fmt.age(age),
            ]))
        return rows

    def summary(self, page: DeadLetterPage, shown: list[DeadLetter]) -> Text:
        more = " (list limit; narrow the filter)" if len(page.letters) >= page.limit else ""
        summary = Text().append(f"{len(shown):,} shown{more}", style="dim")
        if self.selected:
            summary.append(f"  ·  {len(self.selected)} selected", style=f"bold {self.console.current_theme.accent}")
        return summary

    # -- selection -----------------------------------------------------------------------------------------

    def action_toggle_select(self) -> None:
        letter = self.current()
        if letter is None:
            return
        self.selected ^= {letter.id}
        self.update_view({"dead"})
        table = self.query_one("#dead", DataTable)
        if table.cursor_row < table.row_count - 1:
            table.move_cursor(row=table.cursor_row + 1)

    def action_select_all(self) -> None:
        shown = {d.id for d in self.visible()}
        self.selected = set() if shown and shown <= self.selected else shown
        self.update_view({"dead"})

    def action_same_error(self) -> None:
        letter = self.current()
        if letter is None:
            return
        text = f"flow:{letter.flow} error:{letter.error_type}" if letter.error_type else f"flow:{letter.flow}"
        self.set_filter(Filter(flow=letter.flow, error=letter.error_type, text=text))

    def targets(self) -> list[int]:
        if self.selected:
            return sorted(self.selected)
        letter = self.current()
        return [letter.id] if letter else []

    # -- actions -----------------------------------------------------------------------------------------------

    def action_retry_one(self) -> None:
        letter = self.current()
        if letter is None:
            self.notify("no dead letter here", severity="warning")
            return
        self.confirm("Retry dead letter", f"Retry job {letter.id} ({letter.flow}, {letter.error_type})?\n"
                      "It goes back to pending with its attempts reset.", "Retry",
                      lambda: self.ask(RetryJobs([letter.id])))

    def action_retry_selected(self) -> None:
        ids = self.targets()
        if not ids:
            self.notify("nothing selected (space selects)", severity="warning")
            return
        self.confirm("Retry dead letters", f"Retry {len(ids)} selected dead letter(s)?\n"
                      f"Jobs: {fmt.id_list(ids)}", "Retry", lambda: self.ask(RetryJobs(ids)))

    def action_retry_all(self) -> None:
        page = self.page
        if page is None:
            return
        wanted = self.filter
        if wanted.words or wanted.newer_than is not None:
            ids = [d.id for d in self.visible()]
            if not ids:
                self.notify("no dead letter matches the filter", severity="warning")
                return
            self.confirm("Retry all matching", f"Retry the {len(ids)} dead letter(s) shown?\n"
                          "(free text and age:< are applied by the console, so exactly the rows listed)",
                          "Retry", lambda: self.ask(RetryJobs(ids)))
            return
        where = self.where()
        count = self._matching_count()
        if where.is_empty():
            self.confirm("Retry ALL dead letters", f"Retry every dead letter ({count})?", "Retry all",
                          lambda: self.ask(RetryMatching(where)))
            return
        self.confirm("Retry all matching", f"Retry every dead letter matching `{wanted.describe()}` ({count})?",
                      "Retry", lambda: self.ask(RetryMatching(where)))

    def _matching_count(self) -> str:
        page = self.page
        assert page is not None
        if self.filter.older_than is None:
            total = sum(int(g["count"]) for g in page.by_error
                        if (not self.filter.flow or g["flow"] == self.filter.flow)
                        and (not self.filter.error or g["error_type"] == self.filter.error))
            return f"{total:,}"
        shown = len(page.letters)
        return f"{shown:,} or more" if shown >= page.limit else f"{shown:,}"

    def action_purge_selected(self) -> None:
        ids = self.targets()
        if not ids:
            self.notify("nothing selected (space selects)", severity="warning")
            return
        self.confirm("Purge dead letters", f"Delete {len(ids)} dead letter(s) for good?\nJobs: {fmt.id_list(ids)}",
                      "Purge", lambda: self.ask(PurgeJobs(ids)))

    def action_purge_older(self) -> None:
        def got_days(value: str | None) -> None:
            if value is None:
                return
            try:
                days = float(value)
                if days < 0:
                    raise ValueError
            except ValueError:
                self.notify(f"not a number of days: {value!r}", severity="error")
                return
            where = DeadLetterFilter(flow=self.filter.flow, error_type=self.filter.error, older_than=days * DAY)
            scope = " ".join(p for p in (f"flow:{self.filter.flow}" if self.filter.flow else "",
                                         f"error:{self.filter.error}" if self.filter.error else "") if p)
            self.confirm("Purge old dead letters",
                          f"Delete every dead letter older than {days:g} day(s){' matching ' + scope if scope else ''}"
                          " for good?", "Purge", lambda: self.ask(PurgeMatching(where)))

        self.app.push_screen(PromptScreen("Purge dead letters older than how many days?", "days", "7",
                                          hint="Enter: next (asks again before deleting) · Esc: cancel"), got_days)

    def chosen(self, table: DataTable[Any], key: str) -> None:
        if table.id == "groups":  # a group: its letters
            flow, error = key.split("\x00", 1)
            self.set_filter(Filter(flow=flow, error=error, text=f"flow:{flow} error:{error}"))
            return
        super().chosen(table, key)
