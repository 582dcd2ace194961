"""Pipelines (8/l): each pipeline (flows linked by `next`, or by parent -> child jobs) as its stages top
to bottom, with pending, scheduled, claimed and dead jobs and completions per second per stage.

Its own view rather than a section of the overview: a document pipeline of seed 004 is eight stages,
which would push the overview's flows and workers off the screen, and an operator watching a
pipeline wants the stages in order, not the flows alphabetically. Read again on every snapshot."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from console.messages import LoadPipelines, PipelinesFailed, PipelinesLoaded
from console.screens.base import ConsoleScreen
from console.widgets.tables import Table, sync_rows
from engine.pipelines import Pipeline

COLUMNS = (("pipeline", "Pipeline"), ("stage", "Stage"), ("pending", "Pending"), ("scheduled", "Scheduled"),
           ("running", "Claimed"), ("dead", "Dead"), ("rate", "Done/s"))


class PipelinesScreen(ConsoleScreen):
    FILTER_HINT = "flow:NAME  free text"

    def __init__(self) -> None:
        super().__init__()
        self.pipelines: list[Pipeline] | None = None
        self.error: str | None = None
        self._drawn: tuple[object, ...] | None = None

    def body(self) -> ComposeResult:
        yield Static("", id="pipelines-title", classes="title")
        yield Table(id="pipelines", cursor_type="row")

    def on_mount(self) -> None:
        self.query_one("#pipelines", DataTable).add_columns(*[(label, key) for key, label in COLUMNS])
        self.query_one("#pipelines", DataTable).focus()
        super().on_mount()
        self.reload()

    def on_screen_resume(self) -> None:
        super().on_screen_resume()
        if self.ready:
            self.reload()

    def reload(self) -> None:
        self.ask(LoadPipelines())

    def on_pipelines_loaded(self, message: PipelinesLoaded) -> None:
        self.pipelines = message.pipelines
        self.error = None
        self.update_view({"all"})

    def on_pipelines_failed(self, message: PipelinesFailed) -> None:
        self.error = message.error
        self.update_view({"all"})

    def visible(self) -> list[Pipeline]:
        wanted = self.filter
        return [p for p in self.pipelines or []
                if (not wanted.flow or any(s.flow == wanted.flow for s in p.stages))
                and wanted.matches_text(*(s.flow for s in p.stages))]

    def update_view(self, changed: set[str]) -> None:
        if "snapshot" in changed and self.is_current:
            self.reload()
        if not ({"all"} & changed):
            return
        drawn = (id(self.pipelines), self.error, self.filter)
        if drawn == self._drawn:
            return
        self._drawn = drawn
        title = Text("Pipelines ", style="bold")
        if self.pipelines is None:
            title.append(f"(cannot read: {self.error})" if self.error else "(loading…)", style="dim")
            self.query_one("#pipelines-title", Static).update(title)
            return
        theme = self.console.current_theme
        shown = self.visible()
        rows = []
        for pipeline in shown:
            for index, stage in enumerate(pipeline.stages):
                rows.append((f"{pipeline.name}/{stage.flow}", [
                    Text(pipeline.name, style="bold") if index == 0 else "",
                    ("  " * min(index, 1) + "↳ " if index else "") + stage.flow,
                    str(stage.pending), str(stage.scheduled), str(stage.running),
                    Text(str(stage.dead), style=f"bold {theme.error or 'red'}" if stage.dead else ""),
                    f"{stage.done_per_s:.1f}",
                ]))
        sync_rows(self.query_one("#pipelines", DataTable), rows)
        if not self.pipelines:
            title.append("none yet: flows become a pipeline once one names another in `next`, or a job's "
                         "ack hands off with Next(...)", style="dim")
        else:
            title.append(f"{len(self.pipelines)} pipeline(s), stages top to bottom", style="dim")
        title.append(self.filter_label(), style="bold")
        self.query_one("#pipelines-title", Static).update(title)
