"""The control plane: operators' commands to running engines (`engine scale|drain|stop`, the console's
Engines view), and the supervisor's side that hears them.

A command is a row of skiplock.engine_commands plus a NOTIFY on `skiplock_control` whose payload is
the engine's id. The supervisor LISTENs (one connection, `listen_dsn` when set, since PgBouncer in
transaction mode cannot carry LISTEN) and reads its pending commands when woken; its heartbeat thread
also reports pending commands every interval, so a missed wake-up costs at most one heartbeat. The
engine writes each command's outcome into its row; the sender waits for it (with a timeout, after
which it withdraws the command so it cannot run later, unseen).

The commands: `scale N` (1..MAX_WORKERS worker processes; forks or stops workers through the
supervisor's own paths; acknowledged once the new count runs), `drain` (stop claiming, finish the
jobs in hand as on SIGTERM, exit 0) and `stop` (kill the workers now and hand their jobs back at once,
exit 0). An engine that is gone (no heartbeat within its own stale_after), stopped, or already
draining or stopping refuses every command.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import psycopg

from engine import db, store
from engine.errors import SkiplockError, ValidationError
from engine.limits import MAX_WORKERS
from engine.redact import describe_error
from engine.telemetry import CANCEL_CHANNEL, ENQUEUED_CHANNEL, RELAY_CANCEL, RELAY_ENQUEUED, relay_enqueued

log = logging.getLogger("skiplock.engine")

CONTROL_CHANNEL: Final = "skiplock_control"
COMMANDS: Final = ("scale", "drain", "stop")
DEFAULT_TIMEOUT: Final = 30.0
_ENGINE_REF: Final = re.compile(r"[0-9a-f]{4,32}")
SHORT_ID: Final = 12  # how many characters of an engine id the CLI and the console show


class EngineGone(SkiplockError):
    """The engine is gone, stopped, or already on its way out: nothing was sent."""


class CommandRefused(SkiplockError):
    """The engine read the command and refused it (its outcome says why)."""


class CommandTimeout(SkiplockError):
    """No acknowledgement in time; the command was withdrawn."""


@dataclass(frozen=True)
class CommandResult:
    engine: str
    command: str
    outcome: str


def check_workers(workers: int | None, where: str = "--workers") -> int:
    if workers is None:
        raise ValidationError(f"{where} is required for scale")
    if not 1 <= workers <= MAX_WORKERS:
        raise ValidationError(f"{where} {workers} must be an integer from 1 to {MAX_WORKERS}")
    return workers


def resolve_engine(conn: psycopg.Connection[Any], ref: str) -> store.EngineRef:
    """The engine an id, or a unique prefix of one (at least 4 hex characters), names."""
    if not _ENGINE_REF.fullmatch(ref):
        raise ValidationError(f"ENGINE {ref!r} must be an engine id or a prefix of one (4 to 32 hex "
                              "characters, as `engine engines` shows)")
    found = store.engine_find(conn, ref)
    if not found:
        raise ValidationError(f"no engine {ref!r} (`engine engines` lists them)")
    if len(found) > 1 and found[0].id != ref:
        raise ValidationError(f"ENGINE {ref!r} is ambiguous ({found[0].id[:SHORT_ID]}, {found[1].id[:SHORT_ID]}, ...): "
                              "give more characters")
    return found[0]


def _refusal(engine: store.EngineRef) -> str | None:
    short = engine.id[:SHORT_ID]
    if engine.state == "gone":
        return f"engine {short} is gone (no heartbeat for {engine.heartbeat_age:.0f}s): command refused"
    if engine.state == "stopped":
        return f"engine {short} has stopped: command refused"
    if engine.state in ("draining", "stopping"):
        return f"engine {short} is already {engine.state}: command refused"
    return None


def send_command(conn: psycopg.Connection[Any], ref: str, command: str, workers: int | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT, notify: bool = True) -> CommandResult:
    """Send one command and wait for the engine's acknowledgement. Raises ValidationError (bad input),
    EngineGone (nothing sent), CommandRefused (the engine said no) or CommandTimeout (withdrawn)."""
    if command not in COMMANDS:
        raise ValidationError(f"command {command!r} must be one of {', '.join(COMMANDS)}")
    if command == "scale":
        check_workers(workers)
    elif workers is not None:
        raise ValidationError(f"--workers goes with scale, not {command}")
    if not 0 < timeout <= 3600:
        raise ValidationError(f"--timeout {timeout:g} must be more than 0 and at most 3600 seconds")
    engine = resolve_engine(conn, ref)
    refusal = _refusal(engine)
    if refusal is not None:
        raise EngineGone(refusal)
    command_id = store.engine_command_send(conn, engine.id, command, workers, notify=notify)
    if command_id is None:  # it went away between the two statements
        refusal = _refusal(resolve_engine(conn, engine.id))
        raise EngineGone(refusal or f"engine {engine.id[:SHORT_ID]} is not running: command refused")
    deadline = time.monotonic() + timeout
    pause = 0.02
    while True:
        state = store.engine_command_get(conn, command_id)
        if state is not None and state.acked:
            break
        if time.monotonic() >= deadline:
            if store.engine_command_withdraw(conn, command_id):
                raise CommandTimeout(f"engine {engine.id[:SHORT_ID]} did not acknowledge {command} within "
                                     f"{timeout:g}s; the command was withdrawn")
            continue  # acknowledged meanwhile: read it
        time.sleep(min(pause, max(deadline - time.monotonic(), 0.0)))
        pause = min(pause * 2, 0.5)
    outcome = state.outcome or ""
    if not state.ok:
        raise CommandRefused(f"engine {engine.id[:SHORT_ID]}: {outcome}")
    return CommandResult(engine.id, command, outcome)


# ---------------------------------------------------------------------------------------------
# Supervisor side


class ControlWakeup:
    """A pipe the supervisor's main loop waits on (it has a fileno, as multiprocessing's wait wants);
    the control listener and the heartbeat thread write to it."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)

    def set(self) -> None:
        try:
            os.write(self._w, b"\0")
        except BlockingIOError:
            pass

    def fileno(self) -> int:
        return self._r

    def take(self) -> bool:
        got = False
        try:
            while os.read(self._r, 4096):
                got = True
        except BlockingIOError:
            pass
        return got


