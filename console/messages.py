"""The console's messages.

Three kinds, as in Toolong and Harlequin:
- what the live feed and the snapshot reader tell the app (FeedEvents, FeedStatus, SnapshotLoaded,
  SnapshotFailed);
- intents: what a screen asks the app for (open a job, load dead letters, retry, purge, pause). A
  screen posts them on itself and they bubble to the app's `@on` handlers; `origin` is the screen
  that asked, so the answer goes back to it and nowhere else;
- results: the app's answers, posted to the screen that asked. They do not bubble (a screen that
  ignores one must not send it back up to the app).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from textual.message import Message
from textual.message_pump import MessagePump

from console.data import DataSource, DeadLetterPage, EnginePage, JobsPage, RunningPage, SchedulePage, Snapshot
from console.filters import Filter
from engine.pipelines import Pipeline
from engine.explain import Explanation
from engine.queue import DeadLetterFilter, Job, JobFilter
from engine.store import ChildJob

# -- from the feed and the snapshot reader ---------------------------------------------------------


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


@dataclass
class SnapshotLoaded(Message):
    snapshot: Snapshot


@dataclass
class SnapshotFailed(Message):
    error: str


@dataclass
class ActionFinished(Message):
    """An operator action's thread is done (app-internal: the app notifies, then answers the origin)."""

    intent: "Intent"
    text: str
    changed: list[object]
    error: bool = False


# -- intents: screen -> app ------------------------------------------------------------------------


@dataclass
class Intent(Message):
    """What a screen asks for. `origin` is set by `ConsoleScreen.ask()` (or by whoever posts it)."""

    origin: MessagePump | None = field(default=None, kw_only=True, repr=False, compare=False)


@dataclass
class OpenJob(Intent):
    """Show the job detail screen for `job_id`."""

    job_id: int


@dataclass
class ShowDeadLetters(Intent):
    """Switch to the dead letters, filtered."""

    filter: Filter


@dataclass
class Load(Intent):
    """Read what a view shows, in a thread; answered with PageLoaded or PageFailed, which carry this
    intent (so a view can tell an answer to an older question from the one it waits for)."""

    def read(self, data: DataSource) -> Any:
        raise NotImplementedError


@dataclass
class LoadDeadLetters(Load):
    """A page of dead letters matching `where`, with the counts by error type."""

    where: DeadLetterFilter

    def read(self, data: DataSource) -> DeadLetterPage:
        return data.dead_letters(self.where)


@dataclass
class LoadJob(Intent):
    """Read one job; answered with JobLoaded."""

    job_id: int


@dataclass
class RetryJobs(Intent):
    """Retry these dead letters (the SQL leaves any that is no longer dead alone)."""

    ids: list[int]


@dataclass
class PurgeJobs(Intent):
    ids: list[int]


@dataclass
class RetryMatching(Intent):
    """Retry every dead letter matching `where` (an empty filter means all of them)."""

    where: DeadLetterFilter


@dataclass
class PurgeMatching(Intent):
    where: DeadLetterFilter


@dataclass
class LoadJobs(Load):
    """The jobs matching `where` (any state)."""

    where: JobFilter

    def read(self, data: DataSource) -> JobsPage:
        return data.jobs(self.where)


@dataclass
class CancelJobs(Intent):
    """Cancel these jobs if still pending or scheduled (the SQL leaves any other alone)."""

    ids: list[int]


@dataclass
class LoadRunning(Load):
    """The jobs running now."""

    def read(self, data: DataSource) -> RunningPage:
        return data.running()


@dataclass
class CancelRunning(Intent):
    """Ask the workers running these jobs to cancel them (the SQL leaves jobs no longer running alone)."""

    ids: list[int]


@dataclass
class PurgeCancelled(Intent):
    """Delete these cancelled jobs (the SQL leaves any other alone)."""

    ids: list[int]


@dataclass
class SetFlowPaused(Intent):
    flow: str
    paused: bool


@dataclass
class LoadSchedules(Load):
    """Every schedule."""

    def read(self, data: DataSource) -> SchedulePage:
        return data.schedules()


@dataclass
class LoadPipelines(Load):
    """Every pipeline's stages and their counts."""

    def read(self, data: DataSource) -> list[Pipeline]:
        return data.pipelines()


@dataclass
class SetSchedulePaused(Intent):
    name: str
    paused: bool


@dataclass
class TriggerSchedule(Intent):
    """Enqueue one job of the schedule now."""

    name: str


@dataclass
class LoadEngines(Load):
    """The fleet's engines."""

    def read(self, data: DataSource) -> EnginePage:
        return data.engines()


@dataclass
class EngineCommand(Intent):
    """Scale, drain or stop a running engine (engine/control.py); answered with ActionDone."""

    engine_id: str
    command: str
    workers: int | None = None


@dataclass
class CycleWindow(Intent):
    """The chart's next time window."""


@dataclass
class ClearFailures(Intent):
    """Forget the failures shown so far."""


# -- results: app -> the screen that asked ----------------------------------------------------------


@dataclass
class Result(Message, bubble=False):
    pass


@dataclass
class PageLoaded(Result):
    """What a Load intent read (its `read()`'s return)."""

    intent: Load
    page: Any


@dataclass
class PageFailed(Result):
    """A Load intent's read failed: `error` says why (redacted)."""

    intent: Load
    error: str


@dataclass
class DeadLettersChanged(Result):
    """Dead letters came or went since the screen read its page. `soon`: several may follow (a burst
    of events), so wait a moment before reading again."""

    soon: bool = False


@dataclass
class JobLoaded(Result):
    job_id: int
    job: Job | None
    children: list[ChildJob] = field(default_factory=list)  # the jobs its ack created (Next)
    explanation: Explanation | None = None  # why it waits (pending, scheduled) or what runs it


@dataclass
class ActionDone(Result):
    """An operator action the screen asked for finished: `changed` holds the ids (or names) it changed."""

    text: str
    changed: list[object]
    error: bool = False


@dataclass
class UseFilter(Result):
    """Show this filter (the app switched to the screen on the user's behalf)."""

    filter: Filter
