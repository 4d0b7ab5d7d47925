"""Typed events, and their JSON Lines form (docs/events.md; the schema in schema/).

Kernel records (see ``bpf/portrace.h``) become ``SocketCall`` and ``StateChange``;
the pipeline adds ``Ready``, ``Lost`` and the diagnosed ``CallError``. Every
object serialised by :func:`to_json` has ``type`` and ``ts`` (ISO 8601 UTC, µs).
"""

from __future__ import annotations

import errno as errno_mod
import json
import re
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from typing import Any, Union

# The contract's version, on every ``ready``; it changes only if a field is ever
# renamed or dropped (fields are only added). docs/events.md; the schema:
SCHEMA_VERSION = 1
SCHEMA = "schema/events.schema.json"  # package data, read by schema()
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


def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of every event, shipped with the package."""
    return json.loads((resources.files("portrace") / SCHEMA).read_text())


def tcp_state_name(num: int) -> str:
    return TCP_STATES.get(num, f"STATE_{num}")


def errno_name(num: int) -> str:
    return errno_mod.errorcode.get(num, str(num))


def iso(ts: datetime) -> str:
    """ISO 8601 in UTC with microseconds, e.g. ``2026-11-24T09:12:03.123456Z``."""
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# C0 and C1 controls, DEL, and the Unicode marks that reorder or break lines.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e"
                          "\u2066-\u2069]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """``text`` safe to print: a process names itself (comm, argv[0]), so a
    name may carry escape sequences or newlines that would forge output.
    Control characters become ``\\x1b``, newlines ``\\n``."""
    return _UNPRINTABLE.sub(
        lambda m: _ESCAPES.get(m.group(), f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                               else f"\\u{ord(m.group()):04x}"), text)


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
    engine: str  # core | bcc
    engine_reason: str  # why this engine runs (auto's choice, or --engine)
    ports: list[int]  # empty: every port
    kernel: str
    host: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] | None = None  # what the recorder was started with
    type: str = field(default="ready", init=False)


@dataclass(frozen=True)
class Lost:
    """Records lost since the previous ``Lost`` of the same ``source``:
    ``kernel`` (a ring buffer had no room; counted by the probes), ``limit``
    (a watched port's failures beyond its rate, engine.RATE_MAX per
    RATE_WINDOW_MS, counted in the kernel and not sent, so one port's flood
    leaves room for the others') or ``queue`` (portrace's own bounded backlog
    behind the diagnosis was full)."""

    ts: datetime
    count: int
    source: str = "kernel"
    type: str = field(default="lost", init=False)


@dataclass(frozen=True)
class ErrorRecord:
    """An exception portrace survived: in a sink (``where`` ``output``: a
    full disk, a closed pipe on another output) or while diagnosing one
    failure (``diagnosis``). ``count``: how many of this kind so far; the
    failure it was about, if any, is in ``failure`` (call, pid, comm, addr,
    port, errno), so nothing is lost silently."""

    ts: datetime
    where: str
    message: str
    count: int
    failure: dict[str, Any] | None = None
    type: str = field(default="error", init=False)


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
class SockOpts:
    """Socket options as the probes saw them (socket() defaults, setsockopt()).

    Each is True/False when seen, None when unknown (the socket predates the
    probes, or for v6only: never set, so net.ipv6.bindv6only decides).
    """

    reuseaddr: bool | None = None
    reuseport: bool | None = None
    v6only: bool | None = None
    bound_to_device: bool | None = None

    def to_json(self) -> dict[str, bool | None]:
        return {"so_reuseaddr": self.reuseaddr, "so_reuseport": self.reuseport,
                "ipv6_v6only": self.v6only, "so_bindtodevice": self.bound_to_device}


UNKNOWN_OPTS = SockOpts()
# Where options come from, in the JSON: "kernel" (read from the socket),
# "probes" (seen being set; for a blocker also "closer", the close that made
# the minisock, or "binder", the bind seen for its address), else this.
UNKNOWN_SOURCE = "unknown"


@dataclass(frozen=True)
class SocketCall:
    """A ``bind()``, ``listen()`` or ``connect()`` the probes reported.

    ``addr``/``port``: for bind the address asked for; for listen the address
    the socket was seen bound to (port 0: not seen bound, listen() autobinds);
    for connect the destination. ``errno`` is 0 on success. ``protocol`` is
    what ``socket()`` asked for, ``unknown`` when the socket predates the probes.
    ``local_port``: for connect, the port the socket was bound to (0: none).
    """

    ts: datetime
    call: str  # bind | listen | connect
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
    opts: SockOpts = UNKNOWN_OPTS
    local_port: int = 0
    # Where opts come from: "kernel" (read from the socket), "probes" (seen
    # being set), None (not known).
    opts_source: str | None = None
    # Read from the kernel by the CO-RE engine; None where the engine cannot.
    netns: int | None = None  # inode of the calling thread's network namespace
    sk_uid: int | None = None  # the socket's owner uid (sk_uid), which SO_REUSEPORT compares
    port_range: tuple[int, int] | None = None  # the socket's own IP_LOCAL_PORT_RANGE
    inode: int | None = None  # the socket's inode
    skaddr: int = 0  # the struct sock, 0 when not read

    @property
    def ok(self) -> bool:
        return self.errno == 0


@dataclass(frozen=True)
class Pod:
    """A Kubernetes pod: namespace and name from the runtime's labels when its
    API answers, uid from the cgroup; ``container``: the container's name in it."""

    namespace: str | None = None
    name: str | None = None
    uid: str | None = None
    container: str | None = None


