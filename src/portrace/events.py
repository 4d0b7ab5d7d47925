"""Typed events, and their JSON Lines form (the contract in shared/DESIGN.md).

Kernel records (see ``bpf/portrace.h``) become ``BindAttempt`` and ``StateChange``;
the pipeline adds ``Ready``, ``Lost`` and the diagnosed ``BindError``. Every
object serialised by :func:`to_json` has ``type`` and ``ts`` (ISO 8601 UTC, µs).
"""

from __future__ import annotations

import errno as errno_mod
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Union

FAMILIES = {socket.AF_INET: "inet", socket.AF_INET6: "inet6"}
PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", 0: "unknown"}

# include/net/tcp_states.h. 13 is TCP_BOUND_INACTIVE (6.5+), which sock_diag
# accepts in a request's state mask but reports bound-only sockets as CLOSE.
TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
    13: "BOUND_INACTIVE",
}


def tcp_state_name(num: int) -> str:
    return TCP_STATES.get(num, f"STATE_{num}")


def errno_name(num: int) -> str:
    return errno_mod.errorcode.get(num, str(num))


def iso(ts: datetime) -> str:
    """ISO 8601 in UTC with microseconds, e.g. ``2026-11-24T09:12:03.123456Z``."""
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


@dataclass(frozen=True)
class Endpoint:
    addr: str
    port: int

    def __str__(self) -> str:
        return format_endpoint(self.addr, self.port)


@dataclass(frozen=True)
class Task:
    """A process seen by the probes: pid is the tgid, ts when it was seen."""

    pid: int
    tid: int
    comm: str
    ts: datetime


@dataclass(frozen=True)
class Ready:
    ts: datetime
    engine: str
    ports: list[int]  # empty: every port
    kernel: str
    type: str = field(default="ready", init=False)


@dataclass(frozen=True)
class Lost:
    """Records the ring buffer had no room for since the previous ``Lost``."""

    ts: datetime
    count: int
    type: str = field(default="lost", init=False)


@dataclass(frozen=True)
class StateChange:
    """One ``sock:inet_sock_set_state`` hit on a watched local port.

    ``owner`` is the process last seen acting on the socket from a syscall
    (listen, connect, close, shutdown), not the task on the CPU: most
    transitions run in softirq on whatever task was interrupted.
    """

    ts: datetime
    skaddr: int
    protocol: str
    family: str
    local: Endpoint
    remote: Endpoint
    old: str
    new: str
    owner: Task | None
    type: str = field(default="state", init=False)


@dataclass(frozen=True)
class BindAttempt:
    """A ``bind()`` on a watched port, read at ``sys_enter_bind`` / ``sys_exit_bind``.

    ``errno`` is 0 on success. ``protocol`` is what ``socket()`` asked for,
    ``unknown`` when the socket predates the probes.
    """

    ts: datetime
    pid: int
    tid: int
    comm: str
    uid: int
    fd: int
    errno: int
    protocol: str
    family: str
    addr: str
    port: int
    cgroup_id: int

    @property
    def ok(self) -> bool:
        return self.errno == 0

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.addr, self.port)


@dataclass(frozen=True)
class ProcessRef:
    """A process holding a socket's inode through one or more fds.

    ``inherited`` is True when the holder did not bind the socket itself (the
    probes saw another process bind it, or it shares it with its parent),
    None when nothing tells.
    """

    pid: int
    comm: str
    fds: tuple[int, ...] = ()
    inherited: bool | None = None


@dataclass(frozen=True)
class Closer:
    """Who closed a socket that is now a minisock: the process seen at
    ESTABLISHED -> FIN_WAIT1 (or CLOSE_WAIT -> LAST_ACK), and when."""

    pid: int
    comm: str
    ts: datetime


@dataclass(frozen=True)
class Blocker:
    state: str
    protocol: str
    family: str
    local: Endpoint
    remote: Endpoint | None
    processes: tuple[ProcessRef, ...]
    inode: int
    uid: int
    expires_s: float | None  # minisocks only: seconds left at lookup
    closed_by: Closer | None
    minisock: bool
    v6only: bool | None
    bound_dev_if: int


@dataclass(frozen=True)
class Verdict:
    cause: str  # see diagnose.CAUSES
    summary: str
    advice: tuple[str, ...]


