"""Stages: a handler hands its item to the next flow in the same statement that acks it.

What a handler may return (README: "Stages and pipelines"):

- `Next(flow, payload, **options)`: one follow-up job; nothing is stored as the job's result.
- a list of `Next` (fan-out): one follow-up job each (an empty list is a plain result, `[]`).
- `Result(value, next)`: `value` is stored as the result, `next` (a `Next` or a list) follows.
- in a flow with `next = "FLOW"`, a plain result that is a JSON object is also the payload of one
  FLOW job; `None` ends the item there.

Options are enqueue's: `priority`, `delay`, `max_attempts`, `dedupe_key`. Children inherit the
parent's run and record `parent_id`. The worker validates every child before the ack, as enqueue
validates a job (flow name and known flow, payload rules, options): a bad `Next` fails its parent
with one line naming the child (permanently, except an unknown flow: its engine may not be deployed
yet, so that retries with the backoff).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from engine.errors import PermanentError, ValidationError
from engine.store import Children

__all__ = ["InvalidNext", "Next", "Result", "UnknownNextFlow", "split"]


class Next:
    """A follow-up job of another (or the same) flow, inserted by the ack of the job that returns it."""

    __slots__ = ("flow", "payload", "priority", "delay", "max_attempts", "dedupe_key")

    def __init__(self, flow: str, payload: Mapping[str, Any], *, priority: int = 0, delay: float = 0.0,
                 max_attempts: int | None = None, dedupe_key: str | None = None) -> None:
        self.flow = flow
        self.payload = payload
        self.priority = priority
        self.delay = delay
        self.max_attempts = max_attempts
        self.dedupe_key = dedupe_key

    def __repr__(self) -> str:
        return f"Next({self.flow!r}, {self.payload!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Next) and all(getattr(self, s) == getattr(other, s) for s in self.__slots__)

    __hash__ = None  # type: ignore[assignment]  # mutable payload


class Result:
    """A result to store beside the follow-up jobs: `return Result({"pages": 3}, [Next(...), ...])`."""

    __slots__ = ("value", "next")

    def __init__(self, value: Any, next: "Next | list[Next] | tuple[Next, ...]" = ()) -> None:
        self.value = value
        self.next = next

    def __repr__(self) -> str:
        return f"Result({self.value!r}, {self.next!r})"


class InvalidNext(PermanentError):
    """A handler returned a follow-up job that enqueue would refuse: its job fails, no child exists."""


class UnknownNextFlow(Exception):
    """A Next(...) names a flow no engine has registered (retried: its engine may start later)."""


# Classes a return value is looked at for: anything else is a plain result (one set lookup per job).
HANDOFF_TYPES: Final = frozenset({Next, Result, list, tuple})


def split(returned: Any, parent: int, next_flow: str | None, known: Callable[[str], bool],
          into: Children) -> Any:
    """What to store as the result of job `parent` for `returned`, its children added to `into`.

    Called only for a non-None return whose class is in HANDOFF_TYPES or of a flow with `next`.
    Every child is validated first and added only when all are good, so a failing job adds none.
    """
    value: Any
    nexts: Any
    cls = returned.__class__
    if cls is Next:
        value, nexts = None, (returned,)
    elif cls is Result:
        value, nexts = returned.value, returned.next
        nexts = (nexts,) if nexts.__class__ is Next else nexts
        if not isinstance(nexts, (list, tuple)) or not all(n.__class__ is Next for n in nexts):
            raise InvalidNext("Result(value, next): next must be a Next or a list of Next")
    elif (cls is list or cls is tuple) and returned and returned[0].__class__ is Next:
        if not all(n.__class__ is Next for n in returned):
            raise InvalidNext("a fan-out list must hold only Next(...) items")
        value, nexts = None, returned
    elif next_flow is not None:
        if not isinstance(returned, Mapping):
            raise InvalidNext(f"this flow has next = {next_flow!r}: its handler's result becomes that flow's "
                              f"payload and must be a JSON object (a dict), got {cls.__name__}; return None "
                              "to end the item here")
        value, nexts = returned, (Next(next_flow, returned),)
    else:
        return returned
    if nexts:
        _add(nexts, parent, known, into)
    return value


def _add(nexts: Any, parent: int, known: Callable[[str], bool], into: Children) -> None:
    from engine.queue import EnqueueOptions, _validate_key, encode_payload, validate_flow  # no import cycle

    staged = Children()
    for index, item in enumerate(nexts):
        where = f"Next #{index} ({item.flow!r})" if len(nexts) > 1 else f"Next({item.flow!r})"
        try:
            validate_flow(item.flow)
            text = encode_payload(item.payload, where)
            options = EnqueueOptions(item.priority, item.delay or 0.0, item.max_attempts).validated()
            _validate_key(item.dedupe_key, f"{where}: dedupe key")
        except ValidationError as exc:
            message = str(exc)
            raise InvalidNext(message if message.startswith(where) else f"{where}: {message}") from None
        if not known(item.flow):
            raise UnknownNextFlow(f"{where}: flow {item.flow!r} is unknown: no engine has registered it "
                                  "(declare it in the config, or start an engine that serves it)")
        staged.add(parent, item.flow, text, options.priority, options.delay, options.max_attempts, item.dedupe_key)
    into.extend(staged)
