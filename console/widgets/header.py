"""The status header every screen shows: database, environment, engines, health, feed, refresh."""

from __future__ import annotations

from typing import Any

from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import Static


class StatusHeader(Static):
    """Two lines: `console.status.header_text()` of the app's state, so all screens agree."""

    DEFAULT_CSS = """
    StatusHeader { height: 2; padding: 0 1; background: $panel; text-wrap: nowrap; text-overflow: ellipsis; }
    StatusHeader.-down { background: $error 30%; }
    """


def refresh_header(screen: "Screen[Any]", text: Any, database_down: bool) -> None:
    """Redraw a screen's StatusHeader, if the screen still has one (it may be torn down)."""
    try:
        header = screen.query_one(StatusHeader)
    except NoMatches:  # torn down while a redraw was queued
        return
    header.update(text)
    header.set_class(database_down, "-down")
