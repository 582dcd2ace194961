"""The console's messages: what the feed and the data workers tell the app."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from textual.message import Message

from console.data import DeadLetterPage, Snapshot


class FeedEvents(Message):
    """Telemetry events decoded from NOTIFY payloads, in arrival order (the feed batches what arrived
    together, so a burst of ticks is one message)."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        super().__init__()
        self.events = events


class FeedStatus(Message):
    """The LISTEN connection came up (connected=True) or went away (with the error)."""

    def __init__(self, connected: bool, error: str | None = None, at: float | None = None) -> None:
        super().__init__()
        self.connected = connected
        self.error = error
        self.at = at


class SnapshotLoaded(Message):
    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot


class SnapshotFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class DeadLettersLoaded(Message):
    def __init__(self, page: DeadLetterPage) -> None:
        super().__init__()
        self.page = page


class ActionDone(Message):
    """An operator action finished: `text` says what changed, `changed` the ids (or names) it changed;
    `then` runs on the app's thread afterwards."""

    def __init__(self, text: str, changed: Sequence[object] = (), error: bool = False,
                 then: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.text = text
        self.changed = list(changed)
        self.error = error
        self.then = then