@dataclass(frozen=True)
class Owner:
    """Who a process belongs to (portrace.observe.owners): its systemd ``unit``
    (``user_unit``: in a user's manager), its container (id and runtime from
    the cgroup, ``container`` its name from the runtime's API), its pod; and
    for the special holders, what they stand for: ``activates`` (systemd's
    ``.socket`` unit, or the command systemd-socket-activate starts) and
    ``forwards_to`` (docker-proxy's container end, with its container)."""

    unit: str | None = None
    user_unit: bool = False
    container_id: str | None = None
    runtime: str | None = None
    container: str | None = None
    pod: Pod | None = None
    activates: str | None = None
    forwards_to: Endpoint | None = None
    forwards_to_container: str | None = None

    def label(self) -> str:
        """``checkout.service``, ``container web-1, pod shop/checkout-7d9``..."""
        parts = []
        if self.forwards_to is not None:
            into = f" in container {self.forwards_to_container}" \
                if self.forwards_to_container else ""
            parts.append(f"docker-proxy to {self.forwards_to}{into}")
        if self.activates is not None:
            parts.append(f"socket activation: {self.activates}")
        if self.container_id is not None:
            parts.append(f"container {self.container or self.container_id[:12]}")
        if self.pod is not None:
            parts.append(f"pod {self.pod.namespace}/{self.pod.name}" if self.pod.name
                         else f"pod uid {self.pod.uid}")
        if self.unit is not None:
            parts.append(f"user unit {self.unit}" if self.user_unit else self.unit)
        return ", ".join(parts)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Owner:
        """The inverse of to_json."""
        c, pod, fwd = d.get("container") or {}, d.get("pod"), d.get("forwards_to")
        return cls(unit=d.get("unit"), user_unit=bool(d.get("user_unit")),
                   container_id=c.get("id"), runtime=c.get("runtime"), container=c.get("name"),
                   pod=None if pod is None else Pod(pod.get("namespace"), pod.get("name"),
                                                    pod.get("uid"), pod.get("container")),
                   activates=d.get("activates"),
                   forwards_to=None if fwd is None else Endpoint(fwd["addr"], fwd["port"]),
                   forwards_to_container=None if fwd is None else fwd.get("container"))

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit, "user_unit": self.user_unit,
            "container": None if self.container_id is None else {
                "id": self.container_id, "runtime": self.runtime, "name": self.container},
            "pod": None if self.pod is None else {
                "namespace": self.pod.namespace, "name": self.pod.name, "uid": self.pod.uid,
                "container": self.pod.container},
            "activates": self.activates,
            "forwards_to": None if self.forwards_to is None else {
                **_endpoint_json(self.forwards_to), "container": self.forwards_to_container},
        }


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
    facts: dict[str, Any] | None = None  # portrace.observe.context.process_facts at lookup
    owner: Owner | None = None  # its unit, container, pod (portrace.observe.owners)


