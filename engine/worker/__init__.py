"""The worker process, as parts (one home for each part of a job's life):

- process.py: lifecycle, signals, pool, listener thread, the main loop, shutdown (WorkerSpec, worker_main)
- producer.py: per flow, the claim with its gates and how many jobs to claim
- executors.py: inline, batch, threads, asyncio (chosen once per flow: FlowRuntime.mode)
- context.py: the handler's context and ctx.pg, transactional or not
- completer.py: buffered, fenced acks for the concurrent executors
- circuit.py: the circuit breaker
- heartbeat.py: the telemetry/heartbeat thread and the deadline monitor
- outcome.py: a handler's return or exception turned into what the ack stores
"""

from engine.worker.process import EXIT_DB_LOST, EXIT_LOST, EXIT_OK, EXIT_STUCK_HANDLER, Worker, WorkerSpec, worker_main

__all__ = ["EXIT_DB_LOST", "EXIT_LOST", "EXIT_OK", "EXIT_STUCK_HANDLER", "Worker", "WorkerSpec", "worker_main"]
