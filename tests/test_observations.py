"""The verdict logic replayed on observations recorded on a real kernel
(tests/observations/, re-recorded by `python tests/observation.py`): judging is
a pure function of what was observed, so these run without root. Each takes
the path every failure and check takes from its observation on
(portrace.judge.judgement: judge, then the event)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import contract
import pytest
from observation import HERE, snapshot_from, wanted_from

from portrace.events import Netns, to_json
from portrace.judge import judgement
from portrace.kernel.lookup import Lookup
from portrace.observe.observation import Observation

RECORDED = sorted(HERE.glob("*.json"))


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: p.stem)
def test_recorded_observation_judged_as_the_kernel_did(path: Path):
    rec = json.loads(path.read_text())
    wanted, ts = wanted_from(rec["wanted"]), datetime(2026, 11, 30, tzinfo=timezone.utc)
    # As recorded: no process facts or owners (their pids are gone), ss -K available.
    found = Lookup(attempt=wanted.attempt(ts), snapshot=snapshot_from(rec["snapshot"]),
                   netns=Netns(inode=1, source="pinned", name="recorded"), own_inode=None,
                   closers={}, fd_opts={}, binder_pids={}, recent=())
    obs = Observation(found=found, belongs={}, holder_facts={}, process=None, usage=None,
                      can_destroy=True, run_in="")
    answer = judgement.check_event(obs, judgement.judge(obs), ts, rec["engine"], wanted.uid)
    expect = rec["expect"]
    assert answer.free is expect["free"]
    assert (answer.verdict.cause if answer.verdict else None) == expect["cause"]
    contract.check(to_json(answer))


def test_every_recorded_observation_is_replayed():
    assert len(RECORDED) >= 5