@dataclass(frozen=True)
class Closer:
    """Who closed a socket that is now a minisock: the process seen at
    ESTABLISHED -> FIN_WAIT1 (or CLOSE_WAIT -> LAST_ACK), when, and the
    socket's options at that close (the minisock keeps them)."""

    pid: int
    comm: str
    ts: datetime
    opts: SockOpts = UNKNOWN_OPTS


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
    opts: SockOpts = UNKNOWN_OPTS
    # Where opts come from: "probes" (this socket's fd), "binder" (the process
    # seen binding this address), "closer" (the close that made the minisock).
    opts_source: str | None = None
    conflict: bool | None = None  # the kernel's rule, given what is known
    processes_total: int | None = None  # more holders than listed: how many in all
    holders_known: bool = True  # False: some processes' fds were unreadable (not root)


@dataclass(frozen=True)
class PortUsage:
    """The ephemeral port range the kernel searched (low-high: the namespace's,
    narrowed by the socket's own IP_LOCAL_PORT_RANGE) and how much is taken."""

    low: int
    high: int
    reserved: int  # ports of the range in ip_local_reserved_ports
    in_use: int  # distinct local ports of the range held by some socket
    by_state: dict[str, int]  # sockets on those ports, by state
    time_wait_to_destination: int | None = None  # connect(): TIME_WAIT toward it
    fin_wait2_to_destination: int | None = None  # connect(): FIN_WAIT2 minisocks toward it
    netns_range: tuple[int, int] | None = None  # ip_local_port_range of the namespace
    socket_range: tuple[int, int] | None = None  # the socket's IP_LOCAL_PORT_RANGE, if set


@dataclass(frozen=True)
class Verdict:
    cause: str  # see diagnose.CAUSES
    summary: str
    advice: tuple[str, ...]


@dataclass(frozen=True)
class Netns:
    """The network namespace the blockers were looked up in.

    ``source``: ``process`` when entered through the failing thread's
    ``/proc/<pid>/task/<tid>/ns/net``. When that thread had already exited:
    ``pinned`` (through its name under /run/netns) or ``member`` (through
    another process in it), for the inode the kernel reported (CO-RE engine);
    ``gone`` when nothing held that namespace any more (nothing looked up);
    ``tracer`` when the engine could not tell the namespace (bcc) and
    portrace's own was used instead. ``name``: its name under /run/netns
    (``ip netns``), if it has one.
    """

    inode: int
    source: str
    name: str | None = None

    @property
    def searchable(self) -> bool:
        """Whether this is the failing socket's namespace, entered: only then
        may a blocker be named from it."""
        return self.source not in ("gone", "tracer")


@dataclass(frozen=True)
class CallError:
    """A failed bind()/listen()/connect() with what blocked it, as printed."""

    attempt: SocketCall
    cmdline: list[str] | None
    netns: Netns
    blockers: tuple[Blocker, ...]
    verdict: Verdict
    lookup_ms: float  # from the failure in the kernel to the sock_diag snapshot
    last_seen: StateChange | None = None  # when no blocker was left to find
    usage: PortUsage | None = None  # ephemeral exhaustion: the range and its use
    sysctls: dict[str, str] = field(default_factory=dict)  # as the netns sees them
    process: dict[str, Any] | None = None  # context.process_facts of the failing process
    host: dict[str, str] = field(default_factory=dict)
    recent: tuple[StateChange, ...] = ()  # transitions on the port shortly before
    verdict_ms: float | None = None  # from the failure in the kernel to the event's emission
    # More blockers than are listed (a busy port): how many in all, by state.
    blockers_total: int | None = None
    blockers_by_state: dict[str, int] | None = None

    @property
    def type(self) -> str:
        return f"{self.attempt.call}_error"

    @property
    def ts(self) -> datetime:
        return self.attempt.ts


