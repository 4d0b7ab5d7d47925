"""Judging one observation, and the event it makes: pure functions of a
portrace.observe.observation.Observation, shared by the traced failure
(``failure_event``) and ``portrace check`` (``check_event``).

The blockers are the kernel's conflict rules applied to the port's sockets
(portrace.judge.diagnose.RULES); the verdict and its advice are
portrace.judge.advice's, one function per cause.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from errno import EACCES, EADDRINUSE, EADDRNOTAVAIL, EINVAL, EPERM
from typing import Any

from portrace.events import Blocker, CallError, Check, StateChange, Verdict
from portrace.judge import advice, diagnose, refusals
from portrace.observe.context import MAX_PROCESSES_LISTED
from portrace.observe.observation import Observation


@dataclass(frozen=True)
class Judgement:
    """``blockers``: those listed (at most MAX_BLOCKERS_LISTED, each with at
    most MAX_PROCESSES_LISTED holders and their facts); ``total`` and
    ``by_state``: all of them when more than listed (else None);
    ``last_seen``: with no blocker, the port's last transition seen."""

    blockers: tuple[Blocker, ...]
    total: int | None
    by_state: dict[str, int] | None
    verdict: Verdict
    last_seen: StateChange | None


def judge(obs: Observation) -> Judgement:
    """What blocks the observed call, and what to do about it."""
    found, attempt = obs.found, obs.attempt
    sysctls = found.snapshot.sysctls
    v6default = sysctls.get("net.ipv6.bindv6only")
    req = diagnose.Request.of(attempt, None if v6default is None else v6default == "1")
    blockers: list[Blocker] = []
    if attempt.call != "connect" and attempt.port != 0:  # else: the range, obs.usage
        snap = found.snapshot
        blockers = diagnose.find_blockers(
            req, snap.sockets, snap.holders, found.closers, obs.binders, found.fd_opts,
            exclude_inodes=[found.own_inode] if found.own_inode else [],
            owners=found.binder_pids, holders_complete=snap.holders_complete,
            belongs=obs.belongs)
    last_seen = None
    if not blockers and obs.usage is None:
        on_port = [ev for ev in found.recent if ev.ts <= attempt.ts] or list(found.recent)
        last_seen = on_port[-1] if on_port else None
    verdict = _refused(obs) or advice.verdict(
        req, attempt, blockers, sysctls, last_seen, found.netns.source, obs.usage,
        advice.Destroying(obs.can_destroy, obs.run_in))
    listed, total, by_state = diagnose.summarised(blockers)
    return Judgement(_with_facts(listed, obs.holder_facts), total, by_state, verdict, last_seen)


def _refused(obs: Observation) -> Verdict | None:
    """The verdict of a bind() refused before any socket was compared, where
    the observed facts decide it."""
    a, r = obs.attempt, obs.refusal
    if a.call != "bind":
        return None
    if r.address is not None and a.errno == EADDRNOTAVAIL:
        return refusals.address(a, r.address, obs.run_in)
    if a.errno == EACCES:
        by_port = refusals.port(a, r.port_rule, obs.process, obs.run_in) \
            if r.port_rule is not None else None
        if by_port is not None or r.policy is None:
            return by_port
        if r.port_rule is not None and r.port_rule.allows(a.port):
            return refusals.policy(a, r.policy, obs.process)
        return None
    if a.errno == EPERM and r.policy is not None:
        return refusals.policy(a, r.policy, obs.process)
    if a.errno == EINVAL:
        return refusals.invalid(a, r.already_bound)
    return None


def _with_facts(blockers: list[Blocker], facts: Mapping[int, dict[str, Any] | None]
                ) -> tuple[Blocker, ...]:
    """Each blocker with its first MAX_PROCESSES_LISTED holders, each with
    the process facts observed (processes_total: all of them, when more)."""
    return tuple(
        dataclasses.replace(
            b, processes=tuple(dataclasses.replace(p, facts=facts.get(p.pid))
                               for p in b.processes[:MAX_PROCESSES_LISTED]),
            processes_total=len(b.processes) if len(b.processes) > MAX_PROCESSES_LISTED
            else None)
        for b in blockers)


def failure_event(obs: Observation, j: Judgement, host: dict[str, str],
                  verdict_ms: float | None = None) -> CallError:
    """The ``*_error`` event of a traced failure."""
    found = obs.found
    return CallError(attempt=found.attempt, cmdline=(obs.process or {}).get("cmdline"),
                     netns=found.netns, blockers=j.blockers, verdict=j.verdict,
                     blockers_total=j.total, blockers_by_state=j.by_state,
                     lookup_ms=found.lookup_ms, snapshot_ms=found.snapshot_ms,
                     snapshot_source=found.snapshot.source,
                     last_seen=j.last_seen, usage=obs.usage, sysctls=found.snapshot.sysctls,
                     process=obs.process, host=host, recent=found.recent,
                     verdict_ms=verdict_ms, address=obs.refusal.address,
                     port_rule=obs.refusal.port_rule, already_bound=obs.refusal.already_bound,
                     policy=obs.refusal.policy, exited_owner=obs.exited_owner)


def check_event(obs: Observation, j: Judgement, ts: datetime, engine: str,
                uid: int | None) -> Check:
    """``portrace check``'s answer for the described socket (``obs.attempt``;
    ``uid``: its owner as given): no verdict when nothing blocks it, neither
    a socket on the port nor a refusal (its address, the port rule)."""
    a = obs.attempt
    refused = a.errno != EADDRINUSE
    return Check(ts=ts, protocol=a.protocol, family=a.family, addr=a.addr, port=a.port,
                 opts=a.opts, uid=uid, netns=obs.found.netns, engine=engine,
                 blockers=() if refused else j.blockers,
                 verdict=j.verdict if j.blockers or refused else None,
                 sysctls=dict(obs.snapshot.sysctls), can_destroy=obs.can_destroy,
                 blockers_total=None if refused else j.total,
                 blockers_by_state=None if refused else j.by_state,
                 address=obs.refusal.address, port_rule=obs.refusal.port_rule,
                 policy=obs.refusal.policy, snapshot_source=obs.snapshot.source)
