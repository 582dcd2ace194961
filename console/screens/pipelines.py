"""Pipelines (8/l): each pipeline (flows linked by `next`, or by parent -> child jobs) as its stages top
to bottom, with pending, scheduled, claimed and dead jobs and completions per second per stage.

Its own view rather than a section of the overview: a document pipeline of seed 004 is eight stages,
which would push the overview's flows and workers off the screen, and an operator watching a
pipeline wants the stages in order, not the flows alphabetically. Read again on every snapshot."""

from __future__ import annotations

from rich.text import Text

from console.messages import LoadPipelines
from console.screens.listing import PagedScreen, Row
from engine.pipelines import Pipeline

COLUMNS = (("pipeline", "Pipeline"), ("stage", "Stage"), ("pending", "Pending"), ("scheduled", "Scheduled"),
           ("running", "Claimed"), ("dead", "Dead"), ("rate", "Done/s"))


class PipelinesScreen(PagedScreen[list[Pipeline], Pipeline]):
    NAME = "Pipelines"
    TABLES = (("pipelines", COLUMNS),)
    LIVE = frozenset({"snapshot"})
    EMPTY = ("none yet: flows become a pipeline once one names another in `next`, or a job's ack hands off "
             "with Next(...)")
    FILTER_HINT = "flow:NAME  free text"

    def load(self) -> LoadPipelines:
        return LoadPipelines()

    def items(self, page: list[Pipeline]) -> list[Pipeline]:
        return page

    def matches(self, item: Pipeline) -> bool:
        wanted = self.filter
        return ((not wanted.flow or any(s.flow == wanted.flow for s in item.stages))
                and wanted.matches_text(*(s.flow for s in item.stages)))

    def rows(self, page: list[Pipeline], shown: list[Pipeline]) -> list[Row]:
        theme = self.console.current_theme
        rows: list[Row] = []
        for pipeline in shown:
            for index, stage in enumerate(pipeline.stages):
                rows.append((f"{pipeline.name}/{stage.flow}", [
                    Text(pipeline.name, style="bold") if index == 0 else "",
                    ("  " * min(index, 1) + "↳ " if index else "") + stage.flow,
                    str(stage.pending), str(stage.scheduled), str(stage.running),
                    Text(str(stage.dead), style=f"bold {theme.error or 'red'}" if stage.dead else ""),
                    f"{stage.done_per_s:.1f}",
                ]))
        return rows

    def summary(self, page: list[Pipeline], shown: list[Pipeline]) -> Text:
        return Text(f"{len(page)} pipeline(s), stages top to bottom", style="dim")