@dataclass(frozen=True)
class Check:
    """``portrace check``: would a bind() of this socket succeed now, and if
    not, what blocks it. The socket is described, not created: ``opts`` and
    ``uid`` (its owner for SO_REUSEPORT; None: not given) are the caller's.
    ``engine``: ``core`` (BPF iterators: every socket's own options) or
    ``sock_diag`` (options of live sockets not known). ``can_destroy``: the
    kernel destroys sockets on request (``ss -K``). ``waited_s``/``waited_for``
    (``--wait``): how long, and the blockers first seen."""

    ts: datetime
    protocol: str
    family: str
    addr: str
    port: int
    opts: SockOpts
    uid: int | None
    netns: Netns
    engine: str
    blockers: tuple[Blocker, ...]
    verdict: Verdict | None  # None: free
    sysctls: dict[str, str] = field(default_factory=dict)
    can_destroy: bool | None = None
    blockers_total: int | None = None
    blockers_by_state: dict[str, int] | None = None
    waited_s: float | None = None
    waited_for: tuple[str, ...] = ()
    type: str = field(default="check", init=False)

    @property
    def free(self) -> bool:
        return not self.blockers


@dataclass(frozen=True)
class Repeats:
    """Failures identical to a reported one (same process, call, address,
    errno) that came within the tracer's coalescing window: counted, not
    diagnosed again. ``ts``: the last of them; ``since``: the report they repeat."""

    ts: datetime
    since: datetime
    call: str
    pid: int
    comm: str
    family: str
    addr: str
    port: int
    errno: int
    count: int
    type: str = field(default="repeats", init=False)


def failure_summary(a: SocketCall) -> dict[str, Any]:
    """The fields that identify a failure, for an ``error`` event about it."""
    return {"call": a.call, "pid": a.pid, "comm": a.comm, "addr": a.addr, "port": a.port,
            "errno": errno_name(a.errno)}


Event = Union[Ready, Lost, ErrorRecord, StateChange, SocketCall, CallError, Repeats, Check]


def _endpoint_json(ep: Endpoint) -> dict[str, Any]:
    return {"addr": ep.addr, "port": ep.port}


def _endpoint(ep: Endpoint | None) -> dict[str, Any] | None:
    return None if ep is None else _endpoint_json(ep)


def _task(task: Task | None) -> dict[str, Any] | None:
    if task is None:
        return None
    return {"pid": task.pid, "tid": task.tid, "comm": task.comm, "ts": iso(task.ts)}


def blocker_json(b: Blocker) -> dict[str, Any]:
    return {
        "state": b.state,
        "protocol": b.protocol,
        "family": b.family,
        "local": _endpoint(b.local),
        "remote": _endpoint(b.remote),
        "processes": [
            {**(p.facts or {}), "pid": p.pid, "comm": p.comm, "fds": list(p.fds),
             "inherited": p.inherited, "owner": p.owner.to_json() if p.owner else None}
            for p in b.processes
        ],
        "processes_total": b.processes_total or len(b.processes),
        "holders_known": b.holders_known,
        "inode": b.inode,
        "uid": b.uid,
        "expires_s": b.expires_s,
        "closed_by": None
        if b.closed_by is None
        else {"pid": b.closed_by.pid, "comm": b.closed_by.comm, "ts": iso(b.closed_by.ts)},
        "minisock": b.minisock,
        "v6only": b.v6only,
        "bound_dev_if": b.bound_dev_if,
        "options": {**b.opts.to_json(), "source": b.opts_source or UNKNOWN_SOURCE},
        "conflicts": b.conflict,
    }


def _netns(ns: Netns) -> dict[str, Any]:
    return {"inode": ns.inode, "source": ns.source, "name": ns.name}


def _verdict(v: Verdict | None) -> dict[str, Any] | None:
    return None if v is None else {"cause": v.cause, "summary": v.summary,
                                   "advice": list(v.advice)}


