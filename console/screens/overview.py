"""Overview: throughput chart, flows, workers, runs."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from console import format as fmt
from console.data import FlowRow, Snapshot, WorkerRow
from console.filters import Filter
from console.messages import CycleWindow, SetFlowPaused, ShowDeadLetters
from console.screens.base import ConsoleScreen, WriteBinding
from console.data import LATENCY_MIN_SAMPLES, Latency
from console.state import WINDOW_NAMES, history_means, history_totals
from console.widgets.chart import ThroughputChart
from console.widgets.tables import Table, sync_rows

FLOW_COLUMNS = (("flow", "Flow"), ("state", "State"), ("pending", "Pending"), ("scheduled", "Sched"),
                ("retrying", "Retry"), ("running", "Running"), ("dead", "Dead"), ("done_s", "Done/s"),
                ("fail_s", "Fail/s"), ("done_1h", "Done 1h"), ("wait", "Wait p50/p95"), ("run", "Run p50/p95"))
WORKER_COLUMNS = (("host", "Host"), ("pid", "PID"), ("state", "State"), ("heartbeat", "Heartbeat"),
                  ("done", "Jobs done"), ("failed", "Failed"), ("rate", "Rate/s"), ("pool", "Pool"),
                  ("flows", "Flows"), ("up", "Up"))
RUN_COLUMNS = (("run", "Run"), ("flow", "Flow"), ("progress", "Progress"), ("done", "Done"),
               ("dead", "Dead"), ("eta", "ETA"))


class OverviewScreen(ConsoleScreen):
    FILTER_HINT = "flow:NAME status:paused|active|open  free text"
    BINDINGS = [
        Binding("t", "window", "Window", id="skiplock.window"),
        WriteBinding("p", "toggle_pause", "Pause/resume flow", id="skiplock.pause_flow"),
    ]

    def body(self) -> ComposeResult:
        with Vertical(id="chart-box", classes="box") as box:
            box.border_title = "Throughput"
            box.border_subtitle = "t: 1 min · 5 min · 15 min · 1 h"
            yield ThroughputChart(self._series, window_label=WINDOW_NAMES[self.console.window], id="chart")
        yield Static("", id="flows-title", classes="title")
        yield Table(id="flows", cursor_type="row", zebra_stripes=False)
        yield Static("", id="runs-title", classes="title")
        yield Table(id="runs", cursor_type="row", show_cursor=False)
        yield Static("", id="workers-title", classes="title")
        yield Table(id="workers", cursor_type="row", show_cursor=False)

    def prepare(self) -> None:
        self.query_one("#flows", DataTable).add_columns(*[(label, key) for key, label in FLOW_COLUMNS])
        self.query_one("#workers", DataTable).add_columns(*[(label, key) for key, label in WORKER_COLUMNS])
        self.query_one("#runs", DataTable).add_columns(*[(label, key) for key, label in RUN_COLUMNS])
        self.query_one("#flows", DataTable).focus()

    def _series(self, points: int) -> tuple[list[float], list[float]]:
        app = self.console
        return app.state.series(app.window, app.now(), points)

    # -- drawing --------------------------------------------------------------------------------------

    def update_view(self, changed: set[str]) -> None:
        chart = self.query_one(ThroughputChart)
        chart.window_label = WINDOW_NAMES[self.console.window]
        chart.refresh()
        snapshot = self.console.state.snapshot
        if snapshot is None:
            self.query_one("#flows-title", Static).update(Text("Flows  (loading…)", style="bold"))
            return
        self._draw_flows(snapshot)
        self._draw_workers(snapshot)
        self._draw_runs(snapshot)

    def visible_flows(self, snapshot: Snapshot) -> list[FlowRow]:
        wanted = self.filter
        state = self.console.state
        flows = []
        for flow in snapshot.flows:
            paused = state.paused(flow.name, flow.paused)
            status = "paused" if paused else flow.state
            if wanted.flow and flow.name != wanted.flow:
                continue
            if wanted.status and not status.startswith(wanted.status) and not (
                    wanted.status == "open" and "open" in status):
                continue
            if not wanted.matches_text(flow.name, status):
                continue
            flows.append(flow)
        return flows

    def _draw_flows(self, snapshot: Snapshot) -> None:
        app = self.console
        state = app.state
        now = app.now()
        rates = state.flow_rates(now)
        cap = app.data.count_cap
        totals = history_totals(snapshot.history)
        means = history_means(snapshot.history, now)
        theme = app.current_theme
        rows = []
        flows = self.visible_flows(snapshot)
        for flow in flows:
            paused = state.paused(flow.name, flow.paused)
            circuit = state.circuit_override.get(flow.name)
            status = "paused" if paused else ("circuit open" if circuit == "open" else
                                              ("active" if circuit == "closed" else flow.state))
            status_style = {"paused": theme.warning, "circuit open": theme.error,
                            "half-open": theme.warning}.get(status, theme.success)
            done_s, fail_s = rates.get(flow.name, (0.0, 0.0))
            latency = snapshot.latency.get(flow.name)
            dead = state.dead_count(flow.name, flow.dead)
            rows.append((flow.name, [
                Text(flow.name, style="bold"),
                Text(status, style=status_style or ""),
                fmt.count(flow.ready, flow.pending_estimate, capped=flow.ready >= cap),
                fmt.count(flow.scheduled),
                fmt.count(flow.retrying),
                fmt.count(flow.running),
                Text(fmt.count(dead, flow.dead_estimate, capped=flow.dead >= cap), style=(theme.error or "red") if dead else ""),
                fmt.rate(done_s),
                Text(fmt.rate(fail_s), style=(theme.error or "red") if fail_s else ""),
                fmt.count(totals.get(flow.name, (0, 0, 0))[0]),
                *self._latency_cells(latency, means.get(flow.name)),
            ]))
        sync_rows(self.query_one("#flows", DataTable), rows)
        shown = f"{len(flows)} of {len(snapshot.flows)}" if len(flows) != len(snapshot.flows) else f"{len(flows)}"
        title = Text("Flows ", style="bold")
        if not snapshot.flows:
            title.append("none yet: an engine adds the flows it serves when it starts (`engine run`)", style="dim")
            self.query_one("#flows-title", Static).update(title)
            return
        title.append(f"{shown}  ·  Enter: dead letters of the flow", style="dim")
        if not self.console.read_only:
            title.append("  ·  p: pause/resume", style="dim")
        title.append(self.filter_label(), style="bold")
        self.query_one("#flows-title", Static).update(title)

    @staticmethod
    def _latency_cells(latency: Latency | None, mean: tuple[float, float] | None) -> list[Any]:
        """p50 / p95 from the sample of recent completions; with too few of them, the mean over the
        last minutes from stats_minute (dim, marked "avg")."""
        if latency is not None and latency.samples >= LATENCY_MIN_SAMPLES:
            return [fmt.pair(fmt.millis(latency.wait_p50), fmt.millis(latency.wait_p95)),
                    fmt.pair(fmt.millis(latency.run_p50), fmt.millis(latency.run_p95))]
        if mean is not None:
            return [Text(f"avg {fmt.millis(mean[0])}", style="dim"), Text(f"avg {fmt.millis(mean[1])}", style="dim")]
        return [fmt.DASH, fmt.DASH]

    def _draw_workers(self, snapshot: Snapshot) -> None:
        app = self.console
        theme = app.current_theme
        now = app.now()
        rows = []
        for worker in snapshot.workers:
            if not self.filter.empty and self.filter.flow and self.filter.flow not in worker.flows:
                continue
            rows.append((worker.id, self._worker_cells(worker, now, theme)))
        sync_rows(self.query_one("#workers", DataTable), rows)
        live = snapshot.live_workers
        title = Text("Workers ", style="bold")
        title.append(f"{len(live)} live on {snapshot.engines} engine(s)", style="dim")
        stale = [w for w in live if w.heartbeat_age >= app.stale_after]
        if stale:
            title.append(f"  ·  {len(stale)} stale", style=f"bold {theme.error}")
        self.query_one("#workers-title", Static).update(title)

    def _worker_cells(self, worker: WorkerRow, now: float, theme: Any) -> list[Any]:
        app = self.console
        age = worker.heartbeat_age
        if worker.state == "lost" or (worker.live and age >= app.stale_after):
            beat_style = f"bold {theme.error}"
        elif worker.live and age >= app.stale_after / 2:
            beat_style = theme.warning or "yellow"
        else:
            beat_style = ""
        state_style = {"busy": theme.success, "idle": "", "starting": theme.accent, "draining": theme.warning,
                       "stopped": "dim", "lost": f"bold {theme.error}"}.get(worker.state, "")
        pool = worker.pool or {}
        in_use = int(pool.get("size", 0) or 0) - int(pool.get("available", 0) or 0)
        pool_text = f"{max(in_use, 0)}/{pool.get('max', '?')}" if pool else fmt.DASH
        if pool.get("waiting"):
            pool_text += f" +{pool['waiting']}w"
        worker_rate = app.state.worker_rate(worker.id, now) if worker.live else None
        counters = worker.counters or {}
        return [
            worker.host,
            str(worker.pid),
            Text(worker.state, style=state_style or ""),
            Text(fmt.duration(age) if worker.live or worker.state == "lost" else fmt.DASH, style=beat_style),
            fmt.count(int(counters.get("completed", 0))),
            fmt.count(int(counters.get("failed", 0))),
            fmt.rate(worker_rate),
            pool_text,
            fmt.clip(",".join(worker.flows), 18),
            fmt.duration(worker.uptime),
        ]

    def _draw_runs(self, snapshot: Snapshot) -> None:
        rows = []
        for run in snapshot.runs:
            if self.filter.flow and run.flow != self.filter.flow:
                continue
            if run.finished:
                eta = Text(f"took {fmt.duration(run.took)}", style="dim")
            elif run.done and run.age > 0:
                remaining = max(run.total - run.done, 0)
                eta = Text(fmt.duration(remaining / (run.done / run.age)))
            else:
                eta = Text(fmt.DASH)
            rows.append((run.id, [
                fmt.clip(run.id, 28), run.flow, fmt.bar(run.done, run.total, 24),
                f"{run.done:,}/{run.total:,}", Text(fmt.count(run.dead), style="red" if run.dead else ""), eta,
            ]))
        sync_rows(self.query_one("#runs", DataTable), rows)
        active = sum(1 for r in snapshot.runs if not r.finished)
        title = Text("Runs ", style="bold")
        title.append(f"{active} running, {len(snapshot.runs) - active} finished in the last hour", style="dim")
        self.query_one("#runs-title", Static).update(title)
        self.query_one("#runs", DataTable).display = bool(rows)

    # -- actions -----------------------------------------------------------------------------------------

    def action_window(self) -> None:
        self.ask(CycleWindow())

    def selected_flow(self) -> str | None:
        return self.cursor_key(self.query_one("#flows", DataTable))

    def action_toggle_pause(self) -> None:
        flow = self.selected_flow()
        snapshot = self.console.state.snapshot
        if flow is None or snapshot is None:
            self.notify("no flow selected", severity="warning")
            return
        row = next((f for f in snapshot.flows if f.name == flow), None)
        paused = self.console.state.paused(flow, row.paused if row else False)
        self.ask(SetFlowPaused(flow, not paused))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "flows" and event.row_key.value is not None:
            flow = str(event.row_key.value)
            self.ask(ShowDeadLetters(Filter(flow=flow, text=f"flow:{flow}")))
