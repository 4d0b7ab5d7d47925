"""The JSON contract byte for byte: tests/golden/events.jsonl (docs/events.md's
examples, every event type built with every optional shape, and the least each
reader accepts) read into typed events equal to read.txt's reprs, and written
back equal to written.jsonl's lines, key order included. The files were made by
the writer and reader before each field was declared once in the typed events
(tests/golden/README); any change to either shows here. No root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from portrace.events import from_json, to_json

GOLDEN = Path(__file__).resolve().parent / "golden"
CASES = list(zip((GOLDEN / "events.jsonl").read_text().splitlines(),
                 (GOLDEN / "read.txt").read_text().splitlines(),
                 (GOLDEN / "written.jsonl").read_text().splitlines()))


def test_the_golden_files_line_up():
    assert len(CASES) == 26


@pytest.mark.parametrize("given, typed, written", CASES,
                         ids=[f"{i}-{json.loads(c[0])['type']}" for i, c in enumerate(CASES)])
def test_read_and_written_as_before(given, typed, written):
    ev = from_json(json.loads(given))
    assert repr(ev) == typed
    assert json.dumps(to_json(ev)) == written
