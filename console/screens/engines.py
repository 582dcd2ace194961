"""Engines: every engine of the fleet (host, pid, version, workers, flows, started, state, heartbeat),
gone ones flagged; scale (+ / - / w: a worker count), drain (r) and stop (x), each confirmed and
hidden in read-only mode. Read again on every snapshot while shown."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from console import format as fmt
from console.data import EnginePage
from console.messages import ActionDone, EngineCommand, EnginesFailed, EnginesLoaded, LoadEngines
from console.screens.base import ConsoleScreen
from console.screens.modals import ConfirmScreen, PromptScreen
from console.widgets.tables import Table, sync_rows
from engine.control import SHORT_ID
from engine.limits import MAX_WORKERS
from engine.store import EngineRow

COLUMNS = (("id", "Engine"), ("host", "Host"), ("pid", "PID"), ("version", "Version"), ("workers", "Workers"),
           ("flows", "Flows"), ("started", "Started"), ("state", "State"), ("beat", "Heartbeat"))


class EnginesScreen(ConsoleScreen):
    FILTER_HINT = "status:running|draining|gone|stopped  free text (host, flow, id)"
    BINDINGS = [
        Binding("plus", "scale_by(1)", "Worker +1", id="skiplock.engines.scale_up"),
        Binding("minus", "scale_by(-1)", "Worker -1", id="skiplock.engines.scale_down"),
        Binding("n", "scale_to", "Scale to…", id="skiplock.engines.scale"),
        Binding("r", "drain_engine", "Drain", id="skiplock.engines.drain"),
        Binding("x", "stop_engine", "Stop", id="skiplock.engines.stop"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.page: EnginePage | None = None
        self.error: str | None = None
        self._drawn: tuple[object, ...] | None = None

    def body(self) -> ComposeResult:
        yield Static("", id="engines-title", classes="title")
        yield Table(id="engines", cursor_type="row")

    def on_mount(self) -> None:
        self.query_one("#engines", DataTable).add_columns(*[(label, key) for key, label in COLUMNS])
        self.query_one("#engines", DataTable).focus()
        super().on_mount()
        self.reload()

    def on_screen_resume(self) -> None:
        super().on_screen_resume()
        if self.ready:
            self.reload()

    # -- data -----------------------------------------------------------------------------------------

    def reload(self) -> None:
        self.ask(LoadEngines())

    def on_engines_loaded(self, message: EnginesLoaded) -> None:
        self.page = message.page
        self.error = None
        self.update_view({"all"})

    def on_engines_failed(self, message: EnginesFailed) -> None:
        self.error = message.error
        self.update_view({"all"})

    def on_action_done(self, message: ActionDone) -> None:
        self.reload()

    def visible(self) -> list[EngineRow]:
        if self.page is None:
            return []
        wanted = self.filter
        return [e for e in self.page.engines
                if (not wanted.status or e.state == wanted.status)
                and (not wanted.flow or wanted.flow in e.flows)
                and wanted.matches_text(e.id, e.host, " ".join(e.flows), e.version)]

    # -- drawing ------------------------------------------------------------------------------------------

    def update_view(self, changed: set[str]) -> None:
        if "snapshot" in changed and self.is_current:
            self.reload()  # engines are not part of the snapshot: read them at its pace
        if "all" not in changed:
            return
        page = self.page
        drawn = (id(page), self.error, self.filter, self.console.read_only)
        if drawn == self._drawn:
            return
        self._drawn = drawn
        title = Text("Engines ", style="bold")
        if page is None:
            title.append(f"(cannot read: {self.error})" if self.error else "(loading…)", style="dim")
            self.query_one("#engines-title", Static).update(title)
            return
        theme = self.console.current_theme
        styles = {"running": theme.success or "green", "draining": f"bold {theme.warning or 'yellow'}",
                  "stopping": f"bold {theme.warning or 'yellow'}", "gone": f"bold {theme.error or 'red'}",
                  "stopped": "dim"}
        now = self.console.now()
        shown = self.visible()
        rows = []
        for e in shown:
            started = e.started_at.timestamp()
            rows.append((e.id, [
                Text(e.id[:SHORT_ID], style="bold"), e.host, str(e.pid), e.version, str(e.workers),
                fmt.DASH if not e.flows else ", ".join(e.flows),
                f"{fmt.when(started, now, self.console.tz)}",
                Text(e.state, style=styles.get(e.state, "")),
                f"{fmt.age(e.heartbeat_age)} ago",
            ]))
        sync_rows(self.query_one("#engines", DataTable), rows)
        live = sum(1 for e in page.engines if e.state in ("running", "draining", "stopping"))
        gone = sum(1 for e in page.engines if e.state == "gone")
        text = f"{live} live, {sum(e.workers for e in page.engines if e.state == 'running')} worker(s)"
        if gone:
            text += f", {gone} gone"
        if len(shown) != len(page.engines):
            text += f", {len(shown)} shown"
        title.append(text, style="dim")
        title.append(self.filter_label(), style="bold")
        self.query_one("#engines-title", Static).update(title)

    # -- actions ------------------------------------------------------------------------------------------

    def current(self) -> EngineRow | None:
        key = self.cursor_key(self.query_one("#engines", DataTable))
        if key is None or self.page is None:
            return None
        return next((e for e in self.page.engines if e.id == key), None)

    def _target(self) -> EngineRow | None:
        engine = self.current()
        if engine is None:
            self.notify("no engine here", severity="warning")
            return None
        if engine.state != "running":
            self.notify(f"engine {engine.id[:SHORT_ID]} is {engine.state}: it takes no commands", severity="warning")
            return None
        return engine

    def _confirm(self, engine: EngineRow, title: str, body: str, label: str, command: str,
                 workers: int | None = None, danger: bool = True) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.ask(EngineCommand(engine.id, command, workers))
            else:
                self.notify("cancelled: nothing sent", timeout=3)

        self.app.push_screen(ConfirmScreen(title, body, label, danger=danger), answered)

    def _scale(self, engine: EngineRow, workers: int) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            self.notify(f"workers must be from 1 to {MAX_WORKERS}, not {workers}", severity="error")
            return
        self._confirm(engine, "Scale engine", f"Scale engine {engine.id[:SHORT_ID]} on {engine.host} from "
                      f"{engine.workers} to {workers} worker(s)?", "Scale", "scale", workers, danger=False)

    def action_scale_by(self, step: int) -> None:
        engine = self._target()
        if engine is not None:
            self._scale(engine, engine.workers + step)

    def action_scale_to(self) -> None:
        engine = self._target()
        if engine is None:
            return

        def got(value: str | None) -> None:
            if not value:
                return
            try:
                workers = int(value.strip())
            except ValueError:
                self.notify(f"not a worker count: {value!r}", severity="error")
                return
            self._scale(engine, workers)

        self.app.push_screen(PromptScreen(f"Scale engine {engine.id[:SHORT_ID]}", "workers",
                                          hint=f"1 to {MAX_WORKERS}; now {engine.workers}"), got)

    def action_drain_engine(self) -> None:
        engine = self._target()
        if engine is not None:
            self._confirm(engine, "Drain engine", f"Drain engine {engine.id[:SHORT_ID]} on {engine.host}?\n"
                          "It stops claiming, finishes the jobs it holds, and exits.", "Drain", "drain")

    def action_stop_engine(self) -> None:
        engine = self._target()
        if engine is not None:
            self._confirm(engine, "Stop engine", f"Stop engine {engine.id[:SHORT_ID]} on {engine.host} now?\n"
                          "Its workers are killed; the jobs they run go back to pending and run again.",
                          "Stop", "stop")
