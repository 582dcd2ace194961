"""Plain-text and JSON output for people: the tables and the queue status that `engine status`,
`engine dev` and the examples print. No argument parsing here; the CLIs call these."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

import orjson

if TYPE_CHECKING:  # annotations only: `engine run` imports this module and needs neither
    from engine.pipelines import Pipeline
    from engine.queue import Queue


def print_json(value: Any, out: TextIO | None = None) -> None:
    (out or sys.stdout).write(orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO | None = None) -> None:
    stream = out or sys.stdout
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        stream.write("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip() + "\n")


def print_status(queue: Queue, *, flow: str | None = None, as_json: bool = False, out: TextIO | None = None) -> None:
    """Counts by flow (one flow with `flow`) and a TOTAL row, or the whole status as JSON."""
    status = queue.get_queue_status(flow)
    lines = [] if flow is not None else queue.pipelines()
    if as_json:
        print_json({**status, "pipelines": [p.to_dict() for p in lines]} if lines else status, out)
        return
    rows = [(name, c["pending"] - c["scheduled"], c["scheduled"], c["processing"], c["completed"], c["failed"],
             c["cancelled"], "yes" if c["paused"] else "")
            for name, c in status["by_flow"].items()]
    rows.append(("TOTAL", status["pending_records"] - status["scheduled_records"], status["scheduled_records"],
                 status["processing_records"], status["completed_records"], status["failed_records"],
                 status["cancelled_records"], ""))
    # "claimed", not "running": a worker claims a batch, so most of its claimed jobs wait their turn in it.
    print_table(("flow", "pending", "scheduled", "claimed", "completed", "dead", "cancelled", "paused"), rows, out)
    for pipeline in lines:
        print_pipeline(pipeline, out)


def print_pipeline(pipeline: Pipeline, out: TextIO | None = None) -> None:
    """One pipeline: its stages top to bottom, each with its counts and completions per second."""
    stream = out or sys.stdout
    stream.write(f"\npipeline {pipeline.name}\n")
    rows = [(("  " if i else "") + ("-> " if i else "") + s.flow, s.pending, s.scheduled, s.running, s.dead,
             f"{s.done_per_s:.1f}") for i, s in enumerate(pipeline.stages)]
    print_table(("stage", "pending", "scheduled", "claimed", "dead", "done/s"), rows, stream)


def clip(text: str | None, width: int) -> str:
    """One line of at most `width` characters, with an ellipsis when cut."""
    if not text:
        return ""
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"
