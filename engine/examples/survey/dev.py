"""`engine dev --example survey`: the survey flow end to end on one machine.

Starts the embedded PostgreSQL (unless a DSN is configured), migrates, writes sample SurveyHub data to a
SQLite file next to the cluster and reads it over ODBC (driver SQLite3, Debian package libsqliteodbc),
creates the results table, enqueues the submitted surveys plus one id that does not exist (it ends as
a dead letter, permanently), runs an engine on the `survey` flow until the queue is drained (or
--seconds pass, or Ctrl-C), and prints the status, the results and the dead letters.

With SURVEYHUB_ODBC already set, that source is used as it is and no sample data is written.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Final

from engine import db
from engine.config import Settings, load_settings
from engine.dev import (DevOptions, database_for, print_status_of, start_engine_process, stop_database, stop_engine,
                        stop_requested_by_signals)
from engine.embedded import default_data_dir
from engine.migrate import migrate
from engine.queue import DeadLetterFilter, Queue
from engine.sources import Source, SourceConfig
from engine.supervisor import EngineOptions

from engine.examples.survey.flow import SOURCE, create_results_table
from engine.examples.survey.producer import EXAMPLE_CONFIG, FLOW, enqueue_surveys, submitted_survey_ids
from engine.examples.survey.sample_data import create_source_data, sqlite_connection_string

ENV_VAR: Final = "SURVEYHUB_ODBC"
MISSING_SURVEY_ID: Final = 999_999
SAMPLE_SURVEYS: Final = 200


def run_example(options: DevOptions, open_console: object = None) -> int:
    """`open_console` is accepted for the examples' common signature; this one prints instead."""
    config = str(options.config) if options.config else str(EXAMPLE_CONFIG)
    data_dir = Path(options.data_dir or default_data_dir())
    if not os.environ.get(ENV_VAR):
        sqlite_file = data_dir.parent / "surveyhub.sqlite"
        sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        os.environ[ENV_VAR] = sqlite_connection_string(sqlite_file)
        submitted = create_source_data(os.environ[ENV_VAR], SAMPLE_SURVEYS)
        print(f"sample SurveyHub written to {sqlite_file} ({SAMPLE_SURVEYS} surveys, {len(submitted)} submitted)",
              flush=True)
    settings = load_settings(config, env=options.env, dsn=options.dsn)
    server, dsn = database_for(settings.dsn, data_dir)
    try:
        with db.connect(dsn) as conn:
            applied = migrate(conn)
            create_results_table(conn)
        print(f"schema migrated ({len(applied)} migration(s) applied), survey_results ready", flush=True)
        source = Source(SourceConfig.from_settings(SOURCE, settings.sources[SOURCE]))
        try:
            ids = submitted_survey_ids(source)
        finally:
            source.close()
        flow = settings.flows[FLOW]
        with Queue(dsn) as queue:
            result = enqueue_surveys(queue, [*ids, MISSING_SURVEY_ID], run_id=f"surveys-{int(time.time())}",
                                     max_attempts=flow.max_attempts, allow_unknown_flow=True)  # its engine starts next
        print(f"enqueued {result.inserted} survey job(s) (survey {MISSING_SURVEY_ID} does not exist)", flush=True)
        settings = dataclasses.replace(settings, dsn=dsn)
        if options.no_engine:
            print_status_of(settings, FLOW)
            return 0
        code = _run_engine(settings, options)
        print_status_of(settings, FLOW)
        _print_outcome(dsn)
        return code
    finally:
        stop_database(server)


def _run_engine(settings: Settings, options: DevOptions) -> int:
    # wait_scheduled: the example's transient failures retry after a backoff, and belong to the run shown.
    run = EngineOptions(workers=options.workers, flows=FLOW, drain=True, wait_scheduled=True)
    engine = start_engine_process(settings, run)
    stop = stop_requested_by_signals()
    deadline = time.monotonic() + options.seconds if options.seconds else None
    print("engine running until the survey queue is drained; Ctrl-C stops", flush=True)
    while engine.is_alive() and not stop["requested"]:
        if deadline is not None and time.monotonic() >= deadline:
            break
        engine.join(0.2)
    return stop_engine(engine)


def _print_outcome(dsn: str) -> None:
    with db.connect(dsn) as conn:
        rows = conn.execute("SELECT band, count(*), round(avg(score), 2) FROM survey_results "
                            "GROUP BY band ORDER BY band").fetchall()
    print("\nsurvey_results by band:")
    for band, count, average in rows:
        print(f"  {band:<10} {count:>5} surveys, average score {average}")
    with Queue(dsn) as queue:
        dead = queue.dead_letters(DeadLetterFilter(flow=FLOW))
    print(f"dead letters: {len(dead)}")
    for letter in dead[:5]:
        print(f"  job {letter.id}: {letter.error_type}: {letter.error_message}")