def _usage(u: PortUsage | None) -> dict[str, Any] | None:
    if u is None:
        return None
    return {"range": [u.low, u.high], "reserved": u.reserved, "in_use": u.in_use,
            "by_state": dict(u.by_state), "time_wait_to_destination": u.time_wait_to_destination,
            "fin_wait2_to_destination": u.fin_wait2_to_destination,
            "netns_range": list(u.netns_range) if u.netns_range else None,
            "socket_range": list(u.socket_range) if u.socket_range else None}


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
    """The JSON object for one event (docs/events.md)."""
    if isinstance(ev, Ready):
        out: dict[str, Any] = {"type": "ready", "ts": iso(ev.ts),
                               "schema_version": SCHEMA_VERSION, "engine": ev.engine,
                               "engine_reason": ev.engine_reason,
                               "ports": list(ev.ports), "kernel": ev.kernel, "host": ev.host}
        if ev.options is not None:
            out["options"] = ev.options
        return out
    if isinstance(ev, Lost):
        return {"type": "lost", "ts": iso(ev.ts), "count": ev.count, "source": ev.source}
    if isinstance(ev, ErrorRecord):
        return {"type": "error", "ts": iso(ev.ts), "where": ev.where, "message": ev.message,
                "count": ev.count, "failure": ev.failure}
    if isinstance(ev, Repeats):
        return {"type": "repeats", "ts": iso(ev.ts), "since": iso(ev.since), "call": ev.call,
                "pid": ev.pid, "comm": ev.comm, "family": ev.family, "addr": ev.addr,
                "port": ev.port, "errno": errno_name(ev.errno), "count": ev.count}
    if isinstance(ev, StateChange):
        return _state(ev)
    if isinstance(ev, SocketCall):
        # Failed calls are only ever emitted diagnosed, as CallError.
        return {
            "type": ev.call,
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
            "options": {**ev.opts.to_json(), "source": ev.opts_source or UNKNOWN_SOURCE},
        }
    if isinstance(ev, Check):
        return {
            "type": "check",
            "ts": iso(ev.ts),
            "free": ev.free,
            "protocol": ev.protocol,
            "family": ev.family,
            "addr": ev.addr,
            "port": ev.port,
            "options": {**ev.opts.to_json(), "source": "given"},
            "uid": ev.uid,
            "netns": _netns(ev.netns),
            "engine": ev.engine,
            "blockers": [blocker_json(b) for b in ev.blockers],
            "blockers_total": ev.blockers_total or len(ev.blockers),
            "blockers_by_state": ev.blockers_by_state,
            "verdict": _verdict(ev.verdict),
            "can_destroy": ev.can_destroy,
            "sysctls": dict(ev.sysctls),
            "waited_s": None if ev.waited_s is None else round(ev.waited_s, 3),
            "waited_for": list(ev.waited_for),
        }
    if isinstance(ev, CallError):
        a = ev.attempt
        out = {
            "type": ev.type,
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
            "options": {**a.opts.to_json(), "source": a.opts_source or UNKNOWN_SOURCE},
            "sk_uid": a.sk_uid,
            "port_range": list(a.port_range) if a.port_range else None,
            "netns": _netns(ev.netns),
            "blockers": [blocker_json(b) for b in ev.blockers],
            "blockers_total": ev.blockers_total or len(ev.blockers),
            "blockers_by_state": ev.blockers_by_state,
            "verdict": _verdict(ev.verdict),
            "lookup_ms": round(ev.lookup_ms, 3),
            "verdict_ms": None if ev.verdict_ms is None else round(ev.verdict_ms, 3),
            "last_seen": None if ev.last_seen is None else _state(ev.last_seen),
            "ephemeral": _usage(ev.usage),
            "sysctls": dict(ev.sysctls),
            "process": ev.process,
            "host": ev.host,
            "recent": [_state(s) for s in ev.recent],
        }
        if a.call == "connect":
            out["destination"] = {"addr": a.addr, "port": a.port}
            out["local_port"] = a.local_port or None
        return out
    raise TypeError(f"not an event: {ev!r}")


# -- reading events back (evidence, recorded observations) ----------------------
# The inverse of to_json: strict where a reader needs the field (a missing or
# mistyped one raises Malformed), lenient where a field was added later or is
# only context (absent: its "not known" value).

class Malformed(ValueError):
    """A JSON object that is not a well-formed portrace event; the message
    names the field (``blockers[0].local.port is missing``)."""


_ABSENT = object()


