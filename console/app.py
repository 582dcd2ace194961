"""The skiplock ops console: `console` (or `engine console`).

Data flow: a thread worker reads a snapshot of the tables every refresh interval (console/data.py:
bounded, index-backed reads; a one-shot timer re-armed after each read, as Dolphie does) and one async
worker LISTENs (console/feed.py) and posts telemetry events as messages. Both land in `LiveState`
(console/state.py); the active screen redraws from it at most twice a second, or at once after a
snapshot, a key or a pause. Events that make counts stale (a dead letter, a worker starting or
stopping, a pause) trigger an early snapshot, so exact numbers follow NOTIFY within a fraction of a
second without polling faster.

Intents go up, data comes down (console/messages.py): a screen never calls the app to do something;
it posts an intent (open a job, load dead letters, retry, purge, pause) that bubbles to the `@on`
handlers below, and the app posts the answer back to the screen that asked. Screens read data only:
`LiveState`, the clock, the theme. The header is `console.status.header_text()`, a pure function.

Screens are modes, each one key away: overview (1/o), failures (2/f), dead letters (3/d), jobs (4/b),
running (5/w), schedules (6/s), engines (7/g), pipelines (8/l); the job
detail is pushed on top (Enter, or j and an id). `/` filters, `?` lists every key, ctrl+p opens the
command palette, z freezes the display, ctrl+r refreshes now. Every binding has an id, so a keymap
file can rebind it. In read-only mode (`--read-only` or `[console] read_only = true`) the actions that
write are not offered at all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from functools import partial
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any, Final

import psycopg
from rich.text import Text
from textual import on, work
from textual.app import App, ScreenStackError, SystemCommand
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.message_pump import MessagePump
from textual.screen import Screen
from textual.timer import Timer
from textual.worker import get_current_worker

from console.data import COUNT_CAP, DataSource
from console.feed import Feed
from console.messages import (ActionDone, ActionFinished, CancelJobs, CancelRunning, ClearFailures, CycleWindow,
                              DeadLettersChanged, EngineCommand, FeedEvents, FeedStatus, Intent, JobLoaded, Load,
                              LoadDeadLetters, LoadJob, OpenJob, PageFailed, PageLoaded, PurgeCancelled, PurgeJobs,
                              PurgeMatching, RetryJobs, RetryMatching, SetFlowPaused, SetSchedulePaused,
                              ShowDeadLetters, SnapshotFailed, SnapshotLoaded, TriggerSchedule, UseFilter)
from console.screens.base import BaseScreen, ConsoleScreen
from console.screens.dead_letters import DeadLettersScreen
from console.screens.engines import EnginesScreen
from console.screens.failures import FailuresScreen
from console.screens.job import JobScreen
from console.screens.jobs import JobsScreen
from console.screens.modals import HelpScreen, PromptScreen
from console.screens.overview import OverviewScreen
from console.screens.running import RunningScreen
from console.screens.pipelines import PipelinesScreen
from console.screens.schedules import SchedulesScreen
from console.state import WINDOWS, FailureRow, LiveState
from console.status import Attachment, Colours, header_text, health
from engine import roles
from engine.config import read_toml_document
from engine.control import SHORT_ID
from engine.errors import SkiplockError
from engine.health import Thresholds
from engine.queue import DeadLetterFilter
from engine.redact import describe_error, redact_dsn

# Each screen with keys of its own, in the order `?` and --list-bindings show them.
SCREEN_KEYS: Final = (("Overview", OverviewScreen), ("Failures", FailuresScreen), ("Dead letters", DeadLettersScreen),
                      ("Jobs", JobsScreen), ("Running", RunningScreen), ("Schedules", SchedulesScreen),
                      ("Engines", EnginesScreen), ("Job", JobScreen))
# Actions that write to the database (each screen's WriteBindings): not offered in read-only mode.
WRITE_ACTIONS: Final = frozenset().union(*(screen.write_actions() for _, screen in SCREEN_KEYS))
FLUSH_INTERVAL_S: Final = 0.5
SOON_S: Final = 0.25  # an event that makes counts stale brings the next snapshot this close
KEY_NAMES: Final = {"slash": "/", "question_mark": "?", "plus": "+", "minus": "-", "space": "space", "escape": "esc",
                    "enter": "enter", "backspace": "backspace", "ctrl+r": "ctrl+r", "ctrl+p": "ctrl+p",
                    "ctrl+c": "ctrl+c"}
TABLE_KEYS: Final = (("↑ ↓ pgup pgdn home end", "move"), ("enter", "open the row (job, or a flow's dead letters)"),
                     ("tab", "next table"))


class ConsoleApp(App[None]):
    CSS_PATH = "console.tcss"
    TITLE = "skiplock console"
    MODES = {"overview": OverviewScreen, "failures": FailuresScreen, "dead": DeadLettersScreen, "jobs": JobsScreen,
             "schedules": SchedulesScreen, "running": RunningScreen, "engines": EnginesScreen,
             "pipelines": PipelinesScreen}
    DEFAULT_MODE = "overview"
    BINDINGS = [
        Binding("1,o", "show('overview')", "Overview", id="skiplock.overview"),
        Binding("2,f", "show('failures')", "Failures", id="skiplock.failures"),
        Binding("3,d", "show('dead')", "Dead letters", id="skiplock.dead_letters"),
        Binding("4,b", "show('jobs')", "Jobs", id="skiplock.jobs"),
        Binding("5,w", "show('running')", "Running", id="skiplock.running"),
        Binding("6,s", "show('schedules')", "Schedules", id="skiplock.schedules"),
        Binding("7,g", "show('engines')", "Engines", id="skiplock.engines"),
        Binding("8,l", "show('pipelines')", "Pipelines", id="skiplock.pipelines"),
        Binding("j", "open_job", "Job…", show=False, id="skiplock.job"),
        Binding("question_mark", "help", "Help", id="skiplock.help"),
        Binding("z", "freeze", "Freeze", id="skiplock.freeze"),
        Binding("ctrl+r", "refresh", "Refresh", show=False, id="skiplock.refresh"),
        Binding("q,ctrl+c", "quit", "Quit", id="skiplock.quit"),
    ]

    def __init__(
        self,
        dsn: str,
        *,
        read_only: bool = False,
        refresh_interval: float = 2.0,
        environment: str | None = None,
        dsn_label: str | None = None,
        clock: Callable[[], float] | None = None,
        tz: tzinfo | None = None,
        live: bool = True,
        stale_after: float = 30.0,
        thresholds: Thresholds | None = None,
        keymap: dict[str, str] | None = None,
        count_cap: int = COUNT_CAP,
        quit_after: float | None = None,
        listen_dsn: str | None = None,
    ) -> None:
        super().__init__()
        self.dsn = dsn
        self.listen_dsn = listen_dsn  # the live feed's direct connection when dsn goes through PgBouncer
        self.read_only = read_only
        self.refresh_interval = refresh_interval
        self.environment = environment
        self.dsn_label = dsn_label if dsn_label is not None else redact_dsn(dsn)
        self.fixed_clock = clock is not None
        self._clock = clock or time.time
        self.tz = tz or datetime.now().astimezone().tzinfo
        self.live = live
        self.stale_after = stale_after
        self.thresholds = thresholds if thresholds is not None else Thresholds(stale_after=stale_after)
        self.keymap = dict(keymap or {})
        self.quit_after = quit_after
        self.data = DataSource(dsn, refresh_interval=refresh_interval, now=clock, count_cap=count_cap,
                               thresholds=self.thresholds)
        self.state = LiveState()
        self.window = 300
        self.frozen = False
        self.database_down = False
        self.db_error: str | None = None
        self.down_since: float | None = None
        self.feed: Feed | None = None
        self.feed_connected = False
        self.feed_error: str | None = None
        self.last_action: str | None = None
        # The screen that reads dead letters (the origin of the last LoadDeadLetters): told when they change.
        self.dead_screen: MessagePump | None = None
        self._pending: set[str] = set()
        self._loading = False
        self._load_again = False
        self._refresh_timer: Timer | None = None
        self._soon_timer: Timer | None = None
        self._backfilled = False
        self.snapshots = 0

    # -- time -----------------------------------------------------------------------------------------

    def now(self) -> float:
        """The console's reference time (a fixed clock in tests, never read directly by widgets)."""
        return self._clock()

    # -- lifecycle --------------------------------------------------------------------------------------

    def on_mount(self) -> None:
        if self.keymap:
            self.set_keymap(self.keymap)
        if self.live:
            self.feed = Feed(self.listen_dsn or self.dsn, self.post_message, refresh_interval=self.refresh_interval, clock=self.now)
            self.run_worker(self.feed.run(), group="feed", exclusive=True, exit_on_error=False)
        self.set_interval(FLUSH_INTERVAL_S, self._redraw)
        if self.quit_after:
            self.set_timer(self.quit_after, self.exit)
        self.request_refresh()

    def on_unmount(self) -> None:
        self.data.close()

    # -- snapshot ------------------------------------------------------------------------------------------

    def request_refresh(self) -> None:
        """Read a snapshot now (in a thread); if one is being read, read again when it is done."""
        if self._loading:
            self._load_again = True
            return
        self._loading = True
        self._read_snapshot()

    @work(thread=True, group="snapshot", exit_on_error=False)
    def _read_snapshot(self) -> None:
        try:
            snapshot = self.data.snapshot()
        except psycopg.errors.UndefinedTable:
            self.post_message(SnapshotFailed("no skiplock schema in this database: run `engine migrate`"))
        except psycopg.errors.InsufficientPrivilege as exc:  # names the role to grant (engine/roles.py)
            self.post_message(SnapshotFailed(roles.explain(exc, "console", self.dsn)))
        except (psycopg.Error, OSError) as exc:
            self.post_message(SnapshotFailed(describe_error(exc)))
        except Exception as exc:  # never let a bad row take the console down: show it instead
            self.post_message(SnapshotFailed(f"{type(exc).__name__}: {exc}"))
        else:
            self.post_message(SnapshotLoaded(snapshot))

    def _arm_refresh(self, delay: float) -> None:
        if self._refresh_timer is not None:
            self._refresh_timer.stop()
        self._refresh_timer = self.set_timer(delay, self.request_refresh)

    def _refresh_soon(self) -> None:
        if self._soon_timer is None and not self.frozen:
            def fire() -> None:
                self._soon_timer = None
                self.request_refresh()

            self._soon_timer = self.set_timer(SOON_S, fire)

    def on_snapshot_loaded(self, message: SnapshotLoaded) -> None:
        was_down = self.database_down
        self._loading = False
        self.snapshots += 1
        self.database_down = False
        self.db_error = None
        self.down_since = None
        self.state.set_snapshot(message.snapshot)
        if not self.frozen:
            self._redraw(force={"snapshot", "dead"})
        if was_down or not self._backfilled:
            self._backfilled = True
            self._load_failures()
            if was_down:
                self._dead_letters_changed()
        if self._load_again:
            self._load_again = False
            self.request_refresh()
        elif not self.frozen:
            self._arm_refresh(self.refresh_interval)

    def on_snapshot_failed(self, message: SnapshotFailed) -> None:
        self._loading = False
        self._load_again = False
        if not self.database_down:
            self.down_since = self.now()
        self.database_down = True
        self.db_error = message.error
        self._redraw(force={"status"})
        self._arm_refresh(min(self.refresh_interval, 2.0))

    @work(thread=True, exclusive=True, group="backfill", exit_on_error=False)
    def _load_failures(self) -> None:
        """The latest dead letters, as failures read from the table: what the failures screen shows
        before live failures arrive."""
        try:
            letters = self.data.recent_dead(50)
        except Exception:  # the backfill is a nicety; the next reconnect tries again
            return
        rows = [FailureRow(at=d.finished_at.timestamp() if d.finished_at else 0.0, flow=d.flow, job=d.id,
                           attempt=d.attempts, max_attempts=d.max_attempts or 0, type=d.error_type or "?",
                           message=d.error_message or "", dead=True, source="table")
                for d in reversed(letters)]
        self.call_from_thread(self._add_backfill, rows)

    def _add_backfill(self, rows: list[FailureRow]) -> None:
        self.state.add_backfill(rows)
        self._pending.add("failures")

    # -- live feed ----------------------------------------------------------------------------------------

    def on_feed_events(self, message: FeedEvents) -> None:
        changed: set[str] = set()
        for event in message.events:
            changed |= self.state.apply(event)
        self._pending |= changed
        if changed & {"dead", "workers", "runs", "flows"}:
            self._refresh_soon()
        if "dead" in changed:
            self._dead_letters_changed(soon=True)
        if "flows" in changed and not self.frozen:
            self._redraw()

    def on_feed_status(self, message: FeedStatus) -> None:
        self.feed_connected = message.connected
        self.feed_error = message.error
        if message.connected:
            self.state.connected(message.at or self.now())
            self.request_refresh()  # resynchronise: what happened while we were away is in the tables
        else:
            self.state.disconnected()
        self._redraw(force={"status"})

    # -- drawing -------------------------------------------------------------------------------------------

    def _redraw(self, force: set[str] | None = None) -> None:
        if self.frozen and force is None:
            return
        changes = self._pending | (force or set())
        self._pending = set()
        try:
            screen = self.screen
        except ScreenStackError:  # a timer firing while the app shuts down: nothing left to draw
            return
        if isinstance(screen, BaseScreen) and screen.ready:
            try:
                screen.update_header()
                if changes or isinstance(screen, OverviewScreen):
                    screen.update_view(changes | {"tick"})
            except NoMatches:  # the screen is being torn down (shutdown, or popped under the timer)
                return

    def attachment(self) -> Attachment:
        """Where the console is attached and how its connections are doing, for the header."""
        return Attachment(dsn_label=self.dsn_label, environment=self.environment, read_only=self.read_only,
                          live=self.live, stale_after=self.stale_after, thresholds=self.thresholds, frozen=self.frozen,
                          feed_connected=self.feed_connected, feed_error=self.feed_error,
                          database_down=self.database_down, down_since=self.down_since, db_error=self.db_error)

    def header_text(self) -> Text:
        theme = self.current_theme
        colours = Colours(success=theme.success or "", warning=theme.warning or "", error=theme.error or "",
                          accent=theme.accent or "")
        return header_text(self.state, self.attachment(), now=self.now(), tz=self.tz, colours=colours)

    def health(self) -> tuple[str, str]:
        return health(self.state, self.attachment())

    # -- keys and actions -----------------------------------------------------------------------------------

    def check_write(self, action: str) -> bool | None:
        return False if (self.read_only and action in WRITE_ACTIONS) else True

    def action_show(self, mode: str) -> None:
        if isinstance(self.screen, JobScreen) or len(self.screen_stack) > 1:
            while len(self.screen_stack) > 1 and not isinstance(self.screen, ConsoleScreen):
                self.pop_screen()
        self.switch_mode(mode)

    def action_open_job(self) -> None:
        def got(value: str | None) -> None:
            if not value:
                return
            try:
                job_id = int(value.strip().lstrip("#"))
            except ValueError:
                self.notify(f"not a job id: {value!r}", severity="error")
                return
            self._open_job(job_id)

        self.push_screen(PromptScreen("Open job", "job id"), got)

    def _open_job(self, job_id: int) -> None:
        if isinstance(self.screen, JobScreen):
            self.pop_screen()
        self.push_screen(JobScreen(job_id))

    def action_freeze(self) -> None:
        self.frozen = not self.frozen
        if self.frozen:
            if self._refresh_timer is not None:
                self._refresh_timer.stop()
            self.notify("display frozen: z resumes", timeout=3)
        else:
            self.request_refresh()
        self._redraw(force={"status"})

    def action_refresh(self) -> None:
        self.request_refresh()
        self._dead_letters_changed()

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.help_sections(),
                                    footer="Rebind any key with --keymap FILE: a [keymap] table of binding id = "
                                           "\"keys\" (ids shown with --list-bindings)."))

    def binding_keys(self, binding: Binding) -> str:
        keys = self.keymap.get(binding.id, binding.key) if binding.id else binding.key
        return ", ".join(KEY_NAMES.get(k.strip(), k.strip()) for k in keys.split(","))

    def help_sections(self) -> list[tuple[str, list[tuple[str, str]]]]:
        def rows(bindings: Iterable[Any]) -> list[tuple[str, str]]:
            out = []
            for binding in bindings:
                if not isinstance(binding, Binding):
                    binding = Binding(*binding)
                if self.read_only and binding.action.split("(")[0] in WRITE_ACTIONS:
                    continue
                out.append((self.binding_keys(binding), binding.description or binding.action))
            return out

        return [
            ("Everywhere", rows(self.BINDINGS) + [("ctrl+p", "command palette")]),
            ("Every list", rows(ConsoleScreen.BINDINGS) + list(TABLE_KEYS)),
            *((title, rows(screen.BINDINGS)) for title, screen in SCREEN_KEYS),
            ("Filter qualifiers", [("flow:NAME", "one flow"), ("error:TYPE", "one error type"),
                                   ("status:S", "paused/active/open (flows), dead/retrying (failures)"),
                                   ("age:>7d  age:<10m", "died or failed longer / shorter ago"),
                                   ("words", "free text, all must appear")]),
        ]

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Overview", "Throughput, flows, workers, runs (1)", lambda: self.action_show("overview"))
        yield SystemCommand("Failures", "Live feed of failed attempts (2)", lambda: self.action_show("failures"))
        yield SystemCommand("Dead letters", "Inspect, retry, purge (3)", lambda: self.action_show("dead"))
        yield SystemCommand("Jobs", "Any job in any state: cancel, retry, purge (4)", lambda: self.action_show("jobs"))
        yield SystemCommand("Running", "Jobs running now, progress, cancel (5)", lambda: self.action_show("running"))
        yield SystemCommand("Schedules", "Next fire, last job, pause, trigger (6)", lambda: self.action_show("schedules"))
        yield SystemCommand("Engines", "The fleet: scale, drain, stop (7)", lambda: self.action_show("engines"))
        yield SystemCommand("Pipelines", "Stages top to bottom: pending, dead, done/s (8)",
                            lambda: self.action_show("pipelines"))
        yield SystemCommand("Open job", "Job detail by id (j)", self.action_open_job)
        yield SystemCommand("Refresh now", "Read the tables again (ctrl+r)", self.action_refresh)
        yield SystemCommand("Freeze display" if not self.frozen else "Unfreeze display", "z", self.action_freeze)
        yield SystemCommand("Help: keys", "Every binding (?)", self.action_help)
        snapshot = self.state.snapshot
        if snapshot is not None and not self.read_only:
            for flow in snapshot.flows:
                paused = self.state.paused(flow.name, flow.paused)
                verb = "Resume" if paused else "Pause"
                yield SystemCommand(f"{verb} flow {flow.name}", f"{verb} claiming jobs of {flow.name}",
                                    lambda name=flow.name, p=paused: self.post_message(SetFlowPaused(name, not p)))

    # -- intents: what the screens ask for --------------------------------------------------------------------

    @on(OpenJob)
    def _on_open_job(self, message: OpenJob) -> None:
        self._open_job(message.job_id)

    @on(ShowDeadLetters)
    def _on_show_dead_letters(self, message: ShowDeadLetters) -> None:
        self.switch_mode("dead")
        self.screen.post_message(UseFilter(message.filter))

    @on(CycleWindow)
    def _on_cycle_window(self, message: CycleWindow) -> None:
        self.window = WINDOWS[(WINDOWS.index(self.window) + 1) % len(WINDOWS)]
        self._redraw(force={"counts"})

    @on(ClearFailures)
    def _on_clear_failures(self, message: ClearFailures) -> None:
        self.state.failures.clear()
        self.state.failures_version += 1
        self._redraw(force={"failures"})

    @on(Load)
    def _on_load(self, message: Load) -> None:
        if isinstance(message, LoadDeadLetters):
            self.dead_screen = message.origin  # told when dead letters change
        # One reader per kind of page; a newer request cancels the older one's answer.
        self.run_worker(partial(self._read_page, message), group=type(message).__name__, exclusive=True,
                        thread=True, exit_on_error=False)

    def _read_page(self, intent: Load) -> None:
        try:
            answer: PageLoaded | PageFailed = PageLoaded(intent, intent.read(self.data))
        except (psycopg.Error, OSError, SkiplockError) as exc:
            answer = PageFailed(intent, describe_error(exc) if isinstance(exc, psycopg.Error) else str(exc))
        if not get_current_worker().is_cancelled:
            _answer(intent, answer)

    def _dead_letters_changed(self, soon: bool = False) -> None:
        if self.dead_screen is not None:
            self.dead_screen.post_message(DeadLettersChanged(soon=soon))

    @on(LoadJob)
    def _on_load_job(self, message: LoadJob) -> None:
        self._read_job(message)

    @work(thread=True, exclusive=True, group="job", exit_on_error=False)
    def _read_job(self, message: LoadJob) -> None:
        try:
            job = self.data.job(message.job_id)
            children = self.data.job_children(message.job_id) if job is not None else []
            # Why it waits (or what runs it): for jobs that have not ended.
            explanation = self.data.explain(message.job_id) if job is not None and job.status in (
                "pending", "running") else None
        except (psycopg.Error, OSError) as exc:
            self.call_from_thread(self.notify, f"job {message.job_id}: {describe_error(exc)}", severity="error")
            return
        _answer(message, JobLoaded(message.job_id, job, children, explanation))

    @on(SetSchedulePaused)
    def _on_set_schedule_paused(self, message: SetSchedulePaused) -> None:
        if self.read_only:
            return
        name, paused = message.name, message.paused

        def call() -> list[Any]:
            self.data.set_schedule_paused(name, paused)
            return [name]

        self._perform(message, f"{'paused' if paused else 'resumed'} schedule {name}:", call, None,
                      unit="schedule changed")

    @on(TriggerSchedule)
    def _on_trigger_schedule(self, message: TriggerSchedule) -> None:
        if self.read_only:
            return
        name = message.name
        self._perform(message, f"triggered schedule {name}:", lambda: [self.data.trigger_schedule(name)], None,
                      unit="job enqueued")

    @on(EngineCommand)
    def _on_engine_command(self, message: EngineCommand) -> None:
        if self.read_only:
            return
        engine_id, command, workers = message.engine_id, message.command, message.workers
        self._perform_command(message, engine_id, command, workers)

    @work(thread=True, group="action", exit_on_error=False)
    def _perform_command(self, intent: Intent, engine_id: str, command: str, workers: int | None) -> None:
        """Send a control command and report the engine's acknowledgement (or why there was none)."""
        label = f"engine {engine_id[:SHORT_ID]}"
        try:
            outcome = self.data.engine_command(engine_id, command, workers)
        except (psycopg.Error, SkiplockError, OSError) as exc:
            error = describe_error(exc) if isinstance(exc, psycopg.Error) else str(exc)
            self.post_message(ActionFinished(intent, f"{command} failed: {error}", [], error=True))
            return
        self.post_message(ActionFinished(intent, f"{label}: {outcome}", [engine_id]))

    # -- operator actions: each reports how many rows it changed ---------------------------------------------

    @on(RetryJobs)
    def _on_retry_jobs(self, message: RetryJobs) -> None:
        ids = list(message.ids)
        self._perform(message, "retried", lambda: self.data.retry(DeadLetterFilter(ids=ids)), len(ids))

    @on(PurgeJobs)
    def _on_purge_jobs(self, message: PurgeJobs) -> None:
        ids = list(message.ids)
        self._perform(message, "purged", lambda: self.data.purge(DeadLetterFilter(ids=ids)), len(ids))

    @on(RetryMatching)
    def _on_retry_matching(self, message: RetryMatching) -> None:
        where = message.where
        self._perform(message, "retried",
                      lambda: self.data.retry_all() if where.is_empty() else self.data.retry(where), None)

    @on(PurgeMatching)
    def _on_purge_matching(self, message: PurgeMatching) -> None:
        where = message.where
        self._perform(message, "purged", lambda: self.data.purge(where), None)

    @on(CancelJobs)
    def _on_cancel_jobs(self, message: CancelJobs) -> None:
        ids = list(message.ids)
        self._perform(message, "cancelled", lambda: self.data.cancel(ids).cancelled, len(ids), unit="job(s)")

    @on(CancelRunning)
    def _on_cancel_running(self, message: CancelRunning) -> None:
        if self.read_only:
            return
        ids = list(message.ids)
        self._perform(message, "cancel requested for", lambda: self.data.cancel_running(ids).requested, len(ids),
                      unit="running job(s)")

    @on(PurgeCancelled)
    def _on_purge_cancelled(self, message: PurgeCancelled) -> None:
        ids = list(message.ids)
        self._perform(message, "purged", lambda: self.data.purge_cancelled(ids), len(ids), unit="cancelled job(s)")

    @on(SetFlowPaused)
    def _on_set_flow_paused(self, message: SetFlowPaused) -> None:
        if self.read_only:
            return
        flow, paused = message.flow, message.paused

        def call() -> list[Any]:
            self.data.set_paused(flow, paused)  # an upsert of the flow's row: always that one row
            return [flow]

        self._perform(message, f"{'paused' if paused else 'resumed'} flow {flow}:", call, None, unit="flow changed")

    @work(thread=True, group="action", exit_on_error=False)
    def _perform(self, intent: Intent, verb: str, call: Callable[[], list[Any]], requested: int | None,
                 unit: str = "dead letter(s)") -> None:
        """Run an operator action in a thread; report what it changed (the Queue methods return ids)."""
        try:
            changed = call()
        except psycopg.errors.InsufficientPrivilege as exc:  # names the role to grant (engine/roles.py)
            self.post_message(ActionFinished(intent, f"{verb} failed: {roles.explain(exc, 'console actions', self.dsn)}",
                                             [], error=True))
            return
        except (psycopg.Error, SkiplockError, OSError) as exc:
            error = describe_error(exc) if isinstance(exc, psycopg.Error) else str(exc)
            self.post_message(ActionFinished(intent, f"{verb} failed: {error}", [], error=True))
            return
        text = f"{verb} {len(changed)} {unit}"
        if requested is not None and len(changed) < requested:
            text += f" ({requested - len(changed)} of the {requested} asked for had already changed)"
        self.post_message(ActionFinished(intent, text, list(changed)))

    def on_action_finished(self, message: ActionFinished) -> None:
        self.last_action = message.text
        self.notify(message.text, title="error" if message.error else "done",
                    severity="error" if message.error else "information")
        _answer(message.intent, ActionDone(message.text, message.changed, error=message.error))
        self.request_refresh()
        self._dead_letters_changed()


