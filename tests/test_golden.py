"""The JSON contract's stability rule (docs/events.md: fields may be added,
never renamed or dropped, and no value changes meaning), held on
tests/golden/events.jsonl: docs/events.md's examples and every event type built
with every optional shape (the first SHAPES lines), then the least each reader
accepts. Each reads into typed events that hold what read.jsonl records, and
writes back what written.jsonl records, in the same key order; added fields may
sit between. The records were made by the writer and reader as they were before
the typed events declared each field once (tests/golden/README). No root."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import contract
import pytest

from portrace.events import from_json, to_json

GOLDEN = Path(__file__).resolve().parent / "golden"
SHAPES = 19  # events.jsonl's well-formed lines; the rest test the readers' leniency
CASES = list(zip((GOLDEN / "events.jsonl").read_text().splitlines(),
                 (GOLDEN / "read.jsonl").read_text().splitlines(),
                 (GOLDEN / "written.jsonl").read_text().splitlines()))
IDS = [f"{i}-{json.loads(c[0])['type']}" for i, c in enumerate(CASES)]


def typed(value: Any) -> Any:
    """A typed event as JSON data: each dataclass's constructor fields by name,
    with its class; tuples as lists, times by repr."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__class__": type(value).__name__,
                **{f.name: typed(getattr(value, f.name))
                   for f in sorted(dataclasses.fields(value), key=lambda f: f.name) if f.init}}
    if isinstance(value, (list, tuple)):
        return [typed(v) for v in value]
    if isinstance(value, dict):
        return {k: typed(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def kept(old: Any, new: Any, where: str = "") -> None:
    """``new`` holds all of ``old``: every key with its value (recursively), in
    the same order among themselves; lists item by item. Extra keys may come
    anywhere."""
    if isinstance(old, dict):
        assert isinstance(new, dict), f"{where or 'event'}: no longer an object"
        missing = [k for k in old if k not in new]
        assert not missing, f"{where or 'event'}: dropped {missing}"
        order = [k for k in new if k in old]
        assert order == list(old), f"{where or 'event'}: keys reordered: {order}"
        for k in old:
            kept(old[k], new[k], f"{where}.{k}" if where else k)
    elif isinstance(old, list):
        assert isinstance(new, list) and len(new) == len(old), f"{where}: {new!r}"
        for i, (o, n) in enumerate(zip(old, new)):
            kept(o, n, f"{where}[{i}]")
    else:
        assert new == old and type(new) is type(old), f"{where}: {old!r} -> {new!r}"


def test_the_golden_files_line_up():
    assert len(CASES) == 28


@pytest.mark.parametrize("given, expected, written", CASES, ids=IDS)
def test_read_and_written_as_before(given, expected, written):
    ev = from_json(json.loads(given))
    kept(json.loads(expected), typed(ev))
    kept(json.loads(written), to_json(ev))


@pytest.mark.parametrize("given", [c[0] for c in CASES[:SHAPES]], ids=IDS[:SHAPES])
def test_every_shape_written_meets_the_schema(given):
    contract.check(to_json(from_json(json.loads(given))))


def test_a_dropped_or_changed_field_is_caught():
    written = json.loads(CASES[3][2])
    for breakage in (lambda e: e.pop("sk_uid"), lambda e: e.update(lookup_ms=1),
                     lambda e: e["blockers"][0]["options"].pop("source"),
                     lambda e: e.update(pid=e.pop("pid"))):
        now = json.loads(CASES[3][2])
        breakage(now)
        with pytest.raises(AssertionError):
            kept(written, now)
    kept(written, {**written, "new_field": 1})
