"""Loads `config.toml` into frozen, typed settings.

The file has a global level, per-flow levels and per-environment copies of both; a key is looked up
most specific first (see docs/configuration.md). `SKIPLOCK__SECTION__...__KEY` environment variables
override any key of the file, and secrets come only from the environment.

Every value of every level is checked, not only the ones the selected environment uses, so a typo in
the production section fails on a developer's machine too. Errors are `ConfigError`s whose message
starts with where the value came from (the file, or the environment variable) and names the dotted key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import keyword
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Final, TypeVar

from engine.errors import ConfigError
from engine.limits import (INT4_MAX, MAX_DURATION_S, MAX_DURATION_TEXT, MAX_POOL_SIZE, MAX_PORT, MAX_RATE_BURST,
                           MAX_RATE_PER_S, MAX_WORKERS, NAME, utf8_problem)
from engine.redact import secret_spans
from engine.schedules import ScheduleError, ScheduleSpec, check_catch_up, check_every, check_payload, check_timezone, parse_cron

__all__ = [
    "BUILTIN_FLOW_NAMES",
    "BackoffPolicy",
    "CircuitPolicy",
    "ConsoleConfig",
    "EngineConfig",
    "FlowConfig",
    "ScheduleConfig",
    "Settings",
    "add_settings_arguments",
    "load_settings",
    "parse_duration",
    "recorded_policy",
    "resolve_dsn",
]


# --- values: durations and the converters every key names -----------------------------------------

_ENV_REF_RE: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DURATION_RE: Final = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*")
_UNIT_SECONDS: Final[dict[str, float]] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object, where: str) -> float:
    """Seconds from "250ms", "5s", "2m", "1h", "1d", or a plain number of seconds."""
    seconds: float | None = None
    if isinstance(value, bool):
        seconds = None  # bool is an int subclass; `true` is never a duration
    elif isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{where}: duration must not be negative, got {_show(value)}")
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.fullmatch(value)
        if match is not None:
            seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]
    if seconds is None or not math.isfinite(seconds):
        raise ConfigError(f"{where}: bad duration {_show(value)} (use 250ms, 5s, 2m, 1h, 1d or seconds)")
    if seconds > MAX_DURATION_S:
        raise ConfigError(f"{where}: duration must be at most {MAX_DURATION_TEXT} (100 years), got {_show(value)}")
    return seconds


def _is_env_reference(secret: str) -> bool:
    """True for ${NAME}, optionally in ODBC braces or libpq quotes: expanded later, not a literal."""
    inner = secret
    if len(inner) >= 2 and (inner[0], inner[-1]) in (("{", "}"), ("'", "'")):
        inner = inner[1:-1]
    return _ENV_REF_RE.fullmatch(inner) is not None




# --- schema --------------------------------------------------------------------------------------

T = TypeVar("T")


@dataclass(frozen=True)
class _Where:
    """Where a value came from, for messages: `origin: key`."""

    origin: str  # the file as given, or the SKIPLOCK__... variable
    key: str  # dotted TOML key
    from_file: bool

    def __str__(self) -> str:
        return f"{self.origin}: {self.key}"


_Conv = Callable[[object, _Where], T]

_BARE_KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]+")
_LOG_FORMATS: Final = ("auto", "json", "text")


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"  # TOML dates and times


def _dotted(parts: Sequence[str]) -> str:
    return ".".join(p if _BARE_KEY_RE.fullmatch(p) else json.dumps(p, ensure_ascii=False) for p in parts)


def _int(minimum: int, maximum: int = INT4_MAX) -> _Conv[int]:
    def convert(value: object, where: _Where) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {_show(value)}")
        if value < minimum:
            raise ConfigError(f"{where} must be at least {minimum}, got {value}")
        if value > maximum:
            raise ConfigError(f"{where} must be at most {maximum}, got {value}")
        return value

    return convert


def _duration(*, positive: bool) -> _Conv[float]:
    def convert(value: object, where: _Where) -> float:
        seconds = parse_duration(value, str(where))
        if positive and seconds <= 0:
            raise ConfigError(f"{where} must be greater than 0, got {_show(value)}")
        return seconds

    return convert


def _optional(convert: _Conv[T]) -> _Conv[T | None]:
    # TOML has no null: `false` says "none" and hides the less specific levels.
    def optional(value: object, where: _Where) -> T | None:
        return None if value is False else convert(value, where)

    return optional


def _fraction(value: object, where: _Where) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number, got {_show(value)}")
    if not 0.0 <= value <= 1.0:  # also rejects nan
        raise ConfigError(f"{where} must be between 0 and 1, got {_show(value)}")
    return float(value)


def _bool(value: object, where: _Where) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {_show(value)}")
    return value


def _text(value: object, where: _Where) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {_show(value)}")
    if not value.strip():
        raise ConfigError(f"{where} must not be empty")
    return value


def _log_format(value: object, where: _Where) -> str:
    text = _text(value, where)
    if text not in _LOG_FORMATS:
        raise ConfigError(f"{where} must be one of {', '.join(_LOG_FORMATS)}, got {_show(value)}")
    return text


def _is_dotted_name(text: str) -> bool:
    return all(part.isidentifier() and not keyword.iskeyword(part) for part in text.split("."))


def _is_ref(text: str) -> bool:
    module, colon, attribute = text.partition(":")
    return bool(colon) and _is_dotted_name(module) and _is_dotted_name(attribute)


def _ref(value: object, where: _Where) -> str:
    # Only the shape is checked: importing user code while reading config would run it too early.
    text = _text(value, where)
    if not _is_ref(text):
        raise ConfigError(f'{where} must look like "module:function", got {_show(value)}')
    return text


def _string_list(value: object, where: _Where) -> list[str]:
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be an array of strings, got {_show(value)}")
    items: list[str] = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(f"{where}[{index}] must be a string, got {_show(item)}")
        items.append(item)
    return items


def _error_names(value: object, where: _Where) -> tuple[str, ...]:
    names = _string_list(value, where)
    for index, name in enumerate(names):
        if not ((name.isidentifier() and not keyword.iskeyword(name)) or _is_ref(name)):
            raise ConfigError(
                f'{where}[{index}] must be an exception class name or "module:Class", got {_show(name)}'
            )
    return tuple(names)


def _source_names(value: object, where: _Where) -> tuple[str, ...]:
    return tuple(_string_list(value, where))  # that they are declared is checked once all are known


def _flow_name(value: object, where: _Where) -> str:
    text = _text(value, where)
    if not NAME.fullmatch(text):
        raise ConfigError(f"{where} must be a flow name (1-63 letters, digits, '_', '.', '-'), got {_show(value)}")
    return text


_RATE_PERIODS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0}


def _rate(value: object, where: _Where) -> float:
    """ "100/s", "30/m", "500/h" (also "2.5/s") -> job starts per second."""
    if not isinstance(value, str):
        raise ConfigError(f'{where} must be a string like "100/s", "30/m" or "500/h", got {_show(value)}')
    count, slash, period = value.strip().partition("/")
    try:
        number = float(count) if slash and period.strip() in _RATE_PERIODS else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f'{where} must be a positive count per period like "100/s", "30/m" or "500/h", '
                          f"got {_show(value)}")
    per_second = number / _RATE_PERIODS[period.strip()]
    if per_second > MAX_RATE_PER_S:
        raise ConfigError(f"{where} must be at most {MAX_RATE_PER_S:g}/s, got {_show(value)}")
    return per_second


_POSITIVE_DURATION: Final = _duration(positive=True)
_DURATION: Final = _duration(positive=False)


def _schedule_value(check: Callable[[Any], Any], text: bool = True) -> _Conv[Any]:
    def convert(value: object, where: _Where) -> Any:
        try:
            return check(_text(value, where) if text else value)
        except ScheduleError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    return convert


def _every(value: object, where: _Where) -> float:
    seconds = parse_duration(value, str(where))
    try:
        check_every(seconds)
    except ScheduleError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return seconds


def _payload(value: object, where: _Where) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table, got {_show(value)}")
    try:
        return check_payload(value)
    except ScheduleError as exc:
        raise ConfigError(f"{where}: {exc}") from None


# --- the settings: each key declared once, its converter and help in the field's metadata ---------


@dataclass(frozen=True)
class _Key:
    convert: _Conv[Any] | None  # None: a table of keys, read from the fields of `table`
    help: str
    table: type | None = None
    recorded: bool = False  # part of the flow policy engines record in the database (see recorded_policy)
    flow_only: bool = False  # allowed in [flows.NAME] only, not as a [global] default


def _key(convert: _Conv[Any] | None, help: str, default: Any = MISSING, *, table: type | None = None,
         recorded: bool = False, flow_only: bool = False) -> Any:
    return field(default=default, metadata={"key": _Key(convert, help, table, recorded, flow_only)})


@dataclass(frozen=True)
class BackoffPolicy:
    """Delay before retry number `attempt` (1-based): exponential, capped, with symmetric jitter."""

    base: float = _key(_DURATION, "delay before the first retry; doubles per retry", 1.0)
    cap: float = _key(_POSITIVE_DURATION, "longest delay", 300.0)
    jitter: float = _key(_fraction, "random spread, a fraction 0..1 of the delay", 0.2)

    def delay(self, attempt: int, rand: float) -> float:
        """`rand` in [0, 1). Jitter is applied after the cap, so a delay can reach cap * (1 + jitter)."""
        # Float exponent: huge attempt counts saturate to inf (then the cap) instead of raising.
        raw = self.base * 2.0 ** min(max(attempt - 1, 0), 1000)
        return min(self.cap, raw) * (1.0 + self.jitter * (2.0 * rand - 1.0))


@dataclass(frozen=True)
class CircuitPolicy:
    failures: int = _key(_int(1), "consecutive failures that open the circuit")
    cooldown: float = _key(_POSITIVE_DURATION, "how long the circuit stays open before a half-open trial")


@dataclass(frozen=True)
class FlowConfig:
    name: str
    handler: str = _key(_ref, '"module:function" that runs the jobs', flow_only=True)
    batch_size: int = _key(_int(1), "jobs claimed and acked together", 100, recorded=True)
    max_attempts: int = _key(_int(1), "tries before a job becomes a dead letter", 5, recorded=True)
    backoff: BackoffPolicy = _key(None, "delay between tries", BackoffPolicy(), table=BackoffPolicy, recorded=True)
    timeout: float | None = _key(_optional(_POSITIVE_DURATION), "longest run of one job; false: no limit", None,
                                 recorded=True)
    concurrency: int | None = _key(_optional(_int(1)), "fleet-wide limit of running jobs; false: none", None,
                                   recorded=True)
    permanent_errors: tuple[str, ...] = _key(_error_names, 'exception class names or "module:Class" never retried', ())
    circuit: CircuitPolicy | None = _key(None, "circuit breaker; false: none", None, table=CircuitPolicy, recorded=True)
    on_complete: str | None = _key(_optional(_ref), '"module:function" run once when a run finishes', None)
    sources: tuple[str, ...] = _key(_source_names, "names of [sources.X] the handler uses", ())
    transactional: bool = _key(_bool, "handler writes through ctx.pg commit in the batch's ack transaction", False)
    concurrency_per_worker: int | None = _key(
        _optional(_int(1)), "jobs one worker runs at once; unset: 1 for a def handler, 100 for async def", None,
        recorded=True)
    batch: bool = _key(_bool, "the handler takes the whole claimed batch: handler(payloads) -> list", False,
                       recorded=True)
    cancel_grace: float = _key(_DURATION, "after a running job's cancel request, how long the worker waits for "
                               "its handler before it stops waiting and ends the job cancelled", 10.0)
    next: str | None = _key(_optional(_flow_name), "the next stage: a dict result becomes one job of that flow, "
                            "inserted by the ack (engine/stages.py); false: none", None, recorded=True)
    on_complete_repeat: bool = _key(_bool, "a run reopened by a retry or a late enqueue fires on_complete again "
                                    "when it finishes again (default: once per run)", False, recorded=True)
    # Flow control, enforced in the claim (README "Rate limits and per-key concurrency").
    rate_limit: float | None = _key(
        _optional(_rate), 'fleet-wide job starts per period: "100/s", "30/m" or "500/h"; false: none', None,
        recorded=True)
    rate_burst: int | None = _key(
        _optional(_int(1, MAX_RATE_BURST)), "starts the rate limit may save up; unset: one second's worth, at least 1",
        None, recorded=True)
    concurrency_key: str | None = _key(
        _optional(_text), "top-level payload key whose value is the job's concurrency key (else key= at enqueue)",
        None, recorded=True)
    concurrency_per_key: int | None = _key(
        _optional(_int(1)), "fleet-wide limit of running jobs per concurrency key; unset with concurrency_key: 1",
        None, recorded=True)

    @property
    def burst(self) -> float:
        """The rate limit's bucket size (only meaningful with rate_limit)."""
        if self.rate_burst is not None:
            return float(self.rate_burst)
        return float(max(1, math.ceil(self.rate_limit or 1.0)))

    @property
    def per_key(self) -> int | None:
        """Running jobs allowed per concurrency key; None: the flow has no per-key limit."""
        if self.concurrency_per_key is None and self.concurrency_key is None:
            return None
        return self.concurrency_per_key or 1


