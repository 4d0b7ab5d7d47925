"""JSON Lines evidence: one object per event (shared/DESIGN.md's contract),
flushed per event so a finished event survives the writer's death."""

from __future__ import annotations

import json
from typing import IO

from portrace.events import Event, to_json


def dumps(ev: Event) -> str:
    return json.dumps(to_json(ev), separators=(",", ":"))


class JsonLinesSink:
    """Writes every event it is given to ``stream``, one line each."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, ev: Event) -> None:
        self.stream.write(dumps(ev) + "\n")
        self.stream.flush()
