"""The `engine` command. Contract: README.md, "The `engine` command"; every subcommand has --help.

Exit codes: 0 ok; 1 `health` degraded (or an operation that found nothing to do where noted);
2 bad input, unreachable database or `health` unhealthy; see `engine run --help` for the engine's own.
Errors are one line on stderr with DSN passwords redacted, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import psycopg

from engine import db
from engine.config import Settings, load_settings, parse_duration, redact_dsn, redact_text
from engine.embedded import DEFAULT_DATABASE, SOCKET_PORT, SUPERUSER, default_data_dir
from engine.errors import SkiplockError, ValidationError
from engine.migrate import migrate
from engine.queue import DeadLetterFilter, Queue

EXIT_OK = 0
EXIT_DEGRADED = 1
EXIT_ERROR = 2


class CliError(SkiplockError):
    pass


# ---------------------------------------------------------------------------------------------
# Shared plumbing


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, env=args.env, dsn=args.dsn)


def resolve_dsn(settings: Settings) -> str:
    """--dsn, SKIPLOCK_DSN, the config file; else the `engine dev` cluster when it is running."""
    if settings.dsn:
        return settings.dsn
    socket_dir = default_data_dir()
    if (socket_dir / f".s.PGSQL.{SOCKET_PORT}").exists():
        return f"host={socket_dir} port={SOCKET_PORT} user={SUPERUSER} dbname={DEFAULT_DATABASE}"
    raise CliError("no database configured: pass --dsn, set SKIPLOCK_DSN or `dsn` in the config, or start `engine dev`")


def _queue(args: argparse.Namespace) -> Queue:
    settings = _settings(args)
    return Queue(resolve_dsn(settings), application_name=f"{settings.application_name}-cli")


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        sys.stdout.write("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip() + "\n")


def _duration(where: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            return parse_duration(text, where)
        except SkiplockError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _filter(args: argparse.Namespace) -> DeadLetterFilter:
    ids = list(args.ids) if getattr(args, "ids", None) else None
    return DeadLetterFilter(ids=ids, flow=args.flow, error_type=args.error, older_than=args.older_than)


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with db.connect(resolve_dsn(settings), application_name=f"{settings.application_name}-migrate") as conn:
        applied = migrate(conn)
    if applied:
        for migration in applied:
            print(f"applied {migration.version:04d}_{migration.name}")
    else:
        print("schema is up to date")
    return EXIT_OK


def _read_payload_lines(stream: Any) -> tuple[list[Any], list[str]]:
    payloads: list[Any] = []
    names: list[str] = []
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            payloads.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            raise ValidationError(f"line {number}: invalid JSON: {exc}") from None
        names.append(f"line {number}")
    return payloads, names


def cmd_enqueue(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise ValidationError(f"--count {args.count} must be at least 1")
    if args.payload is not None:
        try:
            payload = orjson.loads(args.payload)
        except orjson.JSONDecodeError as exc:
            raise ValidationError(f"--payload: invalid JSON: {exc}") from None
        payloads, names = [payload] * args.count, [f"--payload (copy {i + 1})" for i in range(args.count)]
    else:
        if args.count != 1:
            raise ValidationError("--count goes with --payload")
        if sys.stdin.isatty():
            raise ValidationError("give --payload JSON, or JSON lines on stdin")
        # Bytes: invalid UTF-8 is then a JSON error naming the line, whatever the locale's stdin errors mode.
        payloads, names = _read_payload_lines(sys.stdin.buffer)
    if args.dedupe_key is not None and len(payloads) != 1:
        raise ValidationError("--dedupe-key applies to exactly one job")
    with _queue(args) as queue:
        result = queue.enqueue_many(
            args.flow, payloads, priority=args.priority, delay=args.delay, run_id=args.run,
            max_attempts=args.max_attempts, item_names=names,
            dedupe_keys=[args.dedupe_key] if args.dedupe_key is not None else None,
        )
    message = f"enqueued {result.inserted} job(s) to {args.flow}"
    if result.skipped:
        message += f", skipped {result.skipped} duplicate(s)"
    print(message)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    with _queue(args) as queue:
        status = queue.get_queue_status(args.flow)
    if args.json:
        _print_json(status)
        return EXIT_OK
    rows = [(flow, c["pending"] - c["scheduled"], c["scheduled"], c["processing"], c["completed"], c["failed"],
             "yes" if c["paused"] else "")
            for flow, c in status["by_flow"].items()]
    rows.append(("TOTAL", status["pending_records"] - status["scheduled_records"], status["scheduled_records"],
                 status["processing_records"], status["completed_records"], status["failed_records"], ""))
    _print_table(("flow", "pending", "scheduled", "running", "completed", "dead", "paused"), rows)
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with Queue(resolve_dsn(settings), application_name=f"{settings.application_name}-cli") as queue:
        report = queue.health_check(stale_after=settings.engine.stale_after)
    if args.json:
        _print_json(report)
    else:
        database = report["databases"]["skiplock"]
        line = f"{report['status']}: database {'up' if database['connection'] else 'down'}"
        if database["response_time_ms"] is not None:
            line += f" ({database['response_time_ms']} ms)"
        if report["queue_status"]:
            qs = report["queue_status"]
            line += f", {qs['pending_records']} pending, {qs['processing_records']} running, {qs['failed_records']} dead"
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
    with _queue(args) as queue:
        letters = queue.dead_letters(_filter(args), limit=args.limit)
    if args.json:
        _print_json([letter.to_dict() for letter in letters])
        return EXIT_OK
    _print_table(("id", "flow", "attempts", "error", "message", "died at"),
                 [(d.id, d.flow, f"{d.attempts}/{d.max_attempts}", d.error_type, _clip(d.error_message, 60),
                   d.finished_at.strftime("%Y-%m-%d %H:%M:%S") if d.finished_at else "") for d in letters])
    return EXIT_OK


def cmd_dlq_show(args: argparse.Namespace) -> int:
    with _queue(args) as queue:
        job = queue.job(args.id)
    if job is None:
        raise CliError(f"job {args.id} not found")
    if args.json:
        _print_json(job.to_dict())
        return EXIT_OK
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
    return EXIT_OK


def cmd_dlq_retry(args: argparse.Namespace) -> int:
    where = _filter(args)
    if where.is_empty() and not args.all:
        raise ValidationError("say which dead letters to retry: job ids, --flow, --error, --older-than, or --all")
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
        _print_json(groups)
        return EXIT_OK
    _print_table(("flow", "error", "count", "last at", "sample"),
                 [(g["flow"], g["error_type"], g["count"], g["last_at"].strftime("%Y-%m-%d %H:%M:%S"),
                   _clip(g["sample_message"], 60)) for g in groups])
    return EXIT_OK


def cmd_dev(args: argparse.Namespace) -> int:
    from engine.dev import run_dev

    return run_dev(args)


def cmd_run(args: argparse.Namespace) -> int:
    from engine.supervisor import run_engine

    return run_engine(args)


def cmd_console(args: argparse.Namespace) -> int:
    from console.app import run_console  # lazily: a headless container never loads the TUI

    return run_console(args)


def _clip(text: str | None, width: int) -> str:
    if not text:
        return ""
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


# ---------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dsn", help="PostgreSQL connection string (default: SKIPLOCK_DSN, then the config)")
    common.add_argument("--config", type=Path, help="config file (default: SKIPLOCK_CONFIG)")
    common.add_argument("--env", help="environment in the config file (default: SKIPLOCK_ENV)")

    parser = argparse.ArgumentParser(prog="engine", description="skiplock: PostgreSQL work queue engine")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    p.add_argument("--max-attempts", type=int, default=None, help="default: the flow's policy")
    p.set_defaults(func=cmd_enqueue)

    p = sub.add_parser("status", parents=[common], help="queue counts by flow")
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

    p = sub.add_parser("dev", parents=[common], help="embedded PostgreSQL, migrate, demo load: a first try")
    p.add_argument("--data-dir", type=Path, help=f"cluster directory (default {default_data_dir()})")
    p.add_argument("--jobs", type=int, default=2000, help="demo jobs to enqueue")
    p.add_argument("--no-engine", action="store_true", help="only start the database, migrate and enqueue")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=None, help="stop after this long (default: until Ctrl-C)")
    p.add_argument("--no-console", action="store_true",
                   help="print the status every 5 s instead of opening the console (also when stdout is not a terminal)")
    p.add_argument("--example", choices=["survey"],
                   help="run an example flow end to end instead of the demo load (survey: a SQLite "
                        "source read over ODBC, scores written to Postgres; see engine/examples/survey)")
    p.set_defaults(func=cmd_dev)

    p = sub.add_parser("run", parents=[common], help="run the worker pool (see exit codes below)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="exit codes: 0 stopped cleanly (or --drain finished); 2 bad configuration or "
                              "database unreachable at start; 3 stopped by a second signal (forced); "
                              "4 workers kept crashing")
    p.add_argument("--workers", type=int, help="worker processes (default: config `workers`)")
    p.add_argument("--flows", help="comma-separated flows to serve (default: all configured)")
    p.add_argument("--drain", action="store_true", help="exit 0 once the flows have nothing pending or running")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("console", parents=[common], help="the ops console: a terminal UI on the queue (same as `console`)")
    p.add_argument("--read-only", action="store_true", help="offer no action that writes (also [console] read_only)")
    p.add_argument("--refresh", type=float, help="seconds between snapshots (default: [console] refresh_interval)")
    p.add_argument("--keymap", type=Path, help="TOML file with a [keymap] table: binding id = \"keys\"")
    p.add_argument("--list-bindings", action="store_true", help="print every binding id and its keys, and exit")
    p.set_defaults(func=cmd_console)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SkiplockError as exc:
        return _fail(str(exc), getattr(args, "dsn", None))
    except psycopg.Error as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return _fail(f"database: {text}", getattr(args, "dsn", None))
    except KeyboardInterrupt:
        return 130


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