@dataclass(frozen=True)
class EngineConfig:
    workers: int = _key(_int(1, MAX_WORKERS), "worker processes of one engine", 2)
    heartbeat_interval: float = _key(_POSITIVE_DURATION, "how often the supervisor renews its workers' heartbeats", 5.0)
    stale_after: float = _key(_POSITIVE_DURATION, "a worker without a heartbeat this long is lost (>= 3 x heartbeat_interval)", 30.0)
    rescue_interval: float = _key(_POSITIVE_DURATION, "how often the leader rescues jobs of lost workers", 10.0)
    poll_interval: float = _key(_POSITIVE_DURATION, "fallback poll when no NOTIFY arrives", 5.0)
    grace_period: float = _key(_DURATION, "on SIGTERM, time to finish the batch in hand", 30.0)
    tick_interval: float = _key(_POSITIVE_DURATION, "telemetry tick", 1.0)
    retention: float = _key(_DURATION, "how long completed jobs and finished runs are kept", 7 * 86400.0)
    worker_retention: float = _key(_DURATION, "how long rows of stopped or lost workers are kept", 86400.0)
    stats_retention: float = _key(_DURATION, "how long per-minute history is kept", 7 * 86400.0)
    vacuum_dead_tuples: int = _key(_int(0), "dead tuples in skiplock.jobs at which one engine VACUUMs it; 0: autovacuum only",
                                   100_000)
    vacuum_check_interval: float = _key(_POSITIVE_DURATION, "longest wait between that engine's reads of skiplock.jobs' dead tuples "
                                   "(sooner when they pile up fast)", 2.0)
    pool_min: int = _key(_int(0, MAX_POOL_SIZE), "connections each worker keeps open", 1)
    pool_max: int = _key(_int(1, MAX_POOL_SIZE), "connections each worker may open", 4)
    log_format: str = _key(_log_format, "auto | json | text", "auto")
    # metrics and health (engine/metrics.py, engine/health.py)
    metrics_port: int | None = _key(_optional(_int(0, MAX_PORT)), "serve /metrics, /healthz and /readyz on this "
                                    "port (0: any free port, logged); false: off", None)
    metrics_host: str = _key(_text, "address the metrics port listens on", "127.0.0.1")
    metrics_interval: float = _key(_POSITIVE_DURATION, "how often the leader engine reads the fleet-wide gauges",
                                   15.0)
    alert_backlog_age: float = _key(_POSITIVE_DURATION, "health is degraded when a due job has waited longer",
                                    300.0)
    alert_failure_rate: float = _key(_fraction, "health is degraded when more than this fraction of a flow's "
                                     "attempts failed in the last 5 minutes (at least 20 attempts)", 0.5)


