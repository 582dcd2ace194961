"""The status header every screen shows: database, environment, engines, health, feed, refresh."""

from __future__ import annotations

from textual.widgets import Static


class StatusHeader(Static):
    """Two lines; the app computes the text (ConsoleApp.header_text) so all screens agree."""

    DEFAULT_CSS = """
    StatusHeader { height: 2; padding: 0 1; background: $panel; text-wrap: nowrap; text-overflow: ellipsis; }
    StatusHeader.-down { background: $error 30%; }
    """
