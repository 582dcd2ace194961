"""Small formatters shared by the screens: counts, rates, durations, ages, bars, times."""

from __future__ import annotations

from datetime import datetime, timezone, tzinfo

from rich.text import Text

DASH = "–"


def count(value: int | None, estimate: int | None = None, capped: bool = False) -> str:
    """An exact count; past the cap, the planner's estimate (≈12k), or "5,000+" without one."""
    if estimate is not None:
        return "≈" + compact(estimate)
    if value is None:
        return DASH
    return f"{value:,}+" if capped else f"{value:,}"


def compact(value: float) -> str:
    """1234 -> 1.2k, 1_250_000 -> 1.2M."""
    value = float(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            scaled = value / limit
            return f"{scaled:.1f}{suffix}" if scaled < 100 else f"{scaled:.0f}{suffix}"
    return f"{value:.0f}"


def rate(value: float | None) -> str:
    if value is None:
        return DASH
    if value == 0:
        return "0"
    if value < 10:
        return f"{value:.1f}"
    return compact(value) if value >= 1000 else f"{value:.0f}"


def duration(seconds: float | None) -> str:
    """A short human duration: 850ms, 4.2s, 3m05s, 2h10m, 3d4h."""
    if seconds is None:
        return DASH
    if seconds < 0:
        seconds = 0.0
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h"


def age(seconds: float | None) -> str:
    """A coarse age (45s, 12m, 7h, 3d): it changes seldom, so a table of ages is not redrawn every second."""
    if seconds is None:
        return DASH
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def millis(ms: float | None) -> str:
    return DASH if ms is None else duration(ms / 1000.0)


def pair(a: str, b: str) -> str:
    return f"{a} / {b}"


def clock(at: float | None, tz: tzinfo | None) -> str:
    if at is None:
        return DASH
    return datetime.fromtimestamp(at, tz or timezone.utc).strftime("%H:%M:%S")


def when(at: float | None, now: float, tz: tzinfo | None) -> str:
    """HH:MM:SS for the last 20 hours, else the date too."""
    if at is None:
        return DASH
    moment = datetime.fromtimestamp(at, tz or timezone.utc)
    return moment.strftime("%H:%M:%S" if abs(now - at) < 20 * 3600 else "%m-%d %H:%M")


def stamp(at: datetime | float | None, tz: tzinfo | None) -> str:
    if at is None:
        return DASH
    if isinstance(at, (int, float)):
        at = datetime.fromtimestamp(at, timezone.utc)
    return at.astimezone(tz or timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def bar(done: int, total: int, width: int = 20) -> Text:
    """A progress bar as text (DataTable cells cannot hold widgets)."""
    fraction = 0.0 if total <= 0 else max(0.0, min(1.0, done / total))
    filled = int(round(fraction * width))
    text = Text()
    text.append("█" * filled, style="green")
    text.append("░" * (width - filled), style="dim")
    text.append(f" {fraction * 100:3.0f}%")
    return text


def clip(text: str | None, width: int) -> str:
    if not text:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def id_list(ids: list[int], shown: int = 12) -> str:
    """The first `shown` ids and how many more: what a confirmation names."""
    text = ", ".join(str(i) for i in ids[:shown])
    return text + (f" and {len(ids) - shown} more" if len(ids) > shown else "")