@dataclass(frozen=True)
class ConsoleConfig:
    read_only: bool = _key(_bool, "offer no action that writes", False)
    refresh_interval: float = _key(_POSITIVE_DURATION, "time between snapshots", 2.0)


@dataclass(frozen=True)
class ScheduleConfig:
    """[schedules.NAME]: a cron expression or a period that enqueues one job of `flow` per tick."""

    name: str
    flow: str = _key(_text, "the flow each tick enqueues a job of (a declared flow)")
    cron: str | None = _key(_schedule_value(parse_cron), 'five-field cron expression or an alias such as '
                            '"@hourly"; give cron or every', None)
    every: float | None = _key(_every, "a period such as 10s or 5m (at least 1s); give cron or every", None)
    payload: dict[str, Any] | None = _key(_payload, "the jobs' payload, a table; each job also gets scheduled_at",
                                          None)
    timezone: str = _key(_schedule_value(check_timezone), "IANA time zone the cron expression is read in", "UTC")
    enabled: bool = _key(_bool, "false: declared, never fired", True)
    catch_up: str = _key(_schedule_value(check_catch_up), '"last": after downtime enqueue the latest missed tick '
                         'once; "none": skip missed ticks', "last")

    def spec(self) -> ScheduleSpec:
        return ScheduleSpec(self.name, self.flow, self.cron, self.every, dict(self.payload or {}), self.timezone,
                            self.catch_up, self.enabled)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Settings:
    path: Path | None  # file it came from (None: defaults only)
    env: str | None  # selected environment
    dsn: str | None = _key(_text, "PostgreSQL connection string, without a password; None: embedded")
    listen_dsn: str | None = _key(_text, "a direct connection for LISTEN when dsn goes through PgBouncer in "
                                  "transaction mode (also $SKIPLOCK_LISTEN_DSN); None: dsn")
    application_name: str = _key(_text, "application_name of every connection (suffixed per role)")
    engine: EngineConfig
    console: ConsoleConfig
    flows: dict[str, FlowConfig]  # includes the built-in flows unless overridden
    # [sources.NAME] tables merged for the selected environment: connection_string (str, ${VAR}s
    # expanded), timeout (float seconds) and retries (int), each only when set.
    sources: dict[str, dict[str, object]]
    schedules: dict[str, ScheduleConfig] = field(default_factory=dict)  # [schedules.NAME], top level only


