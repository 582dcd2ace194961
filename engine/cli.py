"""The `engine` command. Contract: README.md, "The `engine` command"; every subcommand has --help.

Exit codes: 0 ok; 1 `health` degraded, `cancel` changed nothing, `wait`: the job died or was
cancelled; 2 bad input, unreachable database or `health` unhealthy; 3 `wait` timed out; see
`engine run --help` for the engine's own.
Errors are one line on stderr with DSN passwords redacted, never a traceback.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import psycopg

from engine import __version__, control, db, roles, store
from engine.config import Settings, add_settings_arguments, load_settings, parse_duration, recorded_policy, resolve_dsn
from engine.errors import JobFailed, SkiplockError, ValidationError, WaitTimeout
from engine.limits import INT4_MAX, MAX_WORKERS, utf8_problem
from engine.migrate import migrate
from engine.payloads import loads_exact
from engine.redact import describe_error, hide_secrets_in_process_title, redact_dsn, redact_text
from engine.report import clip, print_json, print_status, print_table
from engine.store import Job
from engine.schedules import describe as describe_schedule

if TYPE_CHECKING:  # engine.queue loads with the commands that use it: not on `engine run`'s path
    from engine.queue import DeadLetterFilter, Queue

EXIT_OK = 0
EXIT_DEGRADED = 1
EXIT_ERROR = 2
EXIT_TIMEOUT = 3


class CliError(SkiplockError):
    pass


# ---------------------------------------------------------------------------------------------
# Shared plumbing


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, env=args.env, dsn=args.dsn)


def _queue(args: argparse.Namespace) -> Queue:
    from engine.queue import Queue
    settings = _settings(args)
    return Queue(resolve_dsn(settings), application_name=f"{settings.application_name}-cli")


def _duration(where: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            return parse_duration(text, where)
        except SkiplockError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _filter(args: argparse.Namespace) -> DeadLetterFilter:
    from engine.queue import DeadLetterFilter
    ids = list(args.ids) if getattr(args, "ids", None) else None
    return DeadLetterFilter(ids=ids, flow=args.flow, error_type=args.error, older_than=args.older_than)


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with db.connect(resolve_dsn(settings), application_name=f"{settings.application_name}-migrate") as conn:
        applied = migrate(conn)
        if settings.flows:  # deploying with the engines' config: their flows are known before they start
            store.flows_sync(conn, {name: orjson.dumps(recorded_policy(flow)).decode()
                                    for name, flow in settings.flows.items()})
    if applied:
        for migration in applied:
            print(f"applied {migration.version:04d}_{migration.name}")
    else:
        print("schema is up to date")
    if settings.flows:
        print(f"registered flows: {', '.join(sorted(settings.flows))}")
    return EXIT_OK


def _read_payload_lines(stream: Any) -> tuple[list[Any], list[str]]:
    payloads: list[Any] = []
    names: list[str] = []
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            payloads.append(loads_exact(line.rstrip(b"\r\n")))  # without it a cut-off line ends "on line 2"
        except orjson.JSONDecodeError as exc:
            raise ValidationError(f"line {number}, column {exc.colno}: invalid JSON: {exc.msg}") from None
        names.append(f"line {number}")
    return payloads, names


ENQUEUE_CHUNK = 10_000  # copies of --payload built and sent at a time: --count streams


def _payload_chunks(args: argparse.Namespace) -> Iterator[tuple[list[Any], list[str]]]:
    """(payloads, names) in chunks, validated before the database is touched where that is cheap."""
    if args.count < 1:
        raise ValidationError(f"--count {args.count} must be at least 1")
    if args.payload is not None:
        try:
            payload = loads_exact(args.payload)
        except orjson.JSONDecodeError as exc:
            at = f"column {exc.colno}" if exc.lineno == 1 else f"line {exc.lineno}, column {exc.colno}"
            raise ValidationError(f"--payload, {at}: invalid JSON: {exc.msg}") from None
        if args.dedupe_key is not None and args.count != 1:
            raise ValidationError("--dedupe-key applies to exactly one job")
        for start in range(0, args.count, ENQUEUE_CHUNK):
            size = min(ENQUEUE_CHUNK, args.count - start)
            yield [payload] * size, [f"--payload (copy {start + i + 1})" for i in range(size)]
        return
    if args.count != 1:
        raise ValidationError("--count goes with --payload")
    if sys.stdin.isatty():
        raise ValidationError("give --payload JSON, or JSON lines on stdin")
    # Bytes: invalid UTF-8 is then a JSON error naming the line, whatever the locale's stdin errors mode.
    payloads, names = _read_payload_lines(sys.stdin.buffer)
    if args.dedupe_key is not None and len(payloads) != 1:
        raise ValidationError("--dedupe-key applies to exactly one job")
    yield payloads, names


def cmd_enqueue(args: argparse.Namespace) -> int:
    from engine.queue import Queue
    _check_range("--max-attempts", args.max_attempts, 1, INT4_MAX)
    if args.no_seal and args.run is None:
        raise ValidationError("--no-seal applies to a run: give --run RUN too")
    chunks = _payload_chunks(args)
    first = next(chunks)  # bad input is reported before connecting
    settings = _settings(args)
    inserted = skipped = 0
    # One transaction for every chunk: a failure (or Ctrl-C) part way leaves nothing enqueued.
    with _queue(args) as queue, queue.connection() as conn, conn.transaction():
        into = Queue(conn=conn, check_schema=False)
        for payloads, names in itertools.chain([first], chunks):
            result = into.enqueue_many(
                args.flow, payloads, priority=args.priority, delay=args.delay, run_id=args.run,
                max_attempts=args.max_attempts, item_names=names,
                dedupe_keys=[args.dedupe_key] if args.dedupe_key is not None else None,
                seal=False if args.no_seal else None,
                keys=[args.key] * len(payloads) if args.key is not None else None,
                # A flow the config declares is the engines' own: known even before one has started.
                allow_unknown_flow=args.allow_unknown_flow or args.flow in settings.flows,
            )
            inserted, skipped = inserted + result.inserted, skipped + result.skipped
    message = f"enqueued {inserted} job(s) to {args.flow}"
    if skipped:
        message += f", skipped {skipped} duplicate(s)"
    print(message)
    return EXIT_OK


def _check_range(option: str, value: int | None, low: int, high: int) -> None:
    if value is not None and not low <= value <= high:
        raise ValidationError(f"{option} {value} must be an integer from {low} to {high}")


def cmd_status(args: argparse.Namespace) -> int:
    with _queue(args) as queue:
        print_status(queue, flow=args.flow, as_json=args.json)
    return EXIT_OK


# -- runs and pipelines (issue 15) ----------------------------------------------------------------


def cmd_runs_show(args: argparse.Namespace) -> int:
    with _queue(args) as queue:
        info, stages = queue.run(args.run)
    if args.json:
        print_json({"run": info.__dict__, "stages": [s.__dict__ for s in stages]})
        return EXIT_OK
    state = ("finished " + _age(info.finished_at)) if info.finished_at else ("open" if info.sealed else "open, not sealed")
    print(f"run {info.id}  flow {info.flow}  {state}"
          + (f"  reopened {info.reopened}x" if info.reopened else ""))
    print(f"jobs {info.total}: {info.completed} completed, {info.dead} dead, {info.cancelled} cancelled"
          + (f"; hook fired {_age(info.hook_fired_at)}" if info.hook_fired_at else ""))
    print_table(("stage", "pending", "running", "dead", "completed", "cancelled"),
                [(s.flow, s.pending, s.running, s.dead, s.completed, s.cancelled) for s in stages])
    return EXIT_OK


def cmd_runs_seal(args: argparse.Namespace) -> int:
    with _queue(args) as queue:
        sealed = queue.seal_run(args.run)
    if sealed.was_sealed:
        print(f"run {sealed.id} was already sealed")
    elif sealed.finished:
        print(f"sealed run {sealed.id}: all {sealed.total} job(s) had ended, so it finished now")
    else:
        print(f"sealed run {sealed.id}: it finishes after its last job "
              f"({sealed.completed + sealed.dead} of {sealed.total} ended)")
    return EXIT_OK


def _add_runs_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    runs = sub.add_parser("runs", help="runs: show one's progress per stage, seal one a producer grew in chunks")
    rsub = runs.add_subparsers(dest="runs_command", required=True, metavar="COMMAND")
    p = rsub.add_parser("show", parents=[common], help="a run's state and its jobs per stage (pipeline order)")
    p.add_argument("run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_runs_show)
    p = rsub.add_parser("seal", parents=[common],
                        help="the run's producer is done adding (after `enqueue --run R --no-seal`): it "
                             "finishes after its last job, or now if all have ended")
    p.add_argument("run")
    p.set_defaults(func=cmd_runs_seal)


def cmd_health(args: argparse.Namespace) -> int:
    from engine.health import Thresholds
    from engine.queue import Queue
    settings = _settings(args)
    with Queue(resolve_dsn(settings), application_name=f"{settings.application_name}-cli") as queue:
        report = queue.health_check(thresholds=Thresholds.from_engine(settings.engine))
    if args.json:
        print_json(report)
    else:
        database = report["databases"]["skiplock"]
        line = f"{report['status']}: database {'up' if database['connection'] else 'down'}"
        if database["response_time_ms"] is not None:
            line += f" ({database['response_time_ms']} ms)"
        if report["queue_status"]:
            qs = report["queue_status"]
            line += f", {qs['pending_records']} pending, {qs['processing_records']} claimed, {qs['failed_records']} dead"
        print(line)
        for reason in report["reasons"]:
            print(f"  - {reason}")
    return {"healthy": EXIT_OK, "degraded": EXIT_DEGRADED}.get(report["status"], EXIT_ERROR)


def cmd_pause(args: argparse.Namespace) -> int:
    with _queue(args) as queue:
        queue.pause(args.flow)
    print(f"paused {args.flow}")
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    with _queue(args) as queue:
        queue.resume(args.flow)
    print(f"resumed {args.flow}")
    return EXIT_OK


def cmd_dlq_list(args: argparse.Namespace) -> int:
    _check_range("--limit", args.limit, 0, INT4_MAX)
    with _queue(args) as queue:
        letters = queue.dead_letters(_filter(args), limit=args.limit)
    if args.json:
        print_json([letter.to_dict() for letter in letters])
        return EXIT_OK
    print_table(("id", "flow", "attempts", "error", "message", "died at"),
                 [(d.id, d.flow, f"{d.attempts}/{d.max_attempts}", d.error_type, clip(d.error_message, 60),
                   d.finished_at.strftime("%Y-%m-%d %H:%M:%S") if d.finished_at else "") for d in letters])
    return EXIT_OK


def cmd_dlq_show(args: argparse.Namespace) -> int:
    with _queue(args) as queue:
        job = queue.job(args.id)
    if job is None:
        raise CliError(f"job {args.id} not found")
    if args.json:
        print_json(job.to_dict())
        return EXIT_OK
    _print_job(job)
    return EXIT_OK


def _print_job(job: Job) -> None:
    print(f"job {job.id}  flow {job.flow}  status {job.status}  attempt {job.attempts} of {job.max_attempts}")
    if job.run_id:
        print(f"run {job.run_id}")
    print("payload:")
    print(orjson.dumps(job.payload, option=orjson.OPT_INDENT_2).decode())
    for entry in job.errors:
        print(f"attempt {entry.get('attempt')} at {entry.get('at')} on {entry.get('worker')}: "
              f"{entry.get('type')}: {entry.get('message')}")
        if entry.get("traceback"):
            print("    " + str(entry["traceback"]).rstrip().replace("\n", "\n    "))


def cmd_dlq_retry(args: argparse.Namespace) -> int:
    where = _filter(args)
    if where.is_empty() and not args.all:
        raise ValidationError("say which dead letters to retry: job ids, --flow, --error, --older-than, or --all")
    if args.all and not where.is_empty():
        raise ValidationError("--all retries every dead letter: give it alone, or job ids and filters without it")
    with _queue(args) as queue:
        ids = queue.retry_all_dead() if where.is_empty() else queue.retry_dead(where)
    print(f"retried {len(ids)} job(s)" + (": " + " ".join(map(str, ids[:20])) if ids else ""))
    return EXIT_OK


def cmd_dlq_purge(args: argparse.Namespace) -> int:
    where = _filter(args)
    if where.is_empty():
        raise ValidationError("say which dead letters to purge: job ids, --flow, --error or --older-than")
    with _queue(args) as queue:
        ids = queue.purge_dead(where)
    print(f"purged {len(ids)} job(s)")
    return EXIT_OK


def cmd_dlq_analyze(args: argparse.Namespace) -> int:
    with _queue(args) as queue:
        groups = queue.analyze_dead(args.flow)
    if args.json:
        print_json(groups)
        return EXIT_OK
    print_table(("flow", "error", "count", "last at", "sample"),
                 [(g["flow"], g["error_type"], g["count"], g["last_at"].strftime("%Y-%m-%d %H:%M:%S"),
                   clip(g["sample_message"], 60)) for g in groups])
    return EXIT_OK


# -- job control: cancel, wait, jobs ------------------------------------------------------------


def _statuses(values: list[str] | None, allowed: Sequence[str], option: str) -> list[str] | None:
    if not values:
        return None
    statuses = [s.strip() for value in values for s in value.split(",") if s.strip()]
    wrong = [s for s in statuses if s not in allowed]
    if wrong or not statuses:
        raise ValidationError(f"{option} {','.join(wrong) or '(empty)'} is invalid: use {', '.join(allowed)}")
    return statuses


def cmd_cancel(args: argparse.Namespace) -> int:
    from engine.queue import CANCEL_STATES
    if args.ids and (args.flow or args.run):
        raise ValidationError("cancel takes job ids, or --flow and/or --run, not both")
    if not args.ids and not (args.flow or args.run):
        raise ValidationError("say what to cancel: job ids, --flow FLOW or --run RUN")
    if args.ids and args.status:
        raise ValidationError("--status goes with --flow or --run; job ids are cancelled in any unfinished state")
    with _queue(args) as queue:
        report = queue.cancel(args.ids or None, flow=args.flow, run_id=args.run,
                              status=_statuses(args.status, CANCEL_STATES, "--status"))
    if args.json:
        print_json({"cancelled": report.cancelled, "requested": report.requested,
                    "unchanged": {str(k): v for k, v in report.unchanged.items()}})
    else:
        print(f"cancelled {len(report.cancelled)} job(s)"
              + (": " + " ".join(map(str, report.cancelled[:20])) if report.cancelled else "")
              + (" ..." if len(report.cancelled) > 20 else ""))
        if report.requested:
            print(f"cancel requested for {len(report.requested)} running job(s) (their workers stop them): "
                  + " ".join(map(str, report.requested[:20])) + (" ..." if len(report.requested) > 20 else ""))
        for job_id, why in report.unchanged.items():
            print(f"job {job_id}: {why}, nothing changed")
    return EXIT_OK if report.changed else EXIT_DEGRADED


def cmd_wait(args: argparse.Namespace) -> int:
    with _queue(args) as queue:
        try:
            result = queue.wait(args.id, timeout=args.timeout)
        except JobFailed as exc:  # the job's outcome, not an error of the command
            sys.stderr.write(f"engine: {exc}\n")
            return EXIT_DEGRADED
        except WaitTimeout as exc:
            sys.stderr.write(f"engine: {exc}\n")
            return EXIT_TIMEOUT
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        job_id = int(args.id)
    except ValueError:
        raise ValidationError(f"job id {args.id!r} must be an integer") from None
    with _queue(args) as queue:
        explanation = queue.explain(job_id, stale_after=settings.engine.stale_after)
    if args.json:
        sys.stdout.write(orjson.dumps(explanation.as_dict()).decode() + "\n")
    else:
        sys.stdout.write("\n".join(explanation.lines()) + "\n")
    return EXIT_OK


def _where(items: list[str] | None) -> dict[str, object] | None:
    if not items:
        return None
    found: dict[str, object] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValidationError(f"--where {item!r}: use KEY=VALUE, e.g. --where customer=42")
        try:
            found[key] = loads_exact(text)  # 42, true, "42", {"a": 1}
        except orjson.JSONDecodeError:
            found[key] = text  # a bare word is a string
    return found


CHILDREN_SHOWN = 100  # `jobs show`: the first children of a fan-out


def _age(moment: Any) -> str:
    if moment is None:
        return ""
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from engine.queue import LIST_STATUSES, JobFilter
    if not 1 <= args.limit <= 10_000:
        raise ValidationError(f"--limit {args.limit} must be from 1 to 10000")
    where = JobFilter(flow=args.flow, statuses=_statuses(args.status, LIST_STATUSES, "--status"),
                      run_id=args.run, older_than=args.older_than, payload=_where(args.where), since=args.since)
    with _queue(args) as queue:
        jobs = queue.list_jobs(where, limit=args.limit)
    if args.json:
        print_json([job.to_dict() for job in jobs])
        return EXIT_OK
    rows = []
    for job in jobs:
        when = {"pending": job.run_at, "scheduled": job.run_at, "running": job.claimed_at}.get(job.status,
                                                                                              job.finished_at)
        status = job.status + (" (cancel requested)" if job.cancel_requested_at else "")
        rows.append((job.id, job.flow, status, f"{job.attempts}/{job.max_attempts}", job.run_id or "",
                     _age(when), clip(job.error_message, 40), clip(orjson.dumps(job.payload).decode(), 40)))
    print_table(("id", "flow", "status", "attempts", "run", "since", "error", "payload"), rows)
    return EXIT_OK


def cmd_jobs_show(args: argparse.Namespace) -> int:
    with _queue(args) as queue:
        job = queue.job(args.id)
        children = queue.job_children(args.id, CHILDREN_SHOWN) if job is not None else []
    if job is None:
        raise CliError(f"job {args.id} not found")
    if args.json:
        print_json({**job.to_dict(), "children": [c.__dict__ for c in children]})
        return EXIT_OK
    _print_job(job)
    print(f"created {_age(job.created_at)}")
    if job.status == "pending" and job.run_at is not None:
        print(f"runs at {_age(job.run_at)}")
    if job.claimed_at is not None:
        print(f"last claimed {_age(job.claimed_at)} by {job.claimed_by}")
    if job.progress is not None:
        print(f"progress {job.progress:.0%}" + (f" {job.progress_message}" if job.progress_message else "")
              + f" (reported {_age(job.progress_at)})")
    if job.cancel_requested_at is not None:
        print(f"cancel requested {_age(job.cancel_requested_at)}")
    if job.finished_at is not None and job.status in ("completed", "dead", "cancelled"):
        print(f"{job.status} {_age(job.finished_at)}")
    if job.status == "completed":
        print("result:")
        print(orjson.dumps(job.result, option=orjson.OPT_INDENT_2).decode())
    if job.parent_id is not None:
        print(f"parent: job {job.parent_id}")
    if children:
        print(f"children ({len(children)}{'+' if len(children) >= CHILDREN_SHOWN else ''}):")
        for child in children:
            print(f"  job {child.id}  {child.flow}  {child.status}")
    return EXIT_OK


# -- schedules (engine/schedules.py) --------------------------------------------------------------


def _stamp(value: Any) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if value is not None else ""


def cmd_schedule_list(args: argparse.Namespace) -> int:
    with _queue(args) as queue:
        found = queue.schedules()
    if args.json:
        print_json([s.to_dict() | {"when": describe_schedule(s.cron, s.every_ms)} for s in found])
        return EXIT_OK
    print_table(("name", "flow", "when", "timezone", "state", "next (UTC)", "last fired (UTC)", "last job", "outcome",
                 "source"),
                [(s.name, s.flow, describe_schedule(s.cron, s.every_ms), s.timezone, s.state,
                  _stamp(s.next_at) if s.state == "active" else "", _stamp(s.last_fired_at),
                  s.last_job_id or "", s.last_outcome or "", s.source) for s in found])
    return EXIT_OK


def cmd_schedule_add(args: argparse.Namespace) -> int:
    from engine.queue import Queue
    if (args.cron is None) == (args.every is None):
        raise ValidationError("give --cron EXPR or --every DURATION, exactly one")
    payload: Any = {}
    if args.payload is not None:
        try:
            payload = loads_exact(args.payload)
        except orjson.JSONDecodeError as exc:
            raise ValidationError(f"--payload: invalid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise ValidationError(f"--payload must be a JSON object, got {type(payload).__name__}")
    settings = _settings(args)
    with Queue(resolve_dsn(settings), application_name=f"{settings.application_name}-cli") as queue:
        added = queue.add_schedule(args.name, args.flow, cron=args.cron, every=args.every, payload=payload,
                                   timezone=args.timezone, catch_up=args.catch_up, known_flows=settings.flows)
    print(f"added schedule {added.name}: {describe_schedule(added.cron, added.every_ms)} -> {added.flow}")
    return EXIT_OK


def cmd_schedule_remove(args: argparse.Namespace) -> int:
    with _queue(args) as queue:
        queue.remove_schedule(args.name)
    print(f"removed schedule {args.name}")
    return EXIT_OK


def cmd_schedule_pause(args: argparse.Namespace) -> int:
    with _queue(args) as queue:
        queue.pause_schedule(args.name)
    print(f"paused schedule {args.name}")
    return EXIT_OK


def cmd_schedule_resume(args: argparse.Namespace) -> int:
    with _queue(args) as queue:
        queue.resume_schedule(args.name)
    print(f"resumed schedule {args.name}")
    return EXIT_OK


def cmd_schedule_trigger(args: argparse.Namespace) -> int:
    with _queue(args) as queue:
        job_id = queue.trigger_schedule(args.name)
    print(f"triggered schedule {args.name}: job {job_id}")
    return EXIT_OK


def _add_schedule_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    schedule = sub.add_parser("schedule", help="schedules: list, add, remove, pause, resume, trigger")
    ssub = schedule.add_subparsers(dest="schedule_command", required=True, metavar="ACTION")
    p = ssub.add_parser("list", parents=[common], help="every schedule: next tick, last fire, last job's outcome")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_schedule_list)
    p = ssub.add_parser("add", parents=[common], help="add a schedule at run time (--cron or --every)")
    p.add_argument("name")
    p.add_argument("--flow", required=True, help="the flow each tick enqueues a job of")
    p.add_argument("--cron", help='five fields ("*/5 * * * *") or an alias (@hourly, @daily, ...)')
    p.add_argument("--every", type=_duration("--every"), help="a period, e.g. 10s, 5m (at least 1s)")
    p.add_argument("--payload", help="the jobs' payload, a JSON object (each job also gets scheduled_at)")
    p.add_argument("--timezone", default="UTC", help="IANA time zone the cron is read in (default UTC)")
    p.add_argument("--catch-up", choices=["last", "none"], default="last",
                   help="after downtime: enqueue the latest missed tick once (last, default) or none")
    p.set_defaults(func=cmd_schedule_add)
    for name, func, text in (("remove", cmd_schedule_remove, "delete a schedule (a config one returns at the "
                                                               "next engine start)"),
                             ("pause", cmd_schedule_pause, "stop firing (kept across engine restarts)"),
                             ("resume", cmd_schedule_resume, "fire again; missed ticks follow catch_up"),
                             ("trigger", cmd_schedule_trigger, "enqueue one job now (ticks unchanged)")):
        p = ssub.add_parser(name, parents=[common], help=text)
        p.add_argument("name")
        p.set_defaults(func=func)


# -- the control plane: engines, scale, drain, stop (engine/control.py) --------------------------------

EXIT_REFUSED = 1  # the engine read the command and said no
EXIT_GONE = 4  # the engine is gone, stopped, or already leaving: nothing was sent
CONTROL_EPILOG = ("exit codes: 0 the engine acknowledged and did it; 1 the engine refused it (the line says "
                  "why); 2 bad input (unknown or ambiguous ENGINE, --workers out of range) or database "
                  "unreachable; 3 no acknowledgement within --timeout (the command is withdrawn); 4 the "
                  "engine is gone (no heartbeat within its stale_after), stopped or already draining: "
                  "nothing was sent")


def cmd_engines(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with db.connect(resolve_dsn(settings), application_name=f"{settings.application_name}-cli") as conn:
        engines = store.engines_list(conn)
    if args.json:
        print_json([e.to_dict() for e in engines])
        return EXIT_OK
    rows = [(e.id[:control.SHORT_ID], e.host, e.pid, e.version, e.workers, clip(",".join(e.flows), 40),
             e.started_at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"), e.state,
             f"{e.heartbeat_age:.0f}s ago") for e in engines]
    print_table(("engine", "host", "pid", "version", "workers", "flows", "started (UTC)", "state", "heartbeat"),
                rows)
    return EXIT_OK


def _control(args: argparse.Namespace, command: str, workers: int | None = None) -> int:
    if command == "scale":
        control.check_workers(workers)
    settings = _settings(args)
    with db.connect(resolve_dsn(settings), application_name=f"{settings.application_name}-cli") as conn:
        try:
            result = control.send_command(conn, args.engine, command, workers, timeout=args.timeout)
        except control.EngineGone as exc:
            sys.stderr.write(f"engine: error: {exc}\n")
            return EXIT_GONE
        except control.CommandRefused as exc:
            sys.stderr.write(f"engine: error: {exc}\n")
            return EXIT_REFUSED
        except control.CommandTimeout as exc:
            sys.stderr.write(f"engine: error: {exc}\n")
            return EXIT_TIMEOUT
    print(f"engine {result.engine[:control.SHORT_ID]}: {result.outcome}")
    return EXIT_OK


def cmd_scale(args: argparse.Namespace) -> int:
    return _control(args, "scale", args.workers)


def cmd_drain(args: argparse.Namespace) -> int:
    return _control(args, "drain")


def cmd_stop(args: argparse.Namespace) -> int:
    return _control(args, "stop")


def _add_control_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("engines", parents=[common], help="engines of the fleet: host, pid, version, workers, "
                                                         "flows, state (gone: no heartbeat)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_engines)
    for name, func, text in (
            ("scale", cmd_scale, "change a running engine's worker count (forks or stops workers)"),
            ("drain", cmd_drain, "a running engine stops claiming, finishes the jobs it holds, exits 0"),
            ("stop", cmd_stop, "a running engine kills its workers now (their jobs go back to pending), exits 0")):
        p = sub.add_parser(name, parents=[common], help=text, description=text, epilog=CONTROL_EPILOG)
        p.add_argument("engine", help="engine id, or a unique prefix of it (`engine engines` shows 12 characters)")
        if name == "scale":
            p.add_argument("--workers", type=int, required=True, help=f"worker processes, 1 to {MAX_WORKERS}")
        p.add_argument("--timeout", type=_duration("--timeout"), default=control.DEFAULT_TIMEOUT,
                       help=f"seconds to wait for the engine's acknowledgement (default {control.DEFAULT_TIMEOUT:g})")
        p.set_defaults(func=func)


# This module is the composition point: the only one under engine/ that may import the console,
# and only inside functions, so a headless container never loads the TUI.


def cmd_dev(args: argparse.Namespace) -> int:
    from engine.dev import DevOptions, run_dev

    options = DevOptions(config=args.config, env=args.env, dsn=args.dsn, data_dir=args.data_dir, jobs=args.jobs,
                         no_engine=args.no_engine, workers=args.workers, seconds=args.seconds,
                         no_console=args.no_console, example=args.example)
    return run_dev(options, open_console=_open_dev_console)


def _open_dev_console(dsn: str, settings: Settings, quit_after: float | None) -> None:
    from console.cli import open_console

    open_console(dsn, settings, environment=settings.env, quit_after=quit_after,
                 exit_on_sigterm=True)


def _add_app_dir(app_dir: Path | None) -> None:
    """--app-dir: where the flows' handler modules are imported from (forked workers inherit it)."""
    if app_dir is None:
        return
    if not app_dir.is_dir():
        raise ValidationError(f"--app-dir {app_dir}: not a directory")
    sys.path.insert(0, str(app_dir.resolve()))


