"""The table views' shared shape.

`TableScreen`: titled tables, each under its title line (`#ID-title`), the last one the main one
(focused at mount, its cursor the row the actions work on, Enter on it opens the row's job); the
cursor stays on the same row across refreshes (`sync_rows`), and the view redraws only when what it
shows changed. `PagedScreen`: a TableScreen showing a page it asks the app to read off the UI thread
(a `Load` intent), read again on the changes the view follows while shown, on resume, and after an
action; a failed read is said on the title line, an empty database too (`EMPTY`).

A view states what is its own: its tables and columns, its read (`load()`), how a row looks
(`rows()`), its counts (`summary()`), its keys and actions.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, ClassVar, Generic, TypeVar

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from console.messages import ActionDone, Load, OpenJob, PageFailed, PageLoaded
from console.screens.base import ConsoleScreen
from console.widgets.tables import Table, sync_rows

Columns = tuple[tuple[str, str], ...]  # (column key, label)
Row = tuple[str, Sequence[Any]]  # (row key, cells)
PageT = TypeVar("PageT")
ItemT = TypeVar("ItemT")


class TableScreen(ConsoleScreen):
    NAME: ClassVar[str] = ""  # the title line's first word(s)
    TABLES: ClassVar[tuple[tuple[str, Columns], ...]] = ()  # (id, columns), top to bottom; the last is the main one
    REDRAW_ON: ClassVar[frozenset[str]] = frozenset({"all"})  # the changes (update_view) that may redraw it

    def __init__(self) -> None:
        super().__init__()
        self._drawn: tuple[object, ...] | None = None

    def body(self) -> ComposeResult:
        for table_id, _ in self.TABLES:
            yield Static("", id=f"{table_id}-title", classes="title")
            yield Table(id=table_id, cursor_type="row")

    def prepare(self) -> None:
        for table_id, columns in self.TABLES:
            self.query_one(f"#{table_id}", DataTable).add_columns(*[(label, key) for key, label in columns])
        self.main_table().focus()

    def main_table(self) -> DataTable[Any]:
        return self.query_one(f"#{self.TABLES[-1][0]}", DataTable)

    def update_view(self, changed: set[str]) -> None:
        if not (self.REDRAW_ON & changed):
            return
        drawn = self.drawn_key()
        if drawn == self._drawn:
            return  # nothing new: resuming the screen costs nothing
        self._drawn = drawn
        self.draw()

    def drawn_key(self) -> tuple[object, ...]:
        """What the drawing depends on: the view is drawn again only when this changes."""
        raise NotImplementedError

    def draw(self) -> None:
        raise NotImplementedError

    def show_title(self, summary: Text, table_id: str | None = None) -> None:
        """`NAME summary  filter: ...` on the title line of `table_id` (the main table's by default). Build a
        summary of several parts with `Text().append(...)`: a Text's own style would cover every part."""
        title = Text(f"{self.NAME} ", style="bold")
        title.append_text(summary)
        title.append(self.filter_label(), style="bold")
        self.query_one(f"#{table_id or self.TABLES[-1][0]}-title", Static).update(title)

    def job_of(self, key: str) -> int | None:
        """The job a main-table row opens on Enter (None: nothing to open)."""
        return None

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self.chosen(event.data_table, str(event.row_key.value))

    def chosen(self, table: DataTable[Any], key: str) -> None:
        """Enter on a row: a main-table row opens its job, if it has one."""
        job_id = self.job_of(key) if table is self.main_table() else None
        if job_id is not None:
            self.ask(OpenJob(job_id))


class PagedScreen(TableScreen, Generic[PageT, ItemT]):
    LIVE: ClassVar[frozenset[str]] = frozenset()  # changes (update_view) after which the page is read again while shown
    EMPTY: ClassVar[str] = ""  # the title line when the page lists nothing and no filter is set

    def __init__(self) -> None:
        super().__init__()
        self.page: PageT | None = None
        self.error: str | None = None  # why the page could not be read (or asked for)
        self.loaded_at = 0.0  # monotonic time of the page
        self.stale = False  # something changed while the view was hidden: read again when shown
        self.asked_at: float | None = None  # monotonic time of the read asked for, until its answer

    # -- the page -------------------------------------------------------------------------------------

    def load(self) -> Load | None:
        """The read this view needs now; None when it cannot ask (then `self.error` says why)."""
        raise NotImplementedError

    def items(self, page: PageT) -> Sequence[ItemT]:
        """Everything the page holds, before the console's own filtering."""
        raise NotImplementedError

    def listed(self) -> Sequence[ItemT]:
        """The items of the page read (none before the first)."""
        return self.items(self.page) if self.page is not None else ()

    def key_of(self, item: ItemT) -> str:
        """The main-table row key of an item."""
        raise NotImplementedError

    def matches(self, item: ItemT) -> bool:
        """The part of the filter the console applies (the rest went into the read)."""
        return True

    def visible(self) -> list[ItemT]:
        return [item for item in self.listed() if self.matches(item)]

    def current(self) -> ItemT | None:
        """The item under the main table's cursor."""
        key = self.cursor_key(self.main_table())
        return next((item for item in self.listed() if self.key_of(item) == key), None) if key is not None else None

    def begin(self) -> None:
        self.reload()

    def resumed(self) -> None:
        if self.awaiting():
            return  # the answer on its way is as fresh (Textual resumes a new mode's screen twice)
        if self.LIVE or self.stale or time.monotonic() - self.loaded_at > self.console.refresh_interval:
            self.call_after_refresh(self.reload)

    def awaiting(self) -> bool:
        """A read was asked for and not answered yet (for at most a refresh interval: an answer lost to a
        crash does not stop the reads)."""
        return self.asked_at is not None and time.monotonic() - self.asked_at < self.console.refresh_interval

    def reload(self) -> None:
        self.stale = False
        intent = self.load()
        if intent is None:
            self.page = None
            self.update_view({"all"})
            return
        self.asked_at = time.monotonic()
        self.ask(intent)

    def on_page_loaded(self, message: PageLoaded) -> None:
        if message.intent != self.load():
            return  # the answer to an older question (another filter) arrived late
        self.page = message.page
        self.loaded_at = time.monotonic()
        self.asked_at = None
        self.error = None
        self.page_loaded()
        self.update_view({"all"})

    def page_loaded(self) -> None:
        """A new page arrived (before it is drawn)."""

    def on_page_failed(self, message: PageFailed) -> None:
        if message.intent == self.load():
            self.asked_at = None
            self.error = f"(cannot read: {message.error})"
            self.update_view({"all"})

    def on_action_done(self, message: ActionDone) -> None:
        self.after_action(message)

    def after_action(self, message: ActionDone) -> None:
        """An action this view asked for is done: read again."""
        self.reload()

    # -- drawing ----------------------------------------------------------------------------------------

    def update_view(self, changed: set[str]) -> None:
        if self.LIVE & changed and self.is_current:
            self.reload()
        super().update_view(changed)

    def drawn_key(self) -> tuple[object, ...]:
        return (id(self.page), self.error, self.filter, self.console.read_only)

    def rows(self, page: PageT, shown: list[ItemT]) -> list[Row]:
        """The main table's rows for the items shown."""
        raise NotImplementedError

    def summary(self, page: PageT, shown: list[ItemT]) -> Text:
        """The title line's counts."""
        raise NotImplementedError

    def draw(self) -> None:
        page = self.page
        if page is None:  # not read yet, or it cannot be asked for: nothing stale stays listed
            for table_id, _ in self.TABLES:
                sync_rows(self.query_one(f"#{table_id}", DataTable), [])
            self.show_title(Text(self.error, style="bold red") if self.error else Text("(loading…)", style="dim"))
            return
        shown = self.visible()
        sync_rows(self.main_table(), self.rows(page, shown))
        if self.error is not None:  # the rows are the last page read
            self.show_title(Text(self.error, style="bold red"))
        elif self.EMPTY and self.filter.empty and not self.items(page):
            self.show_title(Text(self.EMPTY, style="dim"))
        else:
            self.show_title(self.summary(page, shown))
