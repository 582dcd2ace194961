"""Pipelines: flows linked by `next` (their recorded policy) or by observed parent -> child jobs
(skiplock.flow_links), each shown as a chain of stages read top to bottom.

A pipeline is one connected group of linked flows; its stages are ordered so that every stage comes
after the stages that feed it (a cycle, e.g. a flow that re-enqueues itself, is cut where it closes).
Fan-out to two flows shows both, one row each. Pure functions here; engine/queue.py reads the
numbers, `engine status`, `engine runs show` and the console print them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class StageCounts:
    flow: str
    pending: int  # due now
    scheduled: int  # pending with a later run_at
    running: int
    dead: int
    done_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Pipeline:
    name: str  # its first stage
    stages: list[StageCounts]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "stages": [s.to_dict() for s in self.stages]}


def chains(links: Iterable[tuple[str, str]]) -> list[list[str]]:
    """The connected groups of `links` (parent, child), each in stage order; a self-link alone is not
    a pipeline. Sorted by first stage."""
    edges: dict[str, set[str]] = {}
    nodes: set[str] = set()
    for parent, child in links:
        if parent == child:
            continue
        edges.setdefault(parent, set()).add(child)
        nodes.update((parent, child))
    neighbours: dict[str, set[str]] = {n: set() for n in nodes}
    for parent, children in edges.items():
        for child in children:
            neighbours[parent].add(child)
            neighbours[child].add(parent)
    groups: list[list[str]] = []
    seen: set[str] = set()
    for start in sorted(nodes):
        if start in seen:
            continue
        group: set[str] = set()
        todo = [start]
        while todo:
            node = todo.pop()
            if node in group:
                continue
            group.add(node)
            todo.extend(neighbours[node] - group)
        seen |= group
        groups.append(_ordered(group, edges))
    return sorted(groups, key=lambda g: g[0])


def _ordered(group: set[str], edges: Mapping[str, set[str]]) -> list[str]:
    """Kahn's order; when every remaining stage has a feeder (a cycle), the first by name goes next."""
    indegree = {n: 0 for n in group}
    for parent in group:
        for child in edges.get(parent, ()):
            if child in group:
                indegree[child] += 1
    order: list[str] = []
    left = set(group)
    while left:
        ready = sorted(n for n in left if indegree[n] == 0) or [min(left)]
        node = ready[0]
        order.append(node)
        left.discard(node)
        for child in edges.get(node, ()):
            if child in left:
                indegree[child] -= 1
    return order


def build(links: Iterable[tuple[str, str]], live: Mapping[str, Any], rates: Mapping[str, float]) -> list[Pipeline]:
    """Pipelines with their stages' counts: `live` maps a flow to store.LiveCounts, `rates` to jobs/s."""
    pipelines: list[Pipeline] = []
    for chain in chains(links):
        stages = []
        for flow in chain:
            c = live.get(flow)
            stages.append(StageCounts(flow, int(c.pending) if c else 0, int(c.scheduled) if c else 0,
                                      int(c.running) if c else 0, int(c.dead) if c else 0,
                                      round(float(rates.get(flow, 0.0)), 2)))
        pipelines.append(Pipeline(chain[0], stages))
    return pipelines