def cmd_run(args: argparse.Namespace) -> int:
    from engine.supervisor import EngineOptions, run_engine

    _add_app_dir(args.app_dir)
    return run_engine(_settings(args), EngineOptions(workers=args.workers, flows=args.flows, drain=args.drain,
                                                     wait_scheduled=args.wait_scheduled,
                                                     metrics_port=args.metrics_port))


def cmd_console(args: argparse.Namespace) -> int:
    from console.cli import ConsoleOptions, run_console

    return run_console(ConsoleOptions.from_args(args), config=args.config, env=args.env, dsn=args.dsn)


# ---------------------------------------------------------------------------------------------
# Parser


class _Unbuilt:
    """A command other than the one typed: every call building its arguments does nothing."""

    def __getattr__(self, name: str) -> Callable[..., _Unbuilt]:
        return self._ignore

    def _ignore(self, *args: Any, **kwargs: Any) -> _Unbuilt:
        return self


_UNBUILT: Any = _Unbuilt()


class _ChosenOnly:
    """Subcommands: every name is registered (for `engine --help` and "invalid choice"), but only the
    chosen command's arguments are built; the others' cost a start-up milliseconds for nothing."""

    def __init__(self, sub: Any, chosen: str | None) -> None:
        self.sub = sub
        self.chosen = chosen

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        if self.chosen is None or name == self.chosen:
            return self.sub.add_parser(name, **kwargs)
        self.sub.add_parser(name, **{key: kwargs[key] for key in ("help", "aliases") if key in kwargs})
        return _UNBUILT


