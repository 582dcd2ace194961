"""A throughput chart: completed and failed per second as bars scaled from zero.

Textual's Sparkline scales between the series' own minimum and maximum, which makes a steady
1,000 jobs/s look jagged; a queue chart needs a zero baseline and a labelled axis (as Oban Web's).
The chart asks its `provider` for as many points as it has columns, so every column is real data.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.text import Text
from textual.widget import Widget

from console.format import rate

BLOCKS = " ▁▂▃▄▅▆▇█"
AXIS_WIDTH = 8

Series = tuple[list[float], list[float]]


def bar_rows(values: list[float], height: int, maximum: float) -> list[str]:
    """Rows of block characters, top row first, for values scaled so `maximum` fills `height` rows."""
    eighths = []
    for value in values:
        if value <= 0 or maximum <= 0:
            eighths.append(0)
        else:
            eighths.append(max(1, min(height * 8, round(value / maximum * height * 8))))
    rows = []
    for row in range(height - 1, -1, -1):
        rows.append("".join(BLOCKS[max(0, min(8, n - row * 8))] for n in eighths))
    return rows


class ThroughputChart(Widget):
    """Two panels, completed/s over failed/s, sharing the time axis."""

    DEFAULT_CSS = """
    ThroughputChart { height: 9; }
    """

    def __init__(self, provider: Callable[[int], Series] | None = None, *, window_label: str = "",
                 id: str | None = None) -> None:
        super().__init__(id=id)
        self.provider = provider
        self.window_label = window_label

    def render(self) -> Text:
        width = max(self.size.width, AXIS_WIDTH + 10)
        height = max(self.size.height, 6)
        plot_width = width - AXIS_WIDTH
        completed, failed = self.provider(plot_width) if self.provider else ([], [])
        theme = self.app.current_theme
        ok_colour = theme.success or "green"
        bad_colour = theme.error or "red"
        muted = "dim"
        done_rows = max(2, (height - 2) * 2 // 3)
        fail_rows = max(1, height - 2 - done_rows)
        text = Text(no_wrap=True, overflow="crop")

        def summary(name: str, values: list[float], colour: str) -> None:
            now = values[-1] if values else 0.0
            average = sum(values) / len(values) if values else 0.0
            peak = max(values) if values else 0.0
            text.append(f"{name} ", style=f"bold {colour}")
            text.append(f"now {rate(now)}  avg {rate(average)}  peak {rate(peak)}", style=muted)

        text.append(f"last {self.window_label}  ", style="bold")
        summary("completed/s", completed, ok_colour)
        text.append("   ")
        summary("failed/s", failed, bad_colour)
        text.append("\n")
        for values, rows, colour in ((completed, done_rows, ok_colour), (failed, fail_rows, bad_colour)):
            top = max(values) if values else 0.0
            scale = top if top > 0 else 1.0
            for index, line in enumerate(bar_rows(values, rows, scale)):
                label = rate(top) if index == 0 else ("0" if index == rows - 1 else "")
                text.append(f"{label:>{AXIS_WIDTH - 2}} ", style=muted)
                text.append("┤" if index in (0, rows - 1) else "│", style=muted)
                text.append(line.ljust(plot_width), style=colour)
                text.append("\n")
        left = f"-{self.window_label}"
        axis = left + "now".rjust(max(0, plot_width - len(left)))
        text.append(" " * AXIS_WIDTH + axis, style=muted)
        return text
