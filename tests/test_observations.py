"""The verdict logic replayed on observations recorded on a real kernel
(tests/observations/, re-recorded by `python tests/observation.py`): judging is
a pure function of what was observed, so these run without root."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import contract
import pytest
from observation import HERE, snapshot_from, wanted_from

from portrace.commands.check import judge
from portrace.events import Netns, to_json

RECORDED = sorted(HERE.glob("*.json"))


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: p.stem)
def test_recorded_observation_judged_as_the_kernel_did(path: Path):
    rec = json.loads(path.read_text())
    answer = judge(wanted_from(rec["wanted"]), snapshot_from(rec["snapshot"]),
                   Netns(inode=1, source="pinned", name="recorded"), rec["engine"], True, "",
                   datetime(2026, 11, 30, tzinfo=timezone.utc), {}, facts=tuple)
    expect = rec["expect"]
    assert answer.free is expect["free"]
    assert (answer.verdict.cause if answer.verdict else None) == expect["cause"]
    contract.check(to_json(answer))


def test_every_recorded_observation_is_replayed():
    assert len(RECORDED) >= 5