def _get(d: Any, key: str, kinds: tuple[type, ...], where: str = "",
         default: Any = _ABSENT) -> Any:
    if not isinstance(d, dict):
        raise Malformed(f"{where.rstrip('.') or 'event'} is not an object")
    value = d.get(key, _ABSENT)
    if value is _ABSENT or (value is None and type(None) not in kinds):
        if default is not _ABSENT:
            return default
        raise Malformed(f"{where}{key} is missing")
    if isinstance(value, bool) and bool not in kinds:
        raise Malformed(f"{where}{key} has the wrong type (bool)")
    if not isinstance(value, kinds):
        raise Malformed(f"{where}{key} has the wrong type ({type(value).__name__})")
    return value


_INT, _STR, _NUM = (int,), (str,), (int, float)
_OPT_INT, _OPT_STR, _OPT_BOOL = (int, type(None)), (str, type(None)), (bool, type(None))


def _ts(d: Any, key: str, where: str = "") -> datetime:
    text = _get(d, key, _STR, where)
    try:
        ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise Malformed(f"{where}{key} is not an ISO 8601 time") from None
    if ts.tzinfo is None:
        raise Malformed(f"{where}{key} is not an ISO 8601 time with a zone")
    return ts


def _endpoint_from(d: Any, where: str) -> Endpoint:
    return Endpoint(_get(d, "addr", _STR, where), _get(d, "port", _INT, where))


def _errno_from(name: str | None) -> int:
    if name is None:
        return 0
    num = getattr(errno_mod, name, None)
    return num if isinstance(num, int) else 0


def _opts_from(d: Any, where: str) -> tuple[SockOpts, str | None]:
    if not isinstance(d, dict):
        return UNKNOWN_OPTS, None
    opts = SockOpts(reuseaddr=_get(d, "so_reuseaddr", _OPT_BOOL, where, None),
                    reuseport=_get(d, "so_reuseport", _OPT_BOOL, where, None),
                    v6only=_get(d, "ipv6_v6only", _OPT_BOOL, where, None),
                    bound_to_device=_get(d, "so_bindtodevice", _OPT_BOOL, where, None))
    source = _get(d, "source", _OPT_STR, where, None)
    return opts, None if source == UNKNOWN_SOURCE else source


def _netns_from(d: Any) -> Netns:
    if not isinstance(d, dict):
        return Netns(inode=0, source="tracer")
    return Netns(inode=_get(d, "inode", _INT, "netns.", 0),
                 source=_get(d, "source", _STR, "netns.", "tracer"),
                 name=_get(d, "name", _OPT_STR, "netns.", None))


def _verdict_from(d: Any) -> Verdict:
    advice = _get(d, "advice", (list,), "verdict.")
    return Verdict(cause=_get(d, "cause", _STR, "verdict."),
                   summary=_get(d, "summary", _STR, "verdict."),
                   advice=tuple(str(a) for a in advice))


def _blocker_from(d: Any, where: str) -> Blocker:
    remote = _get(d, "remote", (dict, type(None)), where)
    closed = _get(d, "closed_by", (dict, type(None)), where)
    procs = []
    for j, p in enumerate(_get(d, "processes", (list,), where)):
        at = f"{where}processes[{j}]."
        owner = _get(p, "owner", (dict, type(None)), at, None)
        facts = {k: v for k, v in p.items()
                 if k not in ("pid", "comm", "fds", "inherited", "owner")}
        procs.append(ProcessRef(
            pid=_get(p, "pid", _INT, at), comm=_get(p, "comm", _STR, at),
            fds=tuple(_get(p, "fds", (list,), at, [])),
            inherited=_get(p, "inherited", _OPT_BOOL, at, None),
            facts=facts or None, owner=Owner.from_json(owner) if owner else None))
    opts, source = _opts_from(d.get("options"), f"{where}options.")
    expires = _get(d, "expires_s", (int, float, type(None)), where)
    return Blocker(
        state=_get(d, "state", _STR, where),
        protocol=_get(d, "protocol", _STR, where, "tcp"),
        family=_get(d, "family", _STR, where, "inet"),
        local=_endpoint_from(_get(d, "local", (dict,), where), f"{where}local."),
        remote=None if remote is None else _endpoint_from(remote, f"{where}remote."),
        processes=tuple(procs),
        inode=_get(d, "inode", _INT, where, 0),
        uid=_get(d, "uid", _INT, where, 0),
        expires_s=None if expires is None else float(expires),
        closed_by=None if closed is None else Closer(
            pid=_get(closed, "pid", _INT, f"{where}closed_by."),
            comm=_get(closed, "comm", _STR, f"{where}closed_by."),
            ts=_ts(closed, "ts", f"{where}closed_by.")),
        minisock=_get(d, "minisock", (bool,), where, False),
        v6only=_get(d, "v6only", _OPT_BOOL, where, None),
        bound_dev_if=_get(d, "bound_dev_if", _INT, where, 0),
        opts=opts, opts_source=source,
        conflict=_get(d, "conflicts", _OPT_BOOL, where, None),
        processes_total=_get(d, "processes_total", _OPT_INT, where, None),
        holders_known=_get(d, "holders_known", (bool,), where, True))


