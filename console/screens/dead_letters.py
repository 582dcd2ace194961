"""Dead letters: counts by error type, the letters themselves, and the operator's retry and purge.

Every action goes through `engine.queue.Queue` (SQL guarded by `status = 'dead'`), asks for
confirmation in a modal, and reports how many rows it changed.
"""

from __future__ import annotations

import time

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.timer import Timer
from textual.widgets import DataTable, Static

from console import format as fmt
from console.data import DeadLetterPage
from console.filters import Filter
from console.messages import (ActionDone, DeadLettersChanged, DeadLettersFailed, DeadLettersLoaded, LoadDeadLetters,
                              OpenJob, PurgeJobs, PurgeMatching, RetryJobs, RetryMatching)
from console.screens.base import ConsoleScreen
from console.screens.modals import ConfirmScreen, PromptScreen
from console.widgets.tables import Table, sync_rows
from engine.queue import DeadLetter, DeadLetterFilter

LETTER_COLUMNS = (("sel", " "), ("id", "Job"), ("flow", "Flow"), ("error", "Error"), ("message", "Message"),
                  ("attempts", "Attempts"), ("died", "Died"), ("age", "Age"))
GROUP_COLUMNS = (("flow", "Flow"), ("error", "Error type"), ("count", "Count"), ("last", "Last"),
                 ("sample", "Latest message"))
DAY = 86400.0
SETTLE_S = 0.5  # after a burst of dead-letter events, read the page once, this long after the first