def _typed_command(argv: Sequence[str]) -> str | None:
    """The command name in argv: before it only -h and --version are accepted, which exit anyway."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given argv, only its command's arguments are built (the others are listed)."""
    common = argparse.ArgumentParser(add_help=False)
    add_settings_arguments(common)

    parser = argparse.ArgumentParser(prog="engine", description="skiplock: PostgreSQL work queue engine")
    parser.add_argument("--version", action="version", version=f"skiplock {__version__}")
    sub = _ChosenOnly(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"),
                      None if argv is None else _typed_command(argv))

    p = sub.add_parser("migrate", parents=[common], help="apply missing schema migrations")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("enqueue", parents=[common], help="enqueue jobs (JSON lines on stdin, or --payload)")
    p.add_argument("flow")
    p.add_argument("--payload", help="one JSON object, enqueued --count times")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--run", help="run id: groups jobs, tracks progress, fires the run's hook once")
    p.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    p.add_argument("--delay", type=_duration("--delay"), default=0.0, help="e.g. 30s, 5m")
    p.add_argument("--dedupe-key", help="skip if an unfinished job of the flow has this key")
    p.add_argument("--key", help="concurrency key of every job enqueued (flows with concurrency_per_key); "
                                 "default: the payload field the flow's concurrency_key names")
    p.add_argument("--max-attempts", type=int, default=None, help="default: the flow's policy")
    p.add_argument("--allow-unknown-flow", action="store_true",
                   help="enqueue even though no engine has registered the flow yet (else refused)")
    p.add_argument("--no-seal", action="store_true",
                   help="with --run: more chunks follow, so the run may not finish yet; seal it with "
                        "`engine runs seal RUN` after the last one")
    p.set_defaults(func=cmd_enqueue)

    p = sub.add_parser("status", parents=[common], help="queue counts by flow, and each pipeline's stages")
    p.add_argument("--flow")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("health", parents=[common], help="exit 0 healthy, 1 degraded, 2 unhealthy")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_health)

    for name, func, text in (("pause", cmd_pause, "stop claiming jobs of a flow"),
                             ("resume", cmd_resume, "claim jobs of a paused flow again")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("flow")
        p.set_defaults(func=func)

    dlq = sub.add_parser("dlq", help="dead letters: list, show, retry, purge, analyze")
    dsub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    selectors = argparse.ArgumentParser(add_help=False)
    selectors.add_argument("--flow")
    selectors.add_argument("--error", help="error type, e.g. ValueError")
    selectors.add_argument("--older-than", type=_duration("--older-than"), help="died longer ago than, e.g. 7d")

    p = dsub.add_parser("list", parents=[common, selectors])
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_dlq_list)
    p = dsub.add_parser("show", parents=[common], help="payload and every attempt's error")
    p.add_argument("id", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_dlq_show)
    p = dsub.add_parser("retry", parents=[common, selectors], help="dead -> pending (only jobs still dead)")
    p.add_argument("ids", nargs="*", type=int)
    p.add_argument("--all", action="store_true", help="every dead letter")
    p.set_defaults(func=cmd_dlq_retry)
    p = dsub.add_parser("purge", parents=[common, selectors], help="delete dead letters")
    p.add_argument("ids", nargs="*", type=int)
    p.set_defaults(func=cmd_dlq_purge)
    p = dsub.add_parser("analyze", parents=[common], help="dead letters grouped by flow and error type")
    p.add_argument("--flow")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_dlq_analyze)

    p = sub.add_parser("cancel", parents=[common], help="cancel jobs: pending/scheduled now, running on request",
                       description="Pending and scheduled jobs end `cancelled` at once and never run; a running "
                                   "job's cancel is requested (reported as requested): its worker stops it and it ends "
                                   "`cancelled` within the flow's cancel_grace. Jobs that already ended are left "
                                   "alone and reported.",
                       epilog="exit codes: 0 at least one job cancelled or its cancel requested; 1 nothing "
                              "changed (every job had already ended, was not found, or nothing matched); "
                              "2 bad input")
    p.add_argument("ids", nargs="*", type=int, help="job ids (any unfinished state)")
    p.add_argument("--flow", help="every unfinished job of this flow")
    p.add_argument("--run", help="every unfinished job of this run")
    p.add_argument("--status", action="append",
                   help="with --flow/--run: pending, scheduled, running (comma-separated or repeated; default all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("wait", parents=[common], help="wait for a job to end; print its result as JSON",
                       epilog="exit codes: 0 completed (the result is printed as JSON); 1 the job died or was "
                              "cancelled; 2 bad input or no such job; 3 the timeout passed first")
    p.add_argument("id", type=int)
    p.add_argument("--timeout", type=_duration("--timeout"), default=30.0, help="e.g. 30s, 5m (default 30s)")
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser("explain", parents=[common], help="why a job is not running now (or what runs it)",
                       description="For a pending or scheduled job, every reason it is not running now: flow "
                                   "paused, circuit open, run_at in the future (backoff or delay), fleet "
                                   "concurrency limit, rate limit, its concurrency key at its limit, no live "
                                   "worker for its flow, jobs ahead of it. For a running job: its worker, how "
                                   "long, heartbeat age. For an ended job: how it ended.",
                       epilog="exit codes: 0 explained; 2 bad input or no such job")
    p.add_argument("id", help="job id")  # parsed by cmd_explain: bad input is one line, not argparse's usage
    p.add_argument("--json", action="store_true", help="one JSON object: status, reasons (kind, message, ...)")
    p.set_defaults(func=cmd_explain)

    jobs = sub.add_parser("jobs", help="the job browser: list, show (any state)")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    p = jsub.add_parser("list", parents=[common], help="jobs in any state, filtered",
                        epilog="Each status is listed in its own order: pending and scheduled next to run "
                               "first, running longest first, dead, completed and cancelled most recent first. "
                               "Completed and cancelled jobs are searched only --since back (default 24h).")
    p.add_argument("--flow")
    p.add_argument("--status", action="append",
                   help=f"{', '.join(store.LIST_STATUSES)} (comma-separated or repeated; default all)")
    p.add_argument("--run", help="jobs of this run")
    p.add_argument("--older-than", type=_duration("--older-than"),
                   help="e.g. 1h: pending/scheduled enqueued, running claimed, others ended longer ago")
    p.add_argument("--where", action="append", metavar="KEY=VALUE",
                   help="payload key equals value (JSON, else a string): --where customer=42 --where tier=gold")
    p.add_argument("--since", type=_duration("--since"), default=24 * 3600.0,
                   help="how far back completed and cancelled jobs are searched (default 24h)")
    p.add_argument("--limit", type=int, default=50, help="at most this many jobs (default 50)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs_list)
    p = jsub.add_parser("show", parents=[common], help="one job in any state: payload, attempts, result")
    p.add_argument("id", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs_show)
    _add_schedule_parser(sub, common)
    _add_runs_parser(sub, common)

    p = sub.add_parser("dev", parents=[common], help="embedded PostgreSQL, migrate, demo load: a first try")
    if p is not _UNBUILT:
        from engine.embedded import default_data_dir  # only for this help text: other commands skip the module

        p.add_argument("--data-dir", type=Path, help=f"cluster directory (default {default_data_dir()})")
    p.add_argument("--jobs", type=int, default=2000, help="demo jobs to enqueue")
    p.add_argument("--no-engine", action="store_true", help="only start the database, migrate and enqueue")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=_duration("--seconds"), default=None,
                   help="stop after this long, e.g. 30 or 2m (default: until Ctrl-C)")
    p.add_argument("--no-console", action="store_true",
                   help="print the status every 5 s instead of opening the console (also when stdout is not a terminal)")
    p.add_argument("--example", choices=["survey", "pipeline"],
                   help="run an example flow end to end instead of the demo load (survey: a SQLite "
                        "source read over ODBC, scores written to Postgres; see engine/examples/survey; "
                        "pipeline: seed 004's documents as stages parse -> chunk -> embed, see "
                        "engine/examples/pipeline)")
    p.set_defaults(func=cmd_dev)

    p = sub.add_parser("run", parents=[common], help="run the worker pool (see exit codes below)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="exit codes: 0 stopped cleanly (or --drain finished); 2 bad configuration or "
                              "database unreachable at start; 3 stopped by a second signal (forced); "
                              "4 workers kept crashing")
    p.add_argument("--workers", type=int, help="worker processes (default: config `workers`)")
    p.add_argument("--flows", help="comma-separated flows to serve (default: all configured)")
    p.add_argument("--drain", action="store_true",
                   help="exit 0 once the flows have nothing due and nothing running; says what is scheduled for later")
    p.add_argument("--wait-scheduled", action="store_true",
                   help="with --drain: also wait for jobs scheduled for later (--delay, retry backoff)")
    p.add_argument("--app-dir", type=Path, help="directory to import handler modules from (put first on the "
                                                "Python path); else install the app or set PYTHONPATH")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus /metrics, /healthz and /readyz on this port (config `metrics_port`; "
                        "address: `metrics_host`, default 127.0.0.1; 0: any free port, logged)")
    p.set_defaults(func=cmd_run)

    _add_control_parsers(sub, common)

    p = sub.add_parser("console", parents=[common], help="the ops console: a terminal UI on the queue (same as `console`)")
    if p is not _UNBUILT:
        from console.cli import add_console_arguments  # argparse only: loads no TUI

        add_console_arguments(p)
        p.set_defaults(func=cmd_console)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    hide_secrets_in_process_title()  # before any worker is forked: they inherit the hidden copy
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        _check_text(args)
        return int(args.func(args))
    except SkiplockError as exc:
        return _fail(str(exc), getattr(args, "dsn", None))
    except psycopg.errors.InsufficientPrivilege as exc:
        return _fail(_denied(args, exc), getattr(args, "dsn", None))
    except psycopg.Error as exc:
        return _fail(f"database: {describe_error(exc)}", getattr(args, "dsn", None))
    except KeyboardInterrupt:
        return 130


