"""What the screens share. `BaseScreen`: the status header, the key bar, the way to ask the app for
something (`ask`: an intent message, answered to this screen), the confirmation before an action, the
keys read-only mode hides (`WriteBinding`). `ConsoleScreen`: a main screen (one key away), with the `/`
filter line. The table views build on these in console/screens/listing.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Input

from console.filters import Filter, FilterError, parse_filter
from console.messages import Intent, UseFilter
from console.screens.modals import ConfirmScreen
from console.widgets.header import StatusHeader, refresh_header
from console.widgets.keybar import KeyBar

if TYPE_CHECKING:
    from console.app import ConsoleApp


@dataclass(frozen=True)
class WriteBinding(Binding):
    """A key whose action writes to the database: read-only mode does not offer it (not in the key bar,
    not in `?`, and the key does nothing)."""


class FilterInput(Input):
    """The `/` line: qualifiers (flow:, error:, status:, age:) and free text. Esc closes it."""

    BINDINGS = [Binding("escape", "close", "Close filter", show=False)]

    def action_close(self) -> None:
        screen = cast("ConsoleScreen", self.screen)
        screen.close_filter()


class BaseScreen(Screen[None]):
    """A screen with the status header and the key bar. It reads data from the app (state, clock,
    theme) and asks for everything else with `ask()`."""

    def __init__(self) -> None:
        super().__init__()
        self.ready = False  # composed and mounted: the app may redraw it

    @property
    def console(self) -> "ConsoleApp":
        """The app, to read from (state, now(), tz, read_only): what to do goes through `ask()`."""
        return cast("ConsoleApp", self.app)

    def ask(self, intent: Intent) -> None:
        """Post an intent; it bubbles to the app, whose answer (a result message) comes back here."""
        intent.origin = self
        self.post_message(intent)

    def update_header(self) -> None:
        refresh_header(self, self.console.header_text(), self.console.database_down)

    def update_view(self, changed: set[str]) -> None:
        """Redraw what `changed` touches ('all', 'snapshot', 'counts', 'failures', 'dead', ...)."""

    @classmethod
    def write_actions(cls) -> frozenset[str]:
        """The actions of this screen's `WriteBinding`s (names without their arguments)."""
        return frozenset(b.action.split("(")[0] for b in cls.BINDINGS if isinstance(b, WriteBinding))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return self.console.check_write(action)

    def confirm(self, title: str, body: str, label: str, then: Callable[[], object], *, danger: bool = True,
                declined: str = "cancelled: nothing changed") -> None:
        """Ask in a modal; `then()` only on yes (`declined` is said otherwise)."""
        def answered(yes: bool | None) -> None:
            if yes:
                then()
            else:
                self.notify(declined, timeout=3)

        self.app.push_screen(ConfirmScreen(title, body, label, danger=danger), answered)


class ConsoleScreen(BaseScreen):
    """A main screen (one key away). Subclasses compose `body()` and implement `update_view()`."""

    FILTER_HINT = "flow:NAME error:TYPE status:S age:>1h  free text"
    BINDINGS = [
        Binding("slash", "filter", "Filter", id="skiplock.filter"),
        Binding("escape", "clear_filter", "Clear filter", show=False, id="skiplock.clear_filter"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.filter = Filter()

    def compose(self) -> ComposeResult:
        yield StatusHeader(id="status")
        yield from self.body()
        yield FilterInput(placeholder=f"filter: {self.FILTER_HINT}", id="filter")
        yield KeyBar()

    def body(self) -> ComposeResult:
        return iter(())

    # Textual runs the handler (on_mount, on_screen_resume, on_...) of every class in the MRO: a
    # subclass extends these through the hooks below, never by defining the handler again.
    def on_mount(self) -> None:
        self.prepare()
        line = self.query_one("#filter", FilterInput)
        line.display = False
        line.cursor_blink = not self.console.fixed_clock  # snapshots: nothing moves
        self.ready = True
        self.update_header()
        self.update_view({"all"})
        self.begin()

    def prepare(self) -> None:
        """Before the first draw (the tables' columns, the focus)."""

    def begin(self) -> None:
        """After the first draw (the first read)."""

    def on_screen_resume(self) -> None:
        if not self.ready:
            return
        # Paint what the screen showed last time at once (the key's answer), then bring it up to date.
        self.update_header()
        self.call_after_refresh(self.update_view, {"all"})
        self.resumed()

    def resumed(self) -> None:
        """Shown again (after the first time)."""

    def on_use_filter(self, message: UseFilter) -> None:
        if self.ready:
            self.set_filter(message.filter)
        else:
            self.filter = message.filter  # on_mount draws (and reads) with it

    # -- filter -------------------------------------------------------------------------------------

    def action_filter(self) -> None:
        line = self.query_one("#filter", FilterInput)
        line.value = self.filter.text
        line.display = True
        line.focus()

    def close_filter(self) -> None:
        line = self.query_one("#filter", FilterInput)
        line.display = False
        self.focus_main()

    def focus_main(self) -> None:
        tables = self.query(DataTable)
        if tables:
            tables.first().focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "filter":
            return
        event.stop()
        try:
            self.set_filter(parse_filter(event.value))
        except FilterError as exc:
            self.notify(str(exc), title="Filter", severity="error")
            return
        self.close_filter()

    def set_filter(self, new: Filter) -> None:
        self.filter = new
        self.filter_changed()

    def filter_changed(self) -> None:
        self.update_view({"all"})

    def action_clear_filter(self) -> None:
        if not self.filter.empty:
            self.set_filter(Filter())

    def filter_label(self) -> str:
        return f"  filter: {self.filter.describe()}" if not self.filter.empty else ""

    # -- helpers ----------------------------------------------------------------------------------

    @staticmethod
    def cursor_key(table: DataTable[Any]) -> str | None:
        if table.row_count == 0:
            return None
        try:
            row_key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
        except Exception:  # the cursor sits past the end after rows were removed
            return None
        return None if row_key.value is None else str(row_key.value)