def _answer(intent: Intent, result: Any) -> None:
    """Post `result` to the screen that asked (thread-safe); an intent without an origin wants none."""
    if intent.origin is not None:
        intent.origin.post_message(result)


# ---------------------------------------------------------------------------------------------
# Command line


def load_keymap(path: Path | None) -> dict[str, str]:
    """`[keymap]` table of binding id = "keys" (comma-separated). Default file:
    $XDG_CONFIG_HOME/skiplock/keymap.toml when it exists."""
    if path is None:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        path = base / "skiplock" / "keymap.toml"
        if not path.exists():
            return {}
    document = read_toml_document(path, str(path), "keymap file")  # regular file, size-bounded, as config
    table = document.get("keymap", {})
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise SkiplockError(f"{path}: [keymap] must map binding ids to key strings, e.g. \"skiplock.dead_letters\" = \"3,d\"")
    return {str(k): str(v) for k, v in table.items()}


def all_bindings() -> list[tuple[str, str, str]]:
    """(id, keys, description) of every binding, for --list-bindings."""
    found = []
    for owner in (ConsoleApp, ConsoleScreen, *(screen for _, screen in SCREEN_KEYS)):
        for binding in owner.BINDINGS:
            if isinstance(binding, Binding) and binding.id:
                found.append((binding.id, binding.key, binding.description))
    return found