class DeadLettersScreen(ConsoleScreen):
    FILTER_HINT = "flow:NAME error:TYPE age:>7d age:<1h  free text"
    BINDINGS = [
        Binding("space", "toggle_select", "Select", id="skiplock.dlq.select"),
        Binding("a", "select_all", "Select all", show=False, id="skiplock.dlq.select_all"),
        Binding("e", "same_error", "Same error", show=False, id="skiplock.dlq.same_error"),
        Binding("r", "retry_one", "Retry", id="skiplock.dlq.retry"),
        Binding("R", "retry_selected", "Retry selected", id="skiplock.dlq.retry_selected"),
        Binding("A", "retry_all", "Retry all matching", id="skiplock.dlq.retry_all"),
        Binding("x", "purge_selected", "Purge", id="skiplock.dlq.purge"),
        Binding("X", "purge_older", "Purge older than…", id="skiplock.dlq.purge_older"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.page: DeadLetterPage | None = None
        self.selected: set[int] = set()
        self.error: str | None = None
        self.loaded_at = 0.0  # monotonic time of the page
        self.stale = False  # a dead letter arrived since the page was read
        self._drawn: tuple[object, ...] | None = None
        self._reload_timer: Timer | None = None

    def body(self) -> ComposeResult:
        yield Static("", id="groups-title", classes="title")
        yield Table(id="groups", cursor_type="row")
        yield Static("", id="dead-title", classes="title")
        yield Table(id="dead", cursor_type="row")

    def on_mount(self) -> None:
        self.query_one("#groups", DataTable).add_columns(*[(label, key) for key, label in GROUP_COLUMNS])
        self.query_one("#dead", DataTable).add_columns(*[(label, key) for key, label in LETTER_COLUMNS])
        self.query_one("#dead", DataTable).focus()
        super().on_mount()
        self.reload()

    def on_screen_resume(self) -> None:
        super().on_screen_resume()
        if self.ready and (self.stale or time.monotonic() - self.loaded_at > self.console.refresh_interval):
            self.call_after_refresh(self.reload)

    # -- data -------------------------------------------------------------------------------------------

    def where(self) -> DeadLetterFilter:
        """The part of the filter SQL can apply (flow, error type, older than)."""
        return DeadLetterFilter(flow=self.filter.flow, error_type=self.filter.error,
                                older_than=self.filter.older_than)

    def reload(self) -> None:
        self.stale = False
        self.ask(LoadDeadLetters(self.where()))

    def on_dead_letters_loaded(self, message: DeadLettersLoaded) -> None:
        self.page_loaded(message.page)

    def on_dead_letters_failed(self, message: DeadLettersFailed) -> None:
        if message.where == self.where():
            self.error = message.error

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

    def on_action_done(self, message: ActionDone) -> None:
        self.selected -= set(message.changed)  # type: ignore[arg-type]

    def page_loaded(self, page: DeadLetterPage) -> None:
        if page.where != self.where():
            return  # an older filter's answer arrived late
        self.page = page
        self.loaded_at = time.monotonic()
        self.error = None
        known = {d.id for d in page.letters}
        self.selected &= known
        self.update_view({"all"})

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

    def visible(self) -> list[DeadLetter]:
        if self.page is None:
            return []
        wanted = self.filter
        now = self.age_now()
        letters = []
        for letter in self.page.letters:
            age = now - letter.finished_at.timestamp() if letter.finished_at else None
            if not wanted.matches_age(age):
                continue
            if not wanted.matches_text(letter.id, letter.flow, letter.error_type, letter.error_message, letter.run_id):
                continue
            letters.append(letter)
        return letters

    # -- drawing ------------------------------------------------------------------------------------------

    def update_view(self, changed: set[str]) -> None:
        if not ({"all", "dead"} & changed):
            return
        page = self.page
        now = self.age_now() if page is not None else None
        drawn = (id(page), now, self.filter, frozenset(self.selected), self.console.read_only)
        if drawn == self._drawn:
            return  # nothing to redraw: resuming the screen costs nothing
        self._drawn = drawn
        theme = self.console.current_theme
        tz = self.console.tz
        if page is None:
            self.query_one("#dead-title", Static).update(Text("Dead letters  (loading…)", style="bold"))
            return
        groups = []
        for group in page.by_error:
            if self.filter.error and group["error_type"] != self.filter.error:
                continue
            key = f"{group['flow']}\x00{group['error_type']}"
            groups.append((key, [group["flow"], Text(group["error_type"], style="bold"),
                                 Text(f"{group['count']:,}", style=theme.error or "red"),
                                 fmt.stamp(group["last_at"], tz), fmt.clip(group["sample_message"], 60)]))
        sync_rows(self.query_one("#groups", DataTable), groups)
        self.query_one("#groups", DataTable).styles.height = min(len(groups), 6) + 1
        total = sum(int(g["count"]) for g in page.by_error
                    if not self.filter.error or g["error_type"] == self.filter.error)
        title = Text("By error type ", style="bold")
        title.append(f"{total:,} dead letter(s){' in ' + self.filter.flow if self.filter.flow else ''}", style="dim")
        self.query_one("#groups-title", Static).update(title)

        letters = self.visible()
        rows = []
        for letter in letters:
            age = now - letter.finished_at.timestamp() if letter.finished_at and now is not None else None
            mark = Text("✓", style=f"bold {theme.accent}") if letter.id in self.selected else Text(" ")
            rows.append((str(letter.id), [
                mark, str(letter.id), letter.flow, Text(letter.error_type or "?", style="bold"),
                fmt.clip(letter.error_message, 60),
                f"{letter.attempts} of {letter.max_attempts}" if letter.max_attempts else str(letter.attempts),
                fmt.stamp(letter.finished_at, tz), fmt.age(age),
            ]))
        sync_rows(self.query_one("#dead", DataTable), rows)
        title = Text("Dead letters ", style="bold")
        more = " (list limit; narrow the filter)" if len(page.letters) >= page.limit else ""
        title.append(f"{len(letters):,} shown{more}", style="dim")
        if self.selected:
            title.append(f"  ·  {len(self.selected)} selected", style=f"bold {theme.accent}")
        title.append(self.filter_label(), style="bold")
        self.query_one("#dead-title", Static).update(title)

    # -- selection -----------------------------------------------------------------------------------------

    def current(self) -> DeadLetter | None:
        key = self.cursor_key(self.query_one("#dead", DataTable))
        if key is None or self.page is None:
            return None
        return next((d for d in self.page.letters if str(d.id) == key), None)

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

    def _confirm(self, title: str, body: str, label: str, then: object) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                then()  # type: ignore[operator]
            else:
                self.notify("cancelled: nothing changed", timeout=3)

        self.app.push_screen(ConfirmScreen(title, body, label), answered)

    def action_retry_one(self) -> None:
        letter = self.current()
        if letter is None:
            self.notify("no dead letter here", severity="warning")
            return
        self._confirm("Retry dead letter", f"Retry job {letter.id} ({letter.flow}, {letter.error_type})?\n"
                      "It goes back to pending with its attempts reset.", "Retry",
                      lambda: self.ask(RetryJobs([letter.id])))

    def action_retry_selected(self) -> None:
        ids = self.targets()
        if not ids:
            self.notify("nothing selected (space selects)", severity="warning")
            return
        self._confirm("Retry dead letters", f"Retry {len(ids)} selected dead letter(s)?\n"
                      f"Jobs: {_list_ids(ids)}", "Retry", lambda: self.ask(RetryJobs(ids)))

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
            self._confirm("Retry all matching", f"Retry the {len(ids)} dead letter(s) shown?\n"
                          "(free text and age:< are applied by the console, so exactly the rows listed)",
                          "Retry", lambda: self.ask(RetryJobs(ids)))
            return
        where = self.where()
        count = self._matching_count()
        if where.is_empty():
            self._confirm("Retry ALL dead letters", f"Retry every dead letter ({count})?", "Retry all",
                          lambda: self.ask(RetryMatching(where)))
            return
        self._confirm("Retry all matching", f"Retry every dead letter matching `{wanted.describe()}` ({count})?",
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
        self._confirm("Purge dead letters", f"Delete {len(ids)} dead letter(s) for good?\nJobs: {_list_ids(ids)}",
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
            self._confirm("Purge old dead letters",
                          f"Delete every dead letter older than {days:g} day(s){' matching ' + scope if scope else ''}"
                          " for good?", "Purge", lambda: self.ask(PurgeMatching(where)))

        self.app.push_screen(PromptScreen("Purge dead letters older than how many days?", "days", "7",
                                          hint="Enter: next (asks again before deleting) · Esc: cancel"), got_days)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        key = event.row_key.value
        if key is None:
            return
        if event.data_table.id == "dead":
            self.ask(OpenJob(int(str(key))))
        elif event.data_table.id == "groups":
            flow, error = str(key).split("\x00", 1)
            self.set_filter(Filter(flow=flow, error=error, text=f"flow:{flow} error:{error}"))


def _list_ids(ids: list[int], shown: int = 12) -> str:
    text = ", ".join(str(i) for i in ids[:shown])
    return text + (f" and {len(ids) - shown} more" if len(ids) > shown else "")