def _blockers_from(d: dict[str, Any]) -> tuple[Blocker, ...]:
    return tuple(_blocker_from(b, f"blockers[{i}].")
                 for i, b in enumerate(_get(d, "blockers", (list,))))


def _call_from(d: dict[str, Any], call: str) -> SocketCall:
    opts, source = _opts_from(d.get("options"), "options.")
    port_range = d.get("port_range")
    return SocketCall(
        ts=_ts(d, "ts"), call=call, pid=_get(d, "pid", _INT), tid=_get(d, "tid", _INT, "", 0),
        comm=_get(d, "comm", _STR), uid=_get(d, "uid", _INT, "", 0),
        fd=_get(d, "fd", _INT, "", -1), errno=_errno_from(_get(d, "errno", _OPT_STR, "", None)),
        protocol=_get(d, "protocol", _STR, "", "unknown"),
        family=_get(d, "family", _STR, "", "inet"), addr=_get(d, "addr", _STR),
        port=_get(d, "port", _INT), cgroup_id=0, opts=opts, opts_source=source,
        sk_uid=_get(d, "sk_uid", _OPT_INT, "", None),
        port_range=_pair(port_range),
        local_port=_get(d, "local_port", _OPT_INT, "", None) or 0)


def _state_from(d: dict[str, Any]) -> StateChange:
    pid = _get(d, "pid", _OPT_INT, "", None)
    ts = _ts(d, "ts")
    skaddr = _get(d, "skaddr", _STR, "", "0x0")
    return StateChange(
        ts=ts, skaddr=int(skaddr, 16) if re.fullmatch("0x[0-9a-f]+", skaddr) else 0,
        protocol=_get(d, "protocol", _STR, "", "tcp"), family=_get(d, "family", _STR, "", "inet"),
        local=_endpoint_from(_get(d, "local", (dict,)), "local."),
        remote=_endpoint_from(_get(d, "remote", (dict,)), "remote."),
        old=_get(d, "old", _STR), new=_get(d, "new", _STR),
        owner=None if pid is None else Task(pid=pid, tid=pid,
                                            comm=_get(d, "comm", _OPT_STR, "", None) or "?",
                                            ts=ts))


def _usage_from(d: Any) -> PortUsage | None:
    if not isinstance(d, dict):
        return None
    lo, hi = _get(d, "range", (list,), "ephemeral.")
    return PortUsage(low=lo, high=hi, reserved=_get(d, "reserved", _INT, "ephemeral.", 0),
                     in_use=_get(d, "in_use", _INT, "ephemeral.", 0),
                     by_state=dict(_get(d, "by_state", (dict,), "ephemeral.", {})),
                     time_wait_to_destination=d.get("time_wait_to_destination"),
                     fin_wait2_to_destination=d.get("fin_wait2_to_destination"),
                     netns_range=_pair(d.get("netns_range")),
                     socket_range=_pair(d.get("socket_range")))


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return value[0], value[1]
    return None


