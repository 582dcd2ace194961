"""The `console` command, and the options it shares with `engine console` (declared once, here).

Only argparse and engine.config at module level: `engine` builds its parser with
`add_console_arguments` without loading the TUI, which `open_console` imports when it runs.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.config import Settings, add_settings_arguments, load_settings, parse_duration, resolve_dsn
from engine.errors import SkiplockError
from engine.health import Thresholds
from engine.redact import hide_secrets_in_process_title, redact_text


@dataclass(frozen=True)
class ConsoleOptions:
    read_only: bool = False
    refresh: float | None = None  # seconds; None: [console] refresh_interval
    keymap: Path | None = None
    list_bindings: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ConsoleOptions:
        return cls(read_only=args.read_only, refresh=args.refresh, keymap=args.keymap, list_bindings=args.list_bindings)


def _refresh(text: str) -> float:
    try:
        seconds = parse_duration(text, "--refresh")
    except SkiplockError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"--refresh must be greater than 0, got {text!r}")
    return seconds


def add_console_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--read-only", action="store_true", help="offer no action that writes (also [console] read_only)")
    parser.add_argument("--refresh", type=_refresh, help="seconds between snapshots (default: [console] refresh_interval)")
    parser.add_argument("--keymap", type=Path, help="TOML file with a [keymap] table: binding id = \"keys\"")
    parser.add_argument("--list-bindings", action="store_true", help="print every binding id and its keys, and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="console", description="skiplock ops console (a terminal UI)")
    add_settings_arguments(parser)
    add_console_arguments(parser)
    return parser


def run_console(options: ConsoleOptions, *, config: Path | None = None, env: str | None = None,
                dsn: str | None = None, quit_after: float | None = None) -> int:
    """`console` and `engine console`: exit 0, or 2 with one line on bad input."""
    from console.app import all_bindings, load_keymap

    if options.list_bindings:
        for binding_id, keys, description in all_bindings():
            print(f"{binding_id:<32} {keys:<14} {description}")
        return 0
    try:
        settings = load_settings(config, env=env, dsn=dsn)
        resolved = resolve_dsn(settings)
        keymap = load_keymap(options.keymap)
    except SkiplockError as exc:
        sys.stderr.write(f"console: error: {redact_text(str(exc))}\n")
        return 2
    open_console(resolved, settings, read_only=options.read_only, refresh=options.refresh, keymap=keymap,
                 environment=settings.env, quit_after=quit_after)
    return 0


def open_console(dsn: str, settings: Settings, *, read_only: bool = False, refresh: float | None = None,
                 keymap: dict[str, str] | None = None, environment: str | None = None,
                 quit_after: float | None = None, exit_on_sigterm: bool = False) -> None:
    """Runs the app on the terminal until it quits (or SIGTERM, with `exit_on_sigterm`)."""
    from console.app import ConsoleApp

    app = ConsoleApp(dsn, read_only=bool(read_only or settings.console.read_only),
                     refresh_interval=refresh if refresh else settings.console.refresh_interval,
                     environment=environment, stale_after=settings.engine.stale_after,
                     thresholds=Thresholds.from_engine(settings.engine), keymap=keymap,
                     quit_after=quit_after, listen_dsn=settings.listen_dsn)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: app.exit()) if exit_on_sigterm else None
    try:
        app.run()
    finally:
        if exit_on_sigterm:
            signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    hide_secrets_in_process_title()
    args = build_parser().parse_args(argv)
    return run_console(ConsoleOptions.from_args(args), config=args.config, env=args.env, dsn=args.dsn)


if __name__ == "__main__":
    sys.exit(main())
