"""`engine dev --example pipeline`: seed 004's document pipeline end to end on one machine.

Starts the embedded PostgreSQL (unless a DSN is configured), migrates, creates the embeddings
table, enqueues sample documents (and one empty one, which ends as a dead letter) as one run, runs
an engine on parse, chunk and embed until the pipeline is drained (or --seconds pass, or Ctrl-C) with
the console open on a terminal (the Pipelines view, key 8), then prints the pipeline and the run.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Final

from engine import db
from engine.config import load_settings
from engine.dev import DevOptions, database_for, start_engine_process, stop_database, stop_engine, stop_requested_by_signals
from engine.embedded import default_data_dir
from engine.migrate import migrate
from engine.queue import Queue
from engine.report import print_pipeline, print_table
from engine.supervisor import EngineOptions

from engine.examples.pipeline.flow import create_embeddings_table, sample_documents

EXAMPLE_CONFIG: Final = Path(__file__).with_name("config.toml")
FLOWS: Final = "parse,chunk,embed"
DOCUMENTS: Final = 300


def run_example(options: DevOptions, open_console: Any = None) -> int:
    config = str(options.config) if options.config else str(EXAMPLE_CONFIG)
    settings = load_settings(config, env=options.env, dsn=options.dsn)
    server, dsn = database_for(settings.dsn, Path(options.data_dir or default_data_dir()))
    try:
        with db.connect(dsn) as conn:
            applied = migrate(conn)
            create_embeddings_table(conn)
        print(f"schema migrated ({len(applied)} migration(s) applied), pipeline_embeddings ready", flush=True)
        run_id = f"documents-{int(time.time())}"
        docs = sample_documents(DOCUMENTS) + [{"document": "doc-empty", "text": ""}]
        with Queue(dsn) as queue:
            queue.enqueue_many("parse", docs, run_id=run_id, allow_unknown_flow=True)  # its engine starts next
        print(f"enqueued {len(docs)} documents as run {run_id} (doc-empty has no text: a dead letter)", flush=True)
        settings = dataclasses.replace(settings, dsn=dsn)
        if options.no_engine:
            return 0
        engine = start_engine_process(settings, EngineOptions(workers=options.workers, flows=FLOWS, drain=True),
                                      log_path=str(Path(options.data_dir or default_data_dir()).parent / "engine-dev.log"))
        if open_console is not None and not options.no_console and _tty():
            open_console(dsn, settings, options.seconds)
        else:
            _wait(engine, options)
        code = stop_engine(engine)
        _print_outcome(dsn, run_id)
        return code
    finally:
        stop_database(server)


def _tty() -> bool:
    import sys

    return sys.stdin.isatty() and sys.stdout.isatty()


def _wait(engine: Any, options: DevOptions) -> None:
    stop = stop_requested_by_signals()
    deadline = time.monotonic() + options.seconds if options.seconds else None
    print("engine running until the pipeline is drained; Ctrl-C stops", flush=True)
    while engine.is_alive() and not stop["requested"]:
        if deadline is not None and time.monotonic() >= deadline:
            break
        engine.join(0.2)


def _print_outcome(dsn: str, run_id: str) -> None:
    with Queue(dsn) as queue:
        for pipeline in queue.pipelines():
            print_pipeline(pipeline)
        info, stages = queue.run(run_id)
    state = "finished" if info.finished_at else "open"
    print(f"\nrun {run_id}: {state}, {info.total} jobs, {info.completed} completed, {info.dead} dead")
    print_table(("stage", "pending", "running", "dead", "completed"),
                [(s.flow, s.pending, s.running, s.dead, s.completed) for s in stages])
    with db.connect(dsn) as conn:
        stored = conn.execute("SELECT count(*), count(DISTINCT document) FROM pipeline_embeddings").fetchone()
    print(f"pipeline_embeddings: {stored[0]} chunks of {stored[1]} documents")
