"""Users' hooks run by the supervisor (a run's on_complete), off its loop.

A hook is user code: it may be slow or hang. Each call runs in a daemon thread of its own, so the
supervisor's loop (reaping, restarts, rescue) never waits for one. Python cannot stop a thread, so
the timeout is a deadline for our attention, not a kill: a hook still running past it is logged
once (and keeps running until it returns or the engine exits). Hooks are rare (one per run).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

log = logging.getLogger("skiplock.engine")

HOOK_TIMEOUT: Final = 60.0


@dataclass
class _Call:
    what: str
    thread: threading.Thread
    deadline: float
    reported: bool = False


@dataclass
class HookRunner:
    timeout: float = HOOK_TIMEOUT
    _calls: list[_Call] = field(default_factory=list)

    def submit(self, what: str, hook: Callable[..., Any], *args: Any) -> None:
        def run() -> None:
            try:
                hook(*args)
            except Exception:
                log.exception("%s failed", what)

        thread = threading.Thread(target=run, name="hook", daemon=True)
        thread.start()
        self._calls.append(_Call(what, thread, time.monotonic() + self.timeout))

    def check(self, now: float) -> None:
        """From the supervisor's loop: forget finished calls, report overdue ones once."""
        for call in list(self._calls):
            if not call.thread.is_alive():
                self._calls.remove(call)
            elif now >= call.deadline and not call.reported:
                call.reported = True
                log.error("%s still running after %.0fs; the engine does not wait for it", call.what, self.timeout)

    def running(self) -> int:
        return sum(1 for call in self._calls if call.thread.is_alive())
