"""Telemetry events: the docstring table in engine/telemetry.py, the TypedDicts and encode_event agree."""

from __future__ import annotations

import re
from typing import get_args

import orjson
import pytest

import engine.telemetry as telemetry
from engine.telemetry import EVENT_FIELDS, AnyEvent, EventKind, encode_event


def table() -> dict[str, str]:
    """kind -> its fields column, from the module docstring's table."""
    rows = re.findall(r"^\| ([a-z_]+)\s+\| [a-z]+\s+\| (.*) \|$", telemetry.__doc__ or "", re.M)
    return dict(rows)


def test_every_documented_kind_has_one_typed_dict_with_the_documented_fields() -> None:
    documented = table()
    assert set(documented) == set(EVENT_FIELDS) == set(get_args(EventKind))
    union = {t.__annotations__["kind"] for t in get_args(AnyEvent)}
    assert len(union) == len(documented)  # one event class per kind
    for kind, fields in documented.items():
        names = EVENT_FIELDS[kind].__required_keys__
        top_level = set(re.findall(r"(?:^|, )([a-z_]+)", re.sub(r"\{[^{}]*(\{[^{}]*\}[^{}]*)*\}|\([^)]*\)|\[[^]]*\]", "", fields)))
        assert names == top_level, kind


def test_encode_event_refuses_an_unknown_kind_or_wrong_fields() -> None:
    with pytest.raises(ValueError, match="unknown event kind 'tik'"):
        encode_event("tik", engine="e")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match=r"event circuit_closed: fields \['flow'\], expected \['engine', 'flow', 'worker'\]"):
        encode_event("circuit_closed", flow="f")  # type: ignore[call-arg]
    event = orjson.loads(encode_event("flow_paused", flow="f"))
    assert (event["v"], event["kind"], event["flow"]) == (1, "flow_paused", "f")
    assert isinstance(event["at"], float)
