"""The contract itself (issue 11): the shipped schema is a valid draft
2020-12 schema, docs/events.md's examples meet it, and events that real runs
seldom produce (lost, error, repeats) meet it as portrace builds them. No root."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import contract
import pytest

from portrace.events import (
    SCHEMA_VERSION,
    ErrorRecord,
    Lost,
    Repeats,
    from_json,
    schema,
    to_json,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "events.md"
NOW = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=timezone.utc)


def _doc_examples() -> list[dict]:
    return [json.loads(m) for m in re.findall(r"```json\n(.*?)\n```", DOC.read_text(), re.S)]


def test_schema_is_valid_and_versioned():
    s = schema()
    assert s["$defs"]["ready_event"]["properties"]["schema_version"] == {"const": SCHEMA_VERSION}
    contract.check({"type": "lost", "ts": "2026-11-30T12:00:00.000000Z", "count": 1,
                    "source": "kernel"})


def test_every_type_is_documented_and_exemplified():
    types = set(schema()["properties"]["type"]["enum"])
    text = DOC.read_text()
    assert all(f"`{t}`" in text for t in types)
    shown = {e["type"] for e in _doc_examples()}
    assert {"ready", "bind", "state", "bind_error", "check"} <= shown


@pytest.mark.parametrize("example", _doc_examples(), ids=lambda e: e["type"])
def test_doc_examples_meet_the_schema(example):
    contract.check(example)


@pytest.mark.parametrize("ev", [
    Lost(ts=NOW, count=3, source="limit"),
    ErrorRecord(ts=NOW, where="diagnosis", message="ValueError: x", count=1,
                failure={"call": "bind", "pid": 1, "comm": "a", "addr": "0.0.0.0", "port": 80,
                         "errno": "EADDRINUSE"}),
    ErrorRecord(ts=NOW, where="output", message="OSError: full", count=2),
    Repeats(ts=NOW, since=NOW, call="bind", pid=7, comm="svc", family="inet",
            addr="0.0.0.0", port=9090, errno=98, count=4),
], ids=lambda ev: ev.type)
def test_built_events_meet_the_schema(ev):
    contract.check(to_json(ev))


@pytest.mark.parametrize("breakage, words", [
    (lambda e: e.pop("verdict"), "'verdict' is a required property"),
    (lambda e: e["verdict"].update(cause="bad_luck"), "bad_luck"),
    (lambda e: e.update(ts="2026-11-30 12:00:00"), "does not match"),
    (lambda e: e.update(surprise=1), "not in the schema"),
    (lambda e: e["blockers"][0].update(expires_s="59"), "not valid"),
])
def test_a_broken_event_is_caught(breakage, words):
    ev = next(e for e in _doc_examples() if e["type"] == "bind_error")
    breakage(ev)
    with pytest.raises(AssertionError, match=words):
        contract.check(ev)


# -- the schema and docs/events.md held equal to the typed events ---------------
# Each field is declared once, on the typed events (portrace.events.model); the
# schema and the docs are written by hand, so these hold them to it: every key
# the writer writes is in the schema (contract.check, above, on every shape) and
# in its event's section of the docs; every key the schema names is written.

def _shapes() -> list[dict]:
    from test_golden import CASES, SHAPES
    return [to_json(from_json(json.loads(given))) for given, _, _ in CASES[:SHAPES]]


def _walk(value, s: dict, name: str, seen: dict[str, set[str]], props: dict[str, set[str]]):
    """Record, for each object schema ``value`` meets, the keys it wrote."""
    defs = schema()["$defs"]
    if "$ref" in s:
        name = s["$ref"].rsplit("/", 1)[-1]
        s = defs[name]
    for part in s.get("allOf", ()):
        _walk(value, part, name, seen, props)
    for part in s.get("anyOf", ()):
        if (value is None) == (part.get("type") == "null"):
            _walk(value, part, name, seen, props)
    if isinstance(value, dict) and "properties" in s:
        props.setdefault(name, set()).update(s["properties"])
        seen.setdefault(name, set()).update(k for k in value if k in s["properties"])
        for k, v in value.items():
            if k in s["properties"]:
                _walk(v, s["properties"][k], f"{name}.{k}", seen, props)
    if isinstance(value, list) and "items" in s:
        for v in value:
            _walk(v, s["items"], name, seen, props)


def test_the_schema_names_no_field_the_events_do_not_write():
    seen: dict[str, set[str]] = {}
    props: dict[str, set[str]] = {}
    for ev in _shapes():
        _walk(ev, {"$ref": f"#/$defs/{ev['type']}_event"}, "", seen, props)
    never = {name: sorted(props[name] - seen[name]) for name in props if props[name] - seen[name]}
    assert not never, f"in the schema, never written: {never}"
    types = set(schema()["properties"]["type"]["enum"])
    assert {f"{t}_event" for t in types} <= set(props), "an event type was never written"


def _doc_sections() -> dict[str, str]:
    """Each event type -> the prose and table of its section, before the example."""
    out = {}
    for head, body in re.findall(r"^## (.*?)\n(.*?)(?=^## |\Z)", DOC.read_text(), re.S | re.M):
        text = body.split("```json")[0]
        for t in re.findall(r"`([a-z_]+)`", head):
            out[t] = text
    return out


def test_docs_name_every_field_of_each_event():
    sections = _doc_sections()
    for ev in _shapes():
        text = sections[ev["type"]]
        missing = [k for k in ev if k not in ("type", "ts") and f"`{k}`" not in text]
        assert not missing, f"docs/events.md's `{ev['type']}` section does not name {missing}"
