"""Enqueue the submitted surveys of the source as jobs of the `survey` flow.

    SURVEYHUB_ODBC='Driver={SQLite3};Database=/tmp/surveyhub.sqlite' \\
        python -m engine.examples.survey.producer --config engine/examples/survey/config.toml --dsn "$SKIPLOCK_DSN"

Each job carries a dedupe key (`survey:ID`), so running the producer again while earlier jobs are still
pending or running does not enqueue a survey twice. All jobs of one call form one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from engine.config import load_settings
from engine.errors import SkiplockError
from engine.queue import EnqueueResult, Queue
from engine.sources import Source, SourceConfig

from engine.examples.survey.flow import SOURCE

FLOW: Final = "survey"
EXAMPLE_CONFIG: Final = Path(__file__).with_name("config.toml")
SUBMITTED_SQL: Final = "SELECT survey_id FROM surveys WHERE status = ? ORDER BY survey_id"


def submitted_survey_ids(source: Source, status: str = "submitted") -> list[int]:
    return [int(row[0]) for row in source.query(SUBMITTED_SQL, status)]


def enqueue_surveys(queue: Queue, survey_ids: Sequence[int], *, run_id: str | None = None,
                    max_attempts: int = 5) -> EnqueueResult:
    return queue.enqueue_many(FLOW, [{"survey_id": i} for i in survey_ids], run_id=run_id,
                              max_attempts=max_attempts, dedupe_keys=[f"survey:{i}" for i in survey_ids])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.examples.survey.producer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(EXAMPLE_CONFIG), help="config file with [sources.surveyhub]")
    parser.add_argument("--env", help="environment of the config file")
    parser.add_argument("--dsn", help="the queue's database (default: SKIPLOCK_DSN or the config's dsn)")
    parser.add_argument("--run", help="run id (default: surveys-<unix time>)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config, env=args.env, dsn=args.dsn)
        if settings.dsn is None:
            raise SkiplockError("no database: pass --dsn or set SKIPLOCK_DSN")
        flow = settings.flows.get(FLOW)
        source = Source(SourceConfig.from_settings(SOURCE, settings.sources[SOURCE]))
        try:
            ids = submitted_survey_ids(source)
        finally:
            source.close()
        with Queue(settings.dsn) as queue:
            result = enqueue_surveys(queue, ids, run_id=args.run or f"surveys-{int(time.time())}",
                                     max_attempts=flow.max_attempts if flow else 5)
    except SkiplockError as exc:
        print(f"producer: error: {exc}", file=sys.stderr)
        return 2
    print(f"enqueued {result.inserted} survey(s), {result.skipped} already queued")
    return 0


if __name__ == "__main__":
    sys.exit(main())