def _command_name(args: argparse.Namespace) -> str:
    """The subcommand as typed ("dlq retry"), from its handler's name (cmd_dlq_retry)."""
    return args.func.__name__.removeprefix("cmd_").replace("_", " ")


def _denied(args: argparse.Namespace, exc: psycopg.Error) -> str:
    """A permission error names the command, what the login role lacks and the role to grant."""
    try:
        dsn: str | None = resolve_dsn(_settings(args))
    except SkiplockError:
        dsn = None
    return roles.explain(exc, _command_name(args), dsn)


_POSITIONALS = frozenset({"flow", "id", "ids", "engine"})


def _check_text(args: argparse.Namespace) -> None:
    """Non-UTF-8 bytes in argv arrive as lone surrogates: refuse them here, naming the option, before
    any of them reaches an encoder (psycopg, orjson) that would raise far from the cause."""
    for dest, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            problem = utf8_problem(item) if isinstance(item, str) else None
            if problem is not None:
                name = dest if dest in _POSITIONALS else "--" + dest.replace("_", "-")
                raise ValidationError(f"{name}: not valid UTF-8 ({problem})")


def _fail(message: str, dsn_arg: str | None = None) -> int:
    # libpq quotes a malformed URI whole in its error ("... in URI: \"postgresql://u:pw@[::1/x\""),
    # so redact URLs anywhere in the text, and every DSN we were given (--dsn or SKIPLOCK_DSN).
    text = redact_text(message)
    for dsn in (os.environ.get("SKIPLOCK_DSN"), dsn_arg):
        if dsn:
            text = text.replace(dsn, redact_dsn(dsn))
    sys.stderr.write(f"engine: error: {text}\n")
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