def _failure_from(d: dict[str, Any], call: str) -> CallError:
    last_seen = d.get("last_seen")
    return CallError(
        attempt=_call_from(d, call), cmdline=d.get("cmdline"), netns=_netns_from(d.get("netns")),
        blockers=_blockers_from(d), verdict=_verdict_from(_get(d, "verdict", (dict,))),
        lookup_ms=float(_get(d, "lookup_ms", _NUM, "", 0.0)),
        last_seen=_state_from(last_seen) if isinstance(last_seen, dict) else None,
        usage=_usage_from(d.get("ephemeral")),
        sysctls=dict(_get(d, "sysctls", (dict, type(None)), "", None) or {}),
        process=_get(d, "process", (dict, type(None)), "", None),
        host=dict(_get(d, "host", (dict, type(None)), "", None) or {}),
        recent=tuple(_state_from(s) for s in d.get("recent") or () if isinstance(s, dict)),
        verdict_ms=_get(d, "verdict_ms", (int, float, type(None)), "", None),
        blockers_total=_get(d, "blockers_total", _OPT_INT, "", None),
        blockers_by_state=_get(d, "blockers_by_state", (dict, type(None)), "", None))


def _ready_from(d: dict[str, Any]) -> Ready:
    return Ready(ts=_ts(d, "ts"), engine=_get(d, "engine", _STR, "", "bcc"),
                 engine_reason=_get(d, "engine_reason", _STR, "", ""),
                 ports=list(_get(d, "ports", (list,))), kernel=_get(d, "kernel", _STR),
                 host=dict(_get(d, "host", (dict, type(None)), "", None) or {}),
                 options=_get(d, "options", (dict, type(None)), "", None))


def _repeats_from(d: dict[str, Any]) -> Repeats:
    return Repeats(ts=_ts(d, "ts"), since=_ts(d, "since"), call=_get(d, "call", _STR),
                   pid=_get(d, "pid", _INT), comm=_get(d, "comm", _STR),
                   family=_get(d, "family", _STR, "", "inet"), addr=_get(d, "addr", _STR),
                   port=_get(d, "port", _INT),
                   errno=_errno_from(_get(d, "errno", _STR)), count=_get(d, "count", _INT))


def _check_from(d: dict[str, Any]) -> Check:
    opts, _source = _opts_from(d.get("options"), "options.")
    verdict = d.get("verdict")
    return Check(ts=_ts(d, "ts"), protocol=_get(d, "protocol", _STR),
                 family=_get(d, "family", _STR), addr=_get(d, "addr", _STR),
                 port=_get(d, "port", _INT), opts=opts, uid=_get(d, "uid", _OPT_INT, "", None),
                 netns=_netns_from(d.get("netns")), engine=_get(d, "engine", _STR),
                 blockers=_blockers_from(d),
                 verdict=_verdict_from(verdict) if isinstance(verdict, dict) else None,
                 sysctls=dict(d.get("sysctls") or {}),
                 can_destroy=_get(d, "can_destroy", _OPT_BOOL, "", None),
                 blockers_total=_get(d, "blockers_total", _OPT_INT, "", None),
                 blockers_by_state=d.get("blockers_by_state"),
                 waited_s=_get(d, "waited_s", (int, float, type(None)), "", None),
                 waited_for=tuple(d.get("waited_for") or ()))


_READERS: dict[str, Any] = {
    "ready": _ready_from,
    "lost": lambda d: Lost(ts=_ts(d, "ts"), count=_get(d, "count", _INT),
                           source=_get(d, "source", _STR, "", "kernel")),
    "error": lambda d: ErrorRecord(ts=_ts(d, "ts"), where=_get(d, "where", _STR),
                                   message=_get(d, "message", _STR),
                                   count=_get(d, "count", _INT, "", 1),
                                   failure=_get(d, "failure", (dict, type(None)), "", None)),
    "repeats": _repeats_from,
    "state": _state_from,
    "check": _check_from,
    **{call: (lambda d, call=call: _call_from(d, call)) for call in ("bind", "listen",
                                                                     "connect")},
    **{f"{call}_error": (lambda d, call=call: _failure_from(d, call))
       for call in ("bind", "listen", "connect")},
}
EVENT_TYPES = tuple(_READERS)


def from_json(d: Any) -> Event:
    """The typed event of one JSON object (to_json's inverse, for what the
    readers use). Raises Malformed, naming the first missing or mistyped field."""
    kind = d.get("type") if isinstance(d, dict) else None
    reader = _READERS.get(kind) if isinstance(kind, str) else None
    if reader is None:
        raise Malformed("not a portrace event")
    event: Event = reader(d)
    return event
