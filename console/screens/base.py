"""What the screens share. `BaseScreen`: the status header, the key bar, the way to ask the app for
something (`ask`: an intent message, answered to this screen). `ConsoleScreen`: a main screen (one key
away), with the `/` filter line."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Input

from console.filters import Filter, FilterError, parse_filter
from console.messages import Intent, UseFilter
from console.widgets.header import StatusHeader, refresh_header
from console.widgets.keybar import KeyBar

if TYPE_CHECKING:
    from console.app import ConsoleApp


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

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return self.console.check_write(action)


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

    def on_mount(self) -> None:
        line = self.query_one("#filter", FilterInput)
        line.display = False
        line.cursor_blink = not self.console.fixed_clock  # snapshots: nothing moves
        self.ready = True
        self.update_header()
        self.update_view({"all"})

    def on_screen_resume(self) -> None:
        if not self.ready:
            return
        # Paint what the screen showed last time at once (the key's answer), then bring it up to date.
        self.update_header()
        self.call_after_refresh(self.update_view, {"all"})

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
