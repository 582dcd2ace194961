"""What the status header says: a pure function of `LiveState` and of where the console is attached.

No Textual here (only rich's Text), so the header and the health verdict are unit-tested without an
app: build an `Attachment`, a `LiveState`, and read the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, tzinfo

from rich.text import Text

from console.state import LiveState
from engine import __version__
from engine.health import Thresholds, evaluate
from engine.health import unreachable as health_unreachable


@dataclass(frozen=True)
class Attachment:
    """Everything the header shows that is not in LiveState: the database, the environment, the mode,
    and how the two connections (snapshot reader, LISTEN feed) are doing."""

    dsn_label: str
    environment: str | None = None  # None: no environment was chosen, and the header says nothing
    read_only: bool = False
    live: bool = True  # False: no LISTEN feed at all (tests, snapshots)
    stale_after: float = 30.0
    thresholds: Thresholds = Thresholds()
    frozen: bool = False
    feed_connected: bool = False
    feed_error: str | None = None
    database_down: bool = False
    down_since: float | None = None
    db_error: str | None = None


@dataclass(frozen=True)
class Colours:
    """The theme's colours the header uses (Textual themes may leave one unset: then "")."""

    success: str = "green"
    warning: str = "yellow"
    error: str = "red"
    accent: str = "cyan"


def health(state: LiveState, where: Attachment) -> tuple[str, str]:
    """(HEALTHY | DEGRADED | UNHEALTHY | CONNECTING, reasons joined by '; '): engine/health.py's verdict
    on the facts read with the snapshot (circuit changes from the live feed applied), the same one
    `engine health`, /readyz and Queue.health_check() give."""
    if where.database_down:
        facts = health_unreachable(where.db_error or "")
    else:
        snapshot = state.snapshot
        if snapshot is None or snapshot.health is None:
            return "CONNECTING", ""
        facts = snapshot.health.with_circuits(state.circuit_override)
    verdict = evaluate(facts, where.thresholds)
    return verdict.status.upper(), "; ".join(verdict.texts)


def header_text(state: LiveState, where: Attachment, *, now: float, tz: tzinfo | None,
                colours: Colours = Colours()) -> Text:
    """Line 1: where we are attached and how fresh the data is. Line 2: health, or the outage."""
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(f"skiplock {__version__}", style="bold")
    if where.read_only:
        text.append("  ")
        text.append(" READ-ONLY ", style=f"bold reverse {colours.accent}")
    if where.frozen:
        text.append("  ")
        text.append(" FROZEN (z resumes) ", style=f"bold reverse {colours.warning}")
    text.append("  db ", style="dim")
    text.append(where.dsn_label)
    if where.environment:
        text.append("  env ", style="dim")
        text.append(where.environment)
    snapshot = state.snapshot
    text.append("  ·  ", style="dim")
    if not where.live:
        text.append("○ live feed off", style="dim")
    elif where.feed_connected:
        text.append("● live", style=f"bold {colours.success}")
        text.append(f" {state.events:,} events", style="dim")
    else:
        text.append("○ live feed down", style=f"bold {colours.warning}")
    if snapshot is not None:
        text.append("  ·  refreshed ", style="dim")
        text.append(f"{datetime.fromtimestamp(snapshot.now, tz):%H:%M:%S}")
    text.append("\n")
    if where.database_down:
        since = where.down_since if where.down_since is not None else now
        text.append(" DATABASE UNREACHABLE ", style=f"bold reverse {colours.error}")
        text.append(f" since {datetime.fromtimestamp(since, tz):%H:%M:%S}: {where.db_error}")
        if snapshot is not None:
            text.append("  ·  showing data from ", style="dim")
            text.append(f"{datetime.fromtimestamp(snapshot.now, tz):%H:%M:%S}", style="bold")
        text.append("  ·  reconnecting…", style="dim")
        return text
    label, reason = health(state, where)
    colour = {"HEALTHY": colours.success, "DEGRADED": colours.warning, "UNHEALTHY": colours.error}.get(label, "")
    text.append(f" {label} ", style=f"bold reverse {colour}" if colour else "bold reverse")
    if snapshot is not None:
        text.append(f"  {snapshot.engines} engine(s), {len(snapshot.live_workers)} live worker(s)")
    if reason:
        text.append(f"  ·  {reason}", style=colour or "")
    if where.live and not where.feed_connected and where.feed_error:
        text.append(f"  ·  feed: {where.feed_error}", style="dim")
    return text