@dataclass(frozen=True)
class Netns:
    """The network namespace the blockers were looked up in.

    ``source``: ``process`` when read from the failing thread's
    ``/proc/<pid>/task/<tid>/ns/net``; ``tracer`` when that process had already
    exited and portrace's own namespace was used instead.
    """

    inode: int
    source: str


@dataclass(frozen=True)
class BindError:
    """A failed bind() with what blocked it, as printed and recorded."""

    attempt: BindAttempt
    cmdline: list[str] | None
    netns: Netns
    blockers: tuple[Blocker, ...]
    verdict: Verdict
    lookup_ms: float  # from the failure in the kernel to the sock_diag snapshot
    last_seen: StateChange | None = None  # when no blocker was left to find
    type: str = field(default="bind_error", init=False)

    @property
    def ts(self) -> datetime:
        return self.attempt.ts


Event = Union[Ready, Lost, StateChange, BindAttempt, BindError]


def _endpoint(ep: Endpoint | None) -> dict[str, Any] | None:
    return None if ep is None else {"addr": ep.addr, "port": ep.port}


def _task(task: Task | None) -> dict[str, Any] | None:
    if task is None:
        return None
    return {"pid": task.pid, "tid": task.tid, "comm": task.comm, "ts": iso(task.ts)}


def _blocker(b: Blocker) -> dict[str, Any]:
    return {
        "state": b.state,
        "protocol": b.protocol,
        "family": b.family,
        "local": _endpoint(b.local),
        "remote": _endpoint(b.remote),
        "processes": [
            {"pid": p.pid, "comm": p.comm, "fds": list(p.fds), "inherited": p.inherited}
            for p in b.processes
        ],
        "inode": b.inode,
        "uid": b.uid,
        "expires_s": b.expires_s,
        "closed_by": None
        if b.closed_by is None
        else {"pid": b.closed_by.pid, "comm": b.closed_by.comm, "ts": iso(b.closed_by.ts)},
        "minisock": b.minisock,
        "v6only": b.v6only,
        "bound_dev_if": b.bound_dev_if,
    }


def _state(ev: StateChange) -> dict[str, Any]:
    return {
        "type": "state",
        "ts": iso(ev.ts),
        "skaddr": f"{ev.skaddr:#x}",
        "protocol": ev.protocol,
        "family": ev.family,
        "local": _endpoint(ev.local),
        "remote": _endpoint(ev.remote),
        "old": ev.old,
        "new": ev.new,
        "pid": ev.owner.pid if ev.owner else None,
        "comm": ev.owner.comm if ev.owner else None,
    }


def to_json(ev: Event) -> dict[str, Any]:
    """The JSON object for one event, per shared/DESIGN.md's contract."""
    if isinstance(ev, Ready):
        return {"type": "ready", "ts": iso(ev.ts), "engine": ev.engine, "ports": list(ev.ports),
                "kernel": ev.kernel}
    if isinstance(ev, Lost):
        return {"type": "lost", "ts": iso(ev.ts), "count": ev.count}
    if isinstance(ev, StateChange):
        return _state(ev)
    if isinstance(ev, BindAttempt):
        return {
            # Failed attempts are only ever emitted diagnosed, as BindError.
            "type": "bind",
            "ts": iso(ev.ts),
            "pid": ev.pid,
            "tid": ev.tid,
            "comm": ev.comm,
            "uid": ev.uid,
            "fd": ev.fd,
            "errno": errno_name(ev.errno) if ev.errno else None,
            "protocol": ev.protocol,
            "family": ev.family,
            "addr": ev.addr,
            "port": ev.port,
        }
    if isinstance(ev, BindError):
        a = ev.attempt
        return {
            "type": "bind_error",
            "ts": iso(a.ts),
            "pid": a.pid,
            "tid": a.tid,
            "comm": a.comm,
            "cmdline": ev.cmdline,
            "uid": a.uid,
            "fd": a.fd,
            "errno": errno_name(a.errno),
            "protocol": a.protocol,
            "family": a.family,
            "addr": a.addr,
            "port": a.port,
            "netns": {"inode": ev.netns.inode, "source": ev.netns.source},
            "blockers": [_blocker(b) for b in ev.blockers],
            "verdict": {"cause": ev.verdict.cause, "summary": ev.verdict.summary,
                        "advice": list(ev.verdict.advice)},
            "lookup_ms": round(ev.lookup_ms, 3),
            "last_seen": None if ev.last_seen is None else _state(ev.last_seen),
        }
    raise TypeError(f"not an event: {ev!r}")