class ControlListener:
    """The engine's one LISTEN connection (on `dsn`: the direct listen_dsn when one is set), read by a
    thread: skiplock_control wakes the supervisor when a notification names its engine, and every
    skiplock_enqueued and skiplock_cancel notification is relayed to the workers (`relay`), so they need no LISTEN
    connection of their own. After a reconnect it does both: what was sent meanwhile was not heard."""

    def __init__(self, dsn: str, application_name: str, engine_id: str, wake: ControlWakeup,
                 relay: Callable[[bytes], None] | None = None) -> None:
        self.dsn = dsn
        self.application_name = application_name
        self.engine_id = engine_id
        self.wake = wake
        self.relay = relay or (lambda kind: None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="control-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()  # the thread is a daemon: it is not joined (its read ends within a second)

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                with db.connect(self.dsn, application_name=self.application_name) as conn:
                    db.listen(conn, CONTROL_CHANNEL, "listen_dsn")
                    db.listen(conn, ENQUEUED_CHANNEL, "listen_dsn")
                    db.listen(conn, CANCEL_CHANNEL, "listen_dsn")
                    if failing:
                        log.info("control listener reconnected")
                        failing = False
                    self.wake.set()
                    self.relay(RELAY_ENQUEUED + RELAY_CANCEL)
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            if note.channel == ENQUEUED_CHANNEL:
                                self.relay(relay_enqueued(note.payload))
                            elif note.channel == CANCEL_CHANNEL:
                                self.relay(RELAY_CANCEL)
                            elif note.payload == self.engine_id:
                                self.wake.set()
            except psycopg.Error as exc:
                if not failing:
                    log.warning("control listener lost its connection (commands still arrive with the "
                                "heartbeat): %s", describe_error(exc))
                    failing = True
                self._stop.wait(1.0)
            except SkiplockError as exc:  # LISTEN through a pooler: say so once, rely on the heartbeat
                log.error("%s", exc)
                return
