"""The JSON contract byte for byte: tests/golden/events.jsonl (docs/events.md's
examples, every event type built with every optional shape, and the least each
reader accepts) read into typed events equal to read.txt's lines (fields by
name), and written back equal to written.jsonl's lines, key order included.
The files were made by the writer and reader before each field was declared
once in the typed events (tests/golden/README); any change to either shows
here. No root."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from portrace.events import from_json, to_json


def typed(value: Any) -> str:
    """A typed event as text that does not depend on the order its fields are
    declared in: each dataclass's constructor fields, sorted by name."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        inner = ", ".join(f"{f.name}={typed(getattr(value, f.name))}"
                          for f in sorted(dataclasses.fields(value), key=lambda f: f.name)
                          if f.init)
        return f"{type(value).__name__}({inner})"
    if isinstance(value, (list, tuple)):
        return type(value).__name__ + "[" + ", ".join(typed(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {typed(v)}" for k, v in value.items()) + "}"
    return repr(value)

GOLDEN = Path(__file__).resolve().parent / "golden"
CASES = list(zip((GOLDEN / "events.jsonl").read_text().splitlines(),
                 (GOLDEN / "read.txt").read_text().splitlines(),
                 (GOLDEN / "written.jsonl").read_text().splitlines()))


def test_the_golden_files_line_up():
    assert len(CASES) == 26


@pytest.mark.parametrize("given, expected, written", CASES,
                         ids=[f"{i}-{json.loads(c[0])['type']}" for i, c in enumerate(CASES)])
def test_read_and_written_as_before(given, expected, written):
    ev = from_json(json.loads(given))
    assert typed(ev) == expected
    assert json.dumps(to_json(ev)) == written
