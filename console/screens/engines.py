"""Engines: every engine of the fleet (host, pid, version, workers, flows, started, state, heartbeat),
gone ones flagged; scale (+ / - / n: a worker count), drain (r) and stop (x), each confirmed and
hidden in read-only mode. Read again on every snapshot while shown."""

from __future__ import annotations

from rich.text import Text

from console import format as fmt
from console.data import EnginePage
from console.messages import EngineCommand, LoadEngines
from console.screens.base import WriteBinding
from console.screens.listing import PagedScreen, Row
from console.screens.modals import PromptScreen
from engine.control import SHORT_ID
from engine.limits import MAX_WORKERS
from engine.store import EngineRow

COLUMNS = (("id", "Engine"), ("host", "Host"), ("pid", "PID"), ("version", "Version"), ("workers", "Workers"),
           ("flows", "Flows"), ("started", "Started"), ("state", "State"), ("beat", "Heartbeat"))


class EnginesScreen(PagedScreen[EnginePage, EngineRow]):
    NAME = "Engines"
    TABLES = (("engines", COLUMNS),)
    LIVE = frozenset({"snapshot"})  # engines are not part of the snapshot: read them at its pace
    EMPTY = "none yet: an engine appears here once it starts (`engine run`)"
    FILTER_HINT = "status:running|draining|gone|stopped  free text (host, flow, id)"
    BINDINGS = [
        WriteBinding("plus", "scale_by(1)", "Worker +1", id="skiplock.engines.scale_up"),
        WriteBinding("minus", "scale_by(-1)", "Worker -1", id="skiplock.engines.scale_down"),
        WriteBinding("n", "scale_to", "Scale to…", id="skiplock.engines.scale"),
        WriteBinding("r", "drain_engine", "Drain", id="skiplock.engines.drain"),
        WriteBinding("x", "stop_engine", "Stop", id="skiplock.engines.stop"),
    ]

    def load(self) -> LoadEngines:
        return LoadEngines()

    def items(self, page: EnginePage) -> list[EngineRow]:
        return page.engines

    def key_of(self, item: EngineRow) -> str:
        return item.id

    def matches(self, item: EngineRow) -> bool:
        wanted = self.filter
        return ((not wanted.status or item.state == wanted.status) and (not wanted.flow or wanted.flow in item.flows)
                and wanted.matches_text(item.id, item.host, " ".join(item.flows), item.version))

    def rows(self, page: EnginePage, shown: list[EngineRow]) -> list[Row]:
        theme = self.console.current_theme
        styles = {"running": theme.success or "green", "draining": f"bold {theme.warning or 'yellow'}",
                  "stopping": f"bold {theme.warning or 'yellow'}", "gone": f"bold {theme.error or 'red'}",
                  "stopped": "dim"}
        now = self.console.now()
        return [(e.id, [
            Text(e.id[:SHORT_ID], style="bold"), e.host, str(e.pid), e.version, str(e.workers),
            fmt.DASH if not e.flows else ", ".join(e.flows),
            f"{fmt.when(e.started_at.timestamp(), now, self.console.tz)}",
            Text(e.state, style=styles.get(e.state, "")),
            f"{fmt.age(e.heartbeat_age)} ago",
        ]) for e in shown]

    def summary(self, page: EnginePage, shown: list[EngineRow]) -> Text:
        live = sum(1 for e in page.engines if e.state in ("running", "draining", "stopping"))
        gone = sum(1 for e in page.engines if e.state == "gone")
        text = f"{live} live, {sum(e.workers for e in page.engines if e.state == 'running')} worker(s)"
        if gone:
            text += f", {gone} gone"
        if len(shown) != len(page.engines):
            text += f", {len(shown)} shown"
        return Text(text, style="dim")

    # -- actions ------------------------------------------------------------------------------------------

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
        self.confirm(title, body, label, lambda: self.ask(EngineCommand(engine.id, command, workers)), danger=danger,
                     declined="cancelled: nothing sent")

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