def _keys(cls: type) -> dict[str, _Key]:
    return {f.name: f.metadata["key"] for f in fields(cls) if "key" in f.metadata}


def recorded_policy(flow: FlowConfig) -> dict[str, Any]:
    """The flow's policy as engines record it in the flows table (read by rescue and the console)."""
    policy: dict[str, Any] = {}
    for name, key in _keys(FlowConfig).items():
        if key.recorded:
            value = getattr(flow, name)
            policy[name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return policy


def _converters(cls: type, *, flow_only: bool = False) -> dict[str, _Conv[object]]:
    return {name: key.convert for name, key in _keys(cls).items()
            if key.convert is not None and key.flow_only == flow_only}


# Keys of [global] (and [environments.ENV.global]) that configure the engine process, not a flow.
_ENGINE_KEYS: Final = _converters(Settings) | _converters(EngineConfig)
# Flow-policy keys: allowed at every level; `backoff` and `circuit` are tables handled apart.
_POLICY_KEYS: Final = _converters(FlowConfig)
_SUBTABLES: Final[dict[str, dict[str, _Conv[object]]]] = {
    name: _converters(key.table) for name, key in _keys(FlowConfig).items() if key.table is not None
}
_CONSOLE_KEYS: Final = _converters(ConsoleConfig)
_SCHEDULE_KEYS: Final = _converters(ScheduleConfig)
_SOURCE_KEYS: Final[dict[str, _Conv[object]]] = {
    "connection_string": _text,
    "timeout": _POSITIVE_DURATION,
    "retries": _int(0),
}

_GLOBAL_ALLOWED: Final = frozenset(_ENGINE_KEYS) | frozenset(_POLICY_KEYS) | frozenset(_SUBTABLES)
_FLOW_ONLY_KEYS: Final = _converters(FlowConfig, flow_only=True)
_FLOW_ALLOWED: Final = frozenset(_POLICY_KEYS) | frozenset(_SUBTABLES) | frozenset(_FLOW_ONLY_KEYS)
_CONSOLE_ALLOWED: Final = frozenset(_CONSOLE_KEYS)
_SOURCE_ALLOWED: Final = frozenset(_SOURCE_KEYS)
_SCHEDULE_ALLOWED: Final = frozenset(_SCHEDULE_KEYS)
_TOP_SECTIONS: Final = ("global", "flows", "console", "sources", "schedules", "environments")
_ENV_SECTIONS: Final = ("global", "flows", "console", "sources")
# For "unknown key" messages: where a key that is misplaced would be allowed.
_KEY_HOMES: Final = (
    ("global", _GLOBAL_ALLOWED),
    ("flows.NAME", _FLOW_ALLOWED),
    ("console", _CONSOLE_ALLOWED),
    ("sources.NAME", _SOURCE_ALLOWED),
)

# Built-in demo flows: served by `engine dev` (load_settings(builtin_flows=True)) and where a file
# names them; a [flows.NAME] of the same name is merged over them key by key (so it may leave out
# `handler`: `[flows.noop]` alone serves the built-in noop). Production engines never serve them unasked.
_BUILTIN_FLOWS: Final[dict[str, dict[str, object]]] = {
    "noop": {"handler": "engine.flows.builtin:noop", "batch_size": 500},
    "sleep": {"handler": "engine.flows.builtin:sleep"},
    "flaky": {"handler": "engine.flows.builtin:flaky"},
}
BUILTIN_FLOW_NAMES: Final = tuple(_BUILTIN_FLOWS)

_OVERRIDE_PREFIX: Final = "SKIPLOCK__"

_TablePath = tuple[str, ...]


def _allowed_keys(table: _TablePath) -> frozenset[str]:
    shape = table[2:] if table[0] == "environments" else table
    section = shape[0]
    if section == "global":
        return _GLOBAL_ALLOWED
    if section == "console":
        return _CONSOLE_ALLOWED
    if section == "flows":
        return _FLOW_ALLOWED
    if section == "schedules":
        return _SCHEDULE_ALLOWED
    return _SOURCE_ALLOWED


def _converter(table: _TablePath, key: str) -> _Conv[object]:
    shape = table[2:] if table[0] == "environments" else table
    if shape[0] == "sources":
        return _SOURCE_KEYS[key]  # its `timeout` is required-positive, unlike a flow's
    if shape[0] == "schedules":
        return _SCHEDULE_KEYS[key]
    for keys in (_ENGINE_KEYS, _POLICY_KEYS, _FLOW_ONLY_KEYS, _CONSOLE_KEYS):
        if key in keys:
            return keys[key]
    raise AssertionError(key)  # callers only pass keys that _allowed_keys accepted


def _unknown_key(
    origin: str, table: _TablePath, key: str, allowed: Collection[str], *, homes: bool = True
) -> ConfigError:
    message = f"{origin}: unknown key '{_dotted(table + (key,))}'"
    # A known key in the wrong table is a likelier mistake than a typo: say where it goes.
    prefix = _dotted(table[:2]) + "." if table[:1] == ("environments",) and len(table) >= 2 else ""
    places = [f"[{prefix}{home}]" for home, keys in _KEY_HOMES if key in keys] if homes else []
    if places:
        message += f" ('{key}' belongs in {' or '.join(places)})"
    else:
        close = difflib.get_close_matches(key, sorted(allowed), n=1)
        if close:
            message += f" (did you mean '{_dotted(table + (close[0],))}'?)"
    return ConfigError(message)


def _unknown_name(origin: str, table: _TablePath, name: str, names: Sequence[str], kind: str) -> ConfigError:
    message = f"{origin}: unknown key '{_dotted(table + (name,))}' (no {kind} '{name}' is declared"
    by_lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(name.lower(), sorted(by_lower), n=1)
    if close:
        message += f"; did you mean '{by_lower[close[0]]}'?"
    return ConfigError(message + ")")


def _parse_env_value(raw: str) -> object:
    """A TOML value when the text is one (8, true, "5s", [..]), else the text itself (5s)."""
    try:
        document = tomllib.loads(f"v = {raw}")
    except (tomllib.TOMLDecodeError, RecursionError):
        return raw
    if list(document) != ["v"]:  # a newline in the value must not smuggle in other keys
        return raw
    return document["v"]


# --- the loader ----------------------------------------------------------------------------------


class _Loader:
    """Holds the file as flat tables ({table path: {key: raw value}}) plus where each value came from."""

    def __init__(self, label: str, environ: Mapping[str, str], builtin_flows: bool = False) -> None:
        self._label = label
        self._builtin_flows = builtin_flows
        self._environ = environ
        self._tables: dict[_TablePath, dict[str, object]] = {}
        self._origins: dict[tuple[str, ...], str] = {}  # key path -> variable that set it
        self._flows: list[str] = []
        self._sources: list[str] = []
        self._schedules: list[str] = []
        self._envs: list[str] = []

    # reading the file

    def add_document(self, document: Mapping[str, object]) -> None:
        for key in document:
            if key not in _TOP_SECTIONS:
                raise _unknown_key(self._label, (), key, _TOP_SECTIONS)
        if "global" in document:
            self._add_table(("global",), document["global"])
        if "console" in document:
            self._add_table(("console",), document["console"])
        for name in self._add_named(("sources",), document.get("sources"), "source", None):
            self._sources.append(name)
        for name in self._add_named(("flows",), document.get("flows"), "flow", None):
            self._flows.append(name)
        for name in self._add_named(("schedules",), document.get("schedules"), "schedule", None):
            self._schedules.append(name)
        for name, builtin in _BUILTIN_FLOWS.items():
            if not (self._builtin_flows or name in self._flows):
                continue
            table = self._tables.setdefault(("flows", name), {})
            for key, value in builtin.items():
                table.setdefault(key, value)
            if name not in self._flows:
                self._flows.append(name)
        envs = document.get("environments")
        if envs is None:
            return
        for env, body in self._require_table(("environments",), envs).items():
            self._check_name(("environments",), env, "environment")
            self._envs.append(env)
            prefix = ("environments", env)
            sections = self._require_table(prefix, body)
            for section, value in sections.items():
                if section in ("global", "console"):
                    self._add_table(prefix + (section,), value)
                elif section == "flows":
                    list(self._add_named(prefix + ("flows",), value, "flow", self._flows))
                elif section == "sources":
                    list(self._add_named(prefix + ("sources",), value, "source", self._sources))
                else:
                    raise _unknown_key(self._label, prefix, section, _ENV_SECTIONS)

    def _require_table(self, table: _TablePath, value: object) -> dict[str, object]:
        if not isinstance(value, dict):
            raise ConfigError(f"{self._label}: {_dotted(table)} must be a table, got {_show(value)}")
        return value

    def _add_table(self, table: _TablePath, value: object) -> None:
        body = self._require_table(table, value)
        allowed = _allowed_keys(table)
        for key in body:
            if key not in allowed:
                raise _unknown_key(self._label, table, key, allowed)
        self._tables[table] = dict(body)

    def _add_named(
        self, prefix: _TablePath, value: object, kind: str, declared: Sequence[str] | None
    ) -> list[str]:
        """Adds [PREFIX.NAME] tables; `declared`: the names an environment may refine (None: any)."""
        if value is None:
            return []
        names: list[str] = []
        for name, body in self._require_table(prefix, value).items():
            self._check_name(prefix, name, kind)
            if declared is not None and name not in declared:
                raise _unknown_name(self._label, prefix, name, declared, kind)
            self._add_table(prefix + (name,), body)
            names.append(name)
        return names

    def _check_name(self, prefix: _TablePath, name: str, kind: str) -> None:
        if NAME.fullmatch(name) is None:
            raise ConfigError(
                f"{self._label}: {_dotted(prefix + (name,))}: a {kind} name must be 1-63 characters "
                "of letters, digits, '_', '.' or '-', starting with a letter or digit"
            )

    # environment selection and overrides

    def select_env(self, env: str | None, from_variable: bool) -> str | None:
        if env is None or env in self._envs:
            return env
        chosen_by = " selected by SKIPLOCK_ENV" if from_variable else ""
        if self._label == "":
            raise ConfigError(
                f"unknown environment '{env}'{chosen_by}: no config file is loaded "
                "(pass a path or set SKIPLOCK_CONFIG)"
            )
        declared = f"declared: {', '.join(self._envs)}" if self._envs else "the file declares no environments"
        raise ConfigError(f"{self._label}: unknown environment '{env}'{chosen_by} ({declared})")

    def apply_overrides(self) -> None:
        # Sorted so that SKIPLOCK__X__BACKOFF (a whole table) comes before SKIPLOCK__X__BACKOFF__BASE.
        for variable in sorted(self._environ):
            if not variable.startswith(_OVERRIDE_PREFIX):
                continue
            table, key, sub = self._override_target(variable)
            value = _parse_env_value(self._environ[variable])
            body = self._tables.setdefault(table, {})
            if sub is None:
                body[key] = value
                self._origins[table + (key,)] = variable
            else:
                current = body.get(key)
                merged: dict[str, object] = dict(current) if isinstance(current, dict) else {}
                merged[sub] = value
                body[key] = merged
                self._origins[table + (key, sub)] = variable

    def _override_target(self, variable: str) -> tuple[_TablePath, str, str | None]:
        segments = [s.lower() for s in variable[len(_OVERRIDE_PREFIX) :].split("__")]
        if "" in segments:
            raise ConfigError(f"{variable}: empty part in the name (expected SKIPLOCK__SECTION__KEY)")
        prefix: _TablePath = ()
        sections: Sequence[str] = _TOP_SECTIONS
        if segments[0] == "environments":
            if len(segments) < 2:
                raise ConfigError(f"{variable}: names no environment (SKIPLOCK__ENVIRONMENTS__ENV__...)")
            env = self._match_name(variable, ("environments",), segments[1], self._envs, "environment")
            prefix, segments, sections = ("environments", env), segments[2:], _ENV_SECTIONS
        if not segments:
            raise ConfigError(f"{variable}: names the table '{_dotted(prefix)}', not a key in it")
        section, rest = segments[0], segments[1:]
        if section in ("global", "console"):
            table = prefix + (section,)
        elif section in ("flows", "sources") or (section == "schedules" and not prefix):
            if not rest:
                raise ConfigError(f"{variable}: names the table '{_dotted(prefix + (section,))}', not a key in it")
            names, kind = {"flows": (self._flows, "flow"), "sources": (self._sources, "source"),
                           "schedules": (self._schedules, "schedule")}[section]
            table = prefix + (section, self._match_name(variable, prefix + (section,), rest[0], names, kind))
            rest = rest[1:]
        else:
            raise _unknown_key(variable, prefix, section, sections)
        if not rest:
            raise ConfigError(f"{variable}: names the table '{_dotted(table)}', not a key in it")
        key, rest = rest[0], rest[1:]
        allowed = _allowed_keys(table)
        if key not in allowed:
            raise _unknown_key(variable, table, key, allowed)
        if not rest:
            return table, key, None
        subkeys = _SUBTABLES.get(key)
        if subkeys is None or len(rest) > 1 or rest[0] not in subkeys:
            raise _unknown_key(variable, table + (key,), rest[0], subkeys or (), homes=False)
        return table, key, rest[0]

    def _match_name(
        self, variable: str, table: _TablePath, segment: str, names: Sequence[str], kind: str
    ) -> str:
        # Names are matched case-insensitively: environment variable names are upper case by habit.
        hits = [name for name in names if name.lower() == segment]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise _unknown_name(variable, table, segment, names, kind)
        raise ConfigError(f"{variable}: '{segment}' matches more than one {kind}: {', '.join(hits)}")

    # checking every value

    def _where(self, table: _TablePath, key: str, sub: str | None = None) -> _Where:
        path = table + (key,) if sub is None else table + (key, sub)
        origin = self._origins.get(path)
        if origin is None and sub is not None:
            origin = self._origins.get(table + (key,))
        if origin is None:
            return _Where(self._label, _dotted(path), from_file=True)
        return _Where(origin, _dotted(path), from_file=False)

    def validate(self) -> None:
        for table, body in self._tables.items():
            for key, value in body.items():
                subkeys = _SUBTABLES.get(key)
                if subkeys is not None:
                    self._validate_subtable(table, key, value, subkeys)
                    continue
                where = self._where(table, key)
                converted = _converter(table, key)(value, where)
                if key in ("dsn", "listen_dsn") and where.from_file and isinstance(converted, str):
                    if any(end > start for start, end in secret_spans(converted)):
                        raise ConfigError(
                            f"{where} must not contain a password; put it in SKIPLOCK_DSN or PGPASSWORD"
                        )
                elif key == "connection_string" and where.from_file and isinstance(converted, str):
                    for start, end in secret_spans(converted):
                        if end > start and not _is_env_reference(converted[start:end]):
                            raise ConfigError(
                                f"{where} must not contain a password; reference an environment "
                                "variable instead, e.g. PWD=${SOURCE_PASSWORD}"
                            )
                elif key == "sources" and isinstance(converted, tuple):
                    self._check_source_names(where, converted)
            if len(table) == 2 and table[0] == "schedules":
                self._check_schedule(table, body)
            if len(table) == 2 and table[0] == "flows" and "handler" not in body:
                raise ConfigError(
                    f'{self._label}: {_dotted(table)} has no handler; add handler = "module:function"'
                )

    def _check_schedule(self, table: _TablePath, body: Mapping[str, object]) -> None:
        if "flow" not in body:
            raise ConfigError(f'{self._label}: {_dotted(table)} has no flow; add flow = "NAME"')
        if ("cron" in body) == ("every" in body):
            raise ConfigError(f"{self._label}: {_dotted(table)} needs exactly one of cron and every")
        flow = body["flow"]
        if flow not in self._flows:
            where = self._where(table, "flow")
            raise ConfigError(f"{where} names an unknown flow {_show(flow)} (declared: {', '.join(self._flows)})")

    def _validate_subtable(
        self, table: _TablePath, key: str, value: object, subkeys: dict[str, _Conv[object]]
    ) -> None:
        where = self._where(table, key)
        if key == "circuit" and value is False:
            return
        if not isinstance(value, dict):
            also = " or false" if key == "circuit" else ""
            raise ConfigError(f"{where} must be a table{also}, got {_show(value)}")
        for sub, sub_value in value.items():
            if sub not in subkeys:
                raise _unknown_key(where.origin, table + (key,), sub, subkeys, homes=False)
            subkeys[sub](sub_value, self._where(table, key, sub))

    def _check_source_names(self, where: _Where, names: tuple[str, ...]) -> None:
        for name in names:
            if name not in self._sources:
                declared = ", ".join(self._sources) if self._sources else "none"
                raise ConfigError(f"{where} names an unknown source '{name}' (declared: {declared})")

    # resolving for one environment

    def _find(self, levels: Sequence[_TablePath], key: str) -> tuple[object, _Where] | None:
        for table in levels:
            body = self._tables.get(table)
            if body is not None and key in body:
                return body[key], self._where(table, key)
        return None

    def _resolve(self, levels: Sequence[_TablePath], key: str, convert: _Conv[T], default: T) -> T:
        found = self._find(levels, key)
        return default if found is None else convert(found[0], found[1])

    def _resolve_subtable(self, levels: Sequence[_TablePath], key: str) -> dict[str, tuple[object, _Where]]:
        """Each sub-key looked up on its own, most specific level first; `false` hides lower levels."""
        found: dict[str, tuple[object, _Where]] = {}
        for table in levels:
            body = self._tables.get(table)
            if body is None or key not in body:
                continue
            value = body[key]
            if not isinstance(value, dict):
                break
            for sub, sub_value in value.items():
                if sub not in found:
                    found[sub] = (sub_value, self._where(table, key, sub))
        return found

    @staticmethod
    def _levels(env: str | None, *tables: _TablePath) -> list[_TablePath]:
        # An environment's copy of each table comes right before the table itself.
        levels: list[_TablePath] = []
        for table in tables:
            if env is not None:
                levels.append(("environments", env) + table)
            levels.append(table)
        return levels

    def _read(self, cls: type[T], levels: Sequence[_TablePath], **given: Any) -> T:
        """An instance of a settings dataclass: each key of its fields looked up, most specific first."""
        values = dict(given)
        for f in fields(cls):  # type: ignore[arg-type]
            key = f.metadata.get("key")
            if key is None or f.name in values:
                continue
            if key.table is not None:
                values[f.name] = self._read_table(levels, f.name, key.table, f.default)
            else:
                values[f.name] = self._resolve(levels, f.name, key.convert, f.default)
        return cls(**values)

    def _read_table(self, levels: Sequence[_TablePath], name: str, cls: type, default: object) -> object:
        found = self._resolve_subtable(levels, name)
        if not found and default is None:  # an optional table that is not set (or set to false)
            return None
        keys = _keys(cls)
        for sub, f in ((f.name, f) for f in fields(cls)):
            if f.default is MISSING and sub not in found:
                where = next(iter(found.values()))[1]
                table = where.key.rsplit(".", 1)[0]
                raise ConfigError(f"{where.origin}: {table}.{sub} is required when the {name} is set")
        return cls(**{sub: keys[sub].convert(*found[sub]) for sub in keys if sub in found})  # type: ignore[misc]

    def _engine(self, env: str | None) -> EngineConfig:
        levels = self._levels(env, ("global",))
        engine = self._read(EngineConfig, levels)
        # A worker is declared dead after stale_after without a heartbeat: it must exceed the interval.
        self._require_order(levels, "heartbeat_interval", engine.heartbeat_interval, "stale_after",
                            engine.stale_after, strict=True)
        if engine.stale_after < 3 * engine.heartbeat_interval:
            # A worker's lease (engine/liveness.py: stale_after - max(heartbeat_interval, 20%)) must
            # outlast two heartbeats, or one late renewal freezes or stops the engine's workers.
            high, low = self._find(levels, "stale_after"), self._find(levels, "heartbeat_interval")
            origin = (high or low or (None, _Where(self._label, "", True)))[1].origin
            high_name = high[1].key if high else "stale_after (default)"
            low_name = low[1].key if low else "heartbeat_interval (default)"
            raise ConfigError(f"{origin}: {high_name} must be at least 3 x {low_name} "
                              f"({engine.stale_after:g} vs {engine.heartbeat_interval:g})")
        self._require_order(levels, "pool_min", engine.pool_min, "pool_max", engine.pool_max, strict=False)
        return engine

    def _require_order(
        self, levels: Sequence[_TablePath], low_key: str, low: float, high_key: str, high: float, *, strict: bool
    ) -> None:
        if high > low or (not strict and high == low):
            return
        low_found, high_found = self._find(levels, low_key), self._find(levels, high_key)
        origin = (high_found or low_found or (None, _Where(self._label, "", True)))[1].origin
        high_name = high_found[1].key if high_found else f"{high_key} (default)"
        low_name = low_found[1].key if low_found else f"{low_key} (default)"
        relation = "greater than" if strict else "at least"
        raise ConfigError(f"{origin}: {high_name} must be {relation} {low_name} ({high:g} vs {low:g})")

    def _console(self, env: str | None) -> ConsoleConfig:
        return self._read(ConsoleConfig, self._levels(env, ("console",)))

    def _flow(self, env: str | None, name: str) -> FlowConfig:
        own = self._levels(env, ("flows", name))
        levels = own + self._levels(env, ("global",))
        handler_found = self._find(own, "handler")
        if handler_found is None:  # validate() guarantees [flows.NAME] has one
            raise AssertionError(name)
        flow = self._read(FlowConfig, levels, name=name, handler=_ref(*handler_found))
        self._check_backoff(levels, flow.backoff)
        return flow

    def _check_backoff(self, levels: Sequence[_TablePath], backoff: BackoffPolicy) -> None:
        if backoff.cap >= backoff.base:
            return
        found = self._resolve_subtable(levels, "backoff")
        cap_where = found["cap"][1] if "cap" in found else None
        base_where = found["base"][1] if "base" in found else None
        origin = (cap_where or base_where or _Where(self._label, "", True)).origin
        cap_name = cap_where.key if cap_where else "backoff.cap (default)"
        base_name = base_where.key if base_where else "backoff.base (default)"
        raise ConfigError(f"{origin}: {cap_name} must be at least {base_name} "
                          f"({backoff.cap:g}s vs {backoff.base:g}s)")

    def _source(self, env: str | None, name: str) -> dict[str, object]:
        levels = self._levels(env, ("sources", name))
        source: dict[str, object] = {}
        found = self._find(levels, "connection_string")
        if found is None:
            raise ConfigError(f"{self._label}: {_dotted(('sources', name, 'connection_string'))} is required")
        text, where = _text(*found), found[1]
        source["connection_string"] = self._expand(text, where) if where.from_file else text
        timeout = self._find(levels, "timeout")
        if timeout is not None:
            source["timeout"] = _POSITIVE_DURATION(*timeout)
        retries = self._find(levels, "retries")
        if retries is not None:
            source["retries"] = _SOURCE_KEYS["retries"](*retries)
        return source

    def _expand(self, text: str, where: _Where) -> str:
        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            value = self._environ.get(name)
            if value is None:
                raise ConfigError(f"{where} uses ${{{name}}}, but {name} is not set in the environment")
            return value

        return _ENV_REF_RE.sub(substitute, text)

    def settings(self, path: Path | None, env: str | None, dsn: str | None) -> Settings:
        levels = self._levels(env, ("global",))
        if not dsn:
            dsn = self._environ.get("SKIPLOCK_DSN") or self._resolve(levels, "dsn", _text, "") or None
        return Settings(
            path=path,
            env=env,
            dsn=dsn,
            listen_dsn=self._environ.get("SKIPLOCK_LISTEN_DSN") or self._resolve(levels, "listen_dsn", _text, "") or None,
            application_name=self._resolve(levels, "application_name", _ENGINE_KEYS["application_name"], "skiplock"),
            engine=self._engine(env),
            console=self._console(env),
            flows={name: self._flow(env, name) for name in self._flows},
            sources={name: self._source(env, name) for name in self._sources},
            schedules={name: self._read(ScheduleConfig, [("schedules", name)], name=name)
                       for name in self._schedules},
        )


MAX_CONFIG_BYTES: Final = 1 << 20


def _read_document(path: Path, label: str) -> dict[str, object]:
    return read_toml_document(path, label, "config file")


def read_toml_document(path: Path, label: str, kind: str) -> dict[str, object]:
    """A TOML file read as config files are: regular, at most MAX_CONFIG_BYTES, UTF-8; errors name `label`."""
    data = read_small_file(path, label, kind, MAX_CONFIG_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{label}: not valid UTF-8 (byte {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: TOML syntax error: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{label}: TOML nested too deeply") from None


def read_small_file(path: Path, label: str, kind: str, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; a FIFO, a device (/dev/zero) or a
    bigger file is a ConfigError naming `label`, never a hang or a MemoryError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO must not wait
    except FileNotFoundError:
        raise ConfigError(f"{label}: {kind} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{label}: is a directory, not a {kind}") from None
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read {kind}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"{label}: is a directory, not a {kind}")
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{label}: not a regular file, cannot be a {kind}")
        with os.fdopen(fd, "rb", closefd=False) as stream:
            data = stream.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read {kind}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ConfigError(f"{label}: {kind} is larger than {limit // 1024} KiB")
    return data


def load_settings(
    path: Path | str | None = None,
    env: str | None = None,
    environ: Mapping[str, str] | None = None,
    dsn: str | None = None,
    *,
    builtin_flows: bool = False,
) -> Settings:
    """Settings from `path` (else $SKIPLOCK_CONFIG, else defaults only) for environment `env` (else
    $SKIPLOCK_ENV, else none), with SKIPLOCK__... overrides from `environ` (default: os.environ).
    The DSN is `dsn`, else $SKIPLOCK_DSN, else the file's, else None (embedded PostgreSQL).
    `builtin_flows`: include the demo flows (noop, sleep, flaky) even where the file does not name them."""
    variables: Mapping[str, str] = os.environ if environ is None else environ
    # Empty values count as unset: compose files and CI often export VAR= to mean "nothing".
    chosen = str(path) if path is not None and str(path) else variables.get("SKIPLOCK_CONFIG") or None
    file_path = Path(chosen) if chosen else None
    label = chosen or ""
    loader = _Loader(label, variables, builtin_flows)
    if file_path is not None:
        loader.add_document(_read_document(file_path, label))
    else:
        loader.add_document({})
    if env:
        selected = loader.select_env(env, from_variable=False)
    else:
        selected = loader.select_env(variables.get("SKIPLOCK_ENV") or None, from_variable=True)
    loader.apply_overrides()
    loader.validate()
    return loader.settings(file_path, selected, dsn or None)


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """--dsn, --config and --env: where every command reads its settings from."""
    parser.add_argument("--dsn", help="PostgreSQL connection string (default: SKIPLOCK_DSN, then the config)")
    parser.add_argument("--config", type=Path,
                        help="config file (default: SKIPLOCK_CONFIG; ./config.toml is not read unless named)")
    parser.add_argument("--env", help="environment in the config file (default: SKIPLOCK_ENV)")


def resolve_dsn(settings: Settings) -> str:
    """--dsn, SKIPLOCK_DSN, the config file; else the `engine dev` cluster when it is running."""
    if settings.dsn:
        problem = utf8_problem(settings.dsn)
        if problem is not None:
            raise ConfigError(f"the DSN (--dsn, SKIPLOCK_DSN or the config's dsn) is not valid UTF-8 ({problem})")
        return settings.dsn
    from engine.embedded import running_dev_dsn  # lazily: starts nothing

    dev = running_dev_dsn()
    if dev is not None:
        return dev
    message = ("no database configured: pass --dsn, set SKIPLOCK_DSN, set `dsn` in a config file named by "
               "--config or SKIPLOCK_CONFIG, or start `engine dev`")
    if settings.path is None and Path("config.toml").is_file():
        message += "; ./config.toml is here but is read only when named (--config config.toml)"
    raise ConfigError(message)
