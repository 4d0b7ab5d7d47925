"""The typed events, each field declared once: its Python type, and on it
(:func:`~portrace.events.wire.on_wire`) its JSON key, what a reader accepts and
takes when it is missing. JSON writing and reading follow from these
declarations (docs/events.md; the schema in schema/).

Kernel records (see ``bpf/portrace.h``) become ``SocketCall`` and ``StateChange``;
the pipeline adds ``Ready``, ``Lost`` and the diagnosed ``CallError``. Every
event's JSON has ``type`` and ``ts`` (ISO 8601 UTC, µs) first.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Union

from portrace.events.vocabulary import (
    SCHEMA_VERSION,
    errno_name,
    errno_number,
    format_endpoint,
    iso,
)
from portrace.events.wire import EVENT, FAILURE, OMIT, Malformed, get, on_wire, read, write

_NONE = type(None)
INT, STR, BOOL, NUM, LIST, DICT = (int,), (str,), (bool,), (int, float), (list,), (dict,)
OPT_INT, OPT_STR, OPT_BOOL = (int, _NONE), (str, _NONE), (bool, _NONE)
OPT_NUM, OPT_DICT = (int, float, _NONE), (dict, _NONE)
ANY = ()  # no type check: context a reader passes on as it is


def _time(text: str, where: str) -> datetime:
    try:
        ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise Malformed(f"{where} is not an ISO 8601 time") from None
    if ts.tzinfo is None:
        raise Malformed(f"{where} is not an ISO 8601 time with a zone")
    return ts


TIME: dict[str, Any] = {"kinds": STR, "encode": iso, "decode": _time}


def _one(cls: type[Any]) -> dict[str, Any]:
    """A nested object (null for None)."""
    return {"encode": lambda v: None if v is None else write(v),
            "decode": lambda v, where: None if v is None else read(cls, v, where + ".")}


def _many(cls: type[Any]) -> dict[str, Any]:
    """A list of nested objects, kept as a tuple."""
    return {"kinds": LIST, "encode": lambda vs: [write(v) for v in vs],
            "decode": lambda vs, where: tuple(read(cls, v, f"{where}[{i}].")
                                              for i, v in enumerate(vs))}


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return value[0], value[1]
    return None


# A (low, high) pair as [low, high]; anything else reads as not known.
PAIR: dict[str, Any] = {"kinds": ANY, "absent": None,
                        "encode": lambda v: list(v) if v else None,
                        "decode": lambda v, where: _pair(v)}
# An errno by name: null for 0 (a call that succeeded).
ERRNO: dict[str, Any] = {"encode": lambda n: errno_name(n) if n else None,
                         "decode": lambda name, where: errno_number(name)}
MS: dict[str, Any] = {"kinds": OPT_NUM, "absent": None,
                      "encode": lambda v: None if v is None else round(v, 3)}


def _mapping(key: str) -> Any:
    """A reader of an object-valued key that may be absent or null: a fresh dict."""
    return lambda d, where: dict(get(d, key, OPT_DICT, where, None) or {})


@dataclass(frozen=True)
class Endpoint:
    addr: str = on_wire(kinds=STR)
    port: int = on_wire(kinds=INT)

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
    ts: datetime = on_wire(**TIME)
    schema_version: int = on_wire(SCHEMA_VERSION, init=False)
    engine: str = on_wire(kinds=STR, absent="bcc")  # core | bcc
    engine_reason: str = on_wire(kinds=STR, absent="")  # auto's choice, or --engine
    ports: list[int] = on_wire(kinds=LIST, decode=lambda v, where: list(v))  # empty: every port
    kernel: str = on_wire(kinds=STR)
    host: dict[str, str] = on_wire(factory=dict, read=_mapping("host"))
    # How the calls are seen: fexit (only bind/listen/connect pay) or the syscall
    # tracepoints (every syscall takes the slow path while attached).
    probes: str = on_wire("tracepoints", kinds=STR, absent="tracepoints",
                         after="engine_reason")
    # The engine's optional parts this kernel did not take, and why: "fexit",
    # "walk" (the port's own bucket; then the iterators answer).
    left_out: dict[str, str] = on_wire(factory=dict, encode=dict, read=_mapping("left_out"),
                                       after="probes")
    # What the recorder was started with; only recorders write it.
    options: dict[str, Any] | None = on_wire(
        None, kinds=OPT_DICT, absent=None,
        write=lambda ev: OMIT if ev.options is None else ev.options)
    type: str = on_wire("ready", init=False)


@dataclass(frozen=True)
class Lost:
    """Records lost since the previous ``Lost`` of the same ``source``:
    ``kernel`` (a ring buffer had no room; counted by the probes), ``limit``
    (a watched port's failures beyond its rate, engine.RATE_MAX per
    RATE_WINDOW_MS, counted in the kernel and not sent, so one port's flood
    leaves room for the others') or ``queue`` (portrace's own bounded backlog
    behind the diagnosis was full)."""

    ts: datetime = on_wire(**TIME)
    count: int = on_wire(kinds=INT)
    source: str = on_wire("kernel", kinds=STR, absent="kernel")
    type: str = on_wire("lost", init=False)


@dataclass(frozen=True)
class ErrorRecord:
    """An exception portrace survived: in a sink (``where`` ``output``: a
    full disk, a closed pipe on another output) or while diagnosing one
    failure (``diagnosis``). ``count``: how many of this kind so far; the
    failure it was about, if any, is in ``failure`` (call, pid, comm, addr,
    port, errno), so nothing is lost silently."""

    ts: datetime = on_wire(**TIME)
    where: str = on_wire(kinds=STR)
    message: str = on_wire(kinds=STR)
    count: int = on_wire(kinds=INT, absent=1)
    failure: dict[str, Any] | None = on_wire(None, kinds=OPT_DICT, absent=None)
    type: str = on_wire("error", init=False)


def _skaddr(text: str, where: str) -> int:
    return int(text, 16) if re.fullmatch("0x[0-9a-f]+", text) else 0


def _owner_read(d: Mapping[str, Any], where: str) -> Task | None:
    pid = get(d, "pid", OPT_INT, where, None)
    if pid is None:
        return None
    return Task(pid=pid, tid=pid, comm=get(d, "comm", OPT_STR, where, None) or "?",
                ts=_time(get(d, "ts", STR, where), f"{where}ts"))


@dataclass(frozen=True)
class StateChange:
    """One ``sock:inet_sock_set_state`` hit on a watched local port.

    ``owner`` is the process last seen acting on the socket from a syscall
    (listen, connect, close, shutdown), not the task on the CPU: most
    transitions run in softirq on whatever task was interrupted.
    """

    ts: datetime = on_wire(**TIME)
    skaddr: int = on_wire(kinds=STR, absent=0, encode=lambda v: f"{v:#x}", decode=_skaddr)
    protocol: str = on_wire(kinds=STR, absent="tcp")
    family: str = on_wire(kinds=STR, absent="inet")
    local: Endpoint = on_wire(kinds=DICT, **_one(Endpoint))
    remote: Endpoint = on_wire(kinds=DICT, **_one(Endpoint))
    old: str = on_wire(kinds=STR)
    new: str = on_wire(kinds=STR)
    # On the wire as the owner's pid and comm (null when not known).
    owner: Task | None = on_wire(
        spread=True, read=_owner_read,
        write=lambda ev: {"pid": ev.owner.pid if ev.owner else None,
                          "comm": ev.owner.comm if ev.owner else None})
    type: str = on_wire("state", init=False)


@dataclass(frozen=True)
class SockOpts:
    """Socket options as the probes saw them (socket() defaults, setsockopt()).

    Each is True/False when seen, None when unknown (the socket predates the
    probes, or for v6only: never set, so net.ipv6.bindv6only decides).
    """

    reuseaddr: bool | None = on_wire(None, key="so_reuseaddr", kinds=OPT_BOOL, absent=None)
    reuseport: bool | None = on_wire(None, key="so_reuseport", kinds=OPT_BOOL, absent=None)
    v6only: bool | None = on_wire(None, key="ipv6_v6only", kinds=OPT_BOOL, absent=None)
    bound_to_device: bool | None = on_wire(None, key="so_bindtodevice", kinds=OPT_BOOL,
                                           absent=None)


UNKNOWN_OPTS = SockOpts()
# Where options come from, in the JSON: "kernel" (read from the socket),
# "probes" (seen being set; for a blocker also "closer", the close that made
# the minisock, or "binder", the bind seen for its address), else this.
UNKNOWN_SOURCE = "unknown"


def _opts_read(d: Mapping[str, Any], where: str) -> SockOpts:
    o = d.get("options")
    return read(SockOpts, o, f"{where}options.") if isinstance(o, dict) else UNKNOWN_OPTS


def _source_read(d: Mapping[str, Any], where: str) -> str | None:
    o = d.get("options")
    source = get(o, "source", OPT_STR, f"{where}options.", None) if isinstance(o, dict) else None
    return None if source == UNKNOWN_SOURCE else source


def _options(source: Any) -> dict[str, Any]:
    """The ``options`` object: the socket options and where they come from
    (``source(event)``), read back into ``opts`` and ``opts_source``."""
    return {"key": "options", "read": _opts_read,
            "write": lambda ev: {**write(ev.opts), "source": source(ev)}}


# An opts_source field: inside the ``options`` object its opts field writes.
SOURCE: dict[str, Any] = {"shown": False, "read": _source_read}


@dataclass(frozen=True)
class SocketCall:
    """A ``bind()``, ``listen()`` or ``connect()`` the probes reported.

    ``addr``/``port``: for bind the address asked for; for listen the address
    the socket was seen bound to (port 0: not seen bound, listen() autobinds);
    for connect the destination. ``errno`` is 0 on success. ``protocol`` is
    what ``socket()`` asked for, ``unknown`` when the socket predates the probes.
    ``local_port``: for connect, the port the socket was bound to (0: none).
    Inside a ``*_error`` event (view FAILURE) ``sk_uid`` and ``port_range``
    are shown too.
    """

    ts: datetime = on_wire(**TIME)
    call: str = on_wire(key="type", kinds=STR, views=(EVENT,))  # bind | listen | connect
    pid: int = on_wire(kinds=INT)
    tid: int = on_wire(kinds=INT, absent=0)
    comm: str = on_wire(kinds=STR)
    uid: int = on_wire(kinds=INT, absent=0)
    fd: int = on_wire(kinds=INT, absent=-1)
    errno: int = on_wire(kinds=OPT_STR, absent=0, **ERRNO)
    protocol: str = on_wire(kinds=STR, absent="unknown")
    family: str = on_wire(kinds=STR, absent="inet")
    addr: str = on_wire(kinds=STR)
    port: int = on_wire(kinds=INT)
    cgroup_id: int = on_wire(shown=False, absent=0)
    opts: SockOpts = on_wire(UNKNOWN_OPTS, **_options(lambda c: c.opts_source or UNKNOWN_SOURCE))
    local_port: int = on_wire(  # shown by CallError, for connect only
        0, shown=False, read=lambda d, where: get(d, "local_port", OPT_INT, where, None) or 0)
    # Where opts come from: "kernel" (read from the socket), "probes" (seen
    # being set), None (not known).
    opts_source: str | None = on_wire(None, **SOURCE)
    # Read from the kernel by the CO-RE engine; None where the engine cannot.
    # Inode of the calling thread's network namespace:
    netns: int | None = on_wire(None, shown=False, absent=None)
    # The socket's owner uid (sk_uid), which SO_REUSEPORT compares:
    sk_uid: int | None = on_wire(None, kinds=OPT_INT, absent=None, views=(FAILURE,))
    # The socket's own IP_LOCAL_PORT_RANGE:
    port_range: tuple[int, int] | None = on_wire(None, views=(FAILURE,), **PAIR)
    inode: int | None = on_wire(None, shown=False, absent=None)  # the socket's inode
    skaddr: int = on_wire(0, shown=False, absent=0)  # the struct sock, 0 when not read

    @property
    def ok(self) -> bool:
        return self.errno == 0


@dataclass(frozen=True)
class Pod:
    """A Kubernetes pod: namespace and name from the runtime's record (the
    OCI bundle's annotations) or its API's labels, uid from either or the
    cgroup; ``container``: the container's name in it."""

    namespace: str | None = on_wire(None, kinds=ANY, absent=None)
    name: str | None = on_wire(None, kinds=ANY, absent=None)
    uid: str | None = on_wire(None, kinds=ANY, absent=None)
    container: str | None = on_wire(None, kinds=ANY, absent=None)


def _sub(key: str, name: str) -> Any:
    """A reader of ``d[key][name]``, None when ``d[key]`` is absent or null."""
    return lambda d, where: (d.get(key) or {}).get(name)


@dataclass(frozen=True)
class Owner:
    """Who a process belongs to (portrace.observe.owners): its systemd ``unit``
    (``user_unit``: in a user's manager), its container (id and runtime from
    the cgroup or the runtime's own record, ``container`` its name from a
    Docker-compatible API or nerdctl, ``runtime_namespace`` containerd's
    namespace, ``sandbox`` a pod's sandbox container), its pod; and for the
    special holders, what they stand for: ``activates`` (systemd's ``.socket``
    unit, or the command systemd-socket-activate starts) and ``forwards_to``
    (docker-proxy's container end, with its container). On the wire the
    container is one object (id, runtime, name, namespace, sandbox), and so is
    forwards_to (addr, port, container)."""

    unit: str | None = on_wire(None, kinds=ANY, absent=None)
    user_unit: bool = on_wire(False, read=lambda d, where: bool(d.get("user_unit")))
    container_id: str | None = on_wire(
        None, key="container", read=_sub("container", "id"),
        write=lambda o: None if o.container_id is None else {
            "id": o.container_id, "runtime": o.runtime, "name": o.container,
            "namespace": o.runtime_namespace, "sandbox": o.sandbox})
    runtime: str | None = on_wire(None, shown=False, read=_sub("container", "runtime"))
    container: str | None = on_wire(None, shown=False, read=_sub("container", "name"))
    # containerd's namespace (k8s.io, default, moby); the pod's sandbox (pause).
    runtime_namespace: str | None = on_wire(None, shown=False,
                                            read=_sub("container", "namespace"))
    sandbox: bool = on_wire(False, shown=False,
                            read=lambda d, where: bool((d.get("container") or {}).get("sandbox")))
    pod: Pod | None = on_wire(None, kinds=ANY, absent=None, **_one(Pod))
    activates: str | None = on_wire(None, kinds=ANY, absent=None)
    forwards_to: Endpoint | None = on_wire(
        None, kinds=ANY, absent=None, decode=_one(Endpoint)["decode"],
        write=lambda o: None if o.forwards_to is None else {
            **write(o.forwards_to), "container": o.forwards_to_container})
    forwards_to_container: str | None = on_wire(None, shown=False,
                                                read=_sub("forwards_to", "container"))

    def label(self) -> str:
        """``checkout.service``, ``pod shop/checkout-7d9, container web``,
        ``container t1 in containerd namespace default``..."""
        parts = []
        if self.forwards_to is not None:
            into = f" in container {self.forwards_to_container}" \
                if self.forwards_to_container else ""
            parts.append(f"docker-proxy to {self.forwards_to}{into}")
        if self.activates is not None:
            parts.append(f"socket activation: {self.activates}")
        if self.pod is not None:
            parts.append(f"pod {self.pod.namespace}/{self.pod.name}" if self.pod.name
                         else f"pod uid {self.pod.uid}")
        if self.sandbox:
            parts.append("its sandbox (pause) container")
        elif self.pod is not None and self.pod.container is not None:
            parts.append(f"container {self.pod.container}")
        elif self.container_id is not None:
            generated = len(self.container_id) == 64  # a runtime's hex id, not a chosen one
            named = self.container or (self.container_id[:12] if generated
                                       else self.container_id)
            where = f" in containerd namespace {self.runtime_namespace}" \
                if self.runtime_namespace and self.pod is None else ""
            parts.append(f"container {named}{where}")
        if self.unit is not None:
            parts.append(f"user unit {self.unit}" if self.user_unit else self.unit)
        return ", ".join(parts)


_FIXED = ("pid", "comm", "fds", "inherited", "owner")


@dataclass(frozen=True)
class ProcessRef:
    """A process holding a socket's inode through one or more fds.

    ``inherited`` is True when the holder did not bind the socket itself (the
    probes saw another process bind it, or it shares it with its parent),
    None when nothing tells. On the wire its ``facts`` come first, in the
    same object, and its own fields win a clash.
    """

    pid: int = on_wire(kinds=INT)
    comm: str = on_wire(kinds=STR)
    fds: tuple[int, ...] = on_wire((), kinds=LIST, absent=(), encode=list,
                                   decode=lambda v, where: tuple(v))
    inherited: bool | None = on_wire(None, kinds=OPT_BOOL, absent=None)
    # portrace.observe.context.process_facts at lookup:
    facts: dict[str, Any] | None = on_wire(
        None, spread=True, after="", write=lambda p: p.facts or {},
        read=lambda d, where: {k: v for k, v in d.items() if k not in _FIXED} or None)
    # Its unit, container, pod (portrace.observe.owners):
    owner: Owner | None = on_wire(None, kinds=OPT_DICT, absent=None, **_one(Owner))


@dataclass(frozen=True)
class Closer:
    """Who closed a socket that is now a minisock: the process seen at
    ESTABLISHED -> FIN_WAIT1 (or CLOSE_WAIT -> LAST_ACK), when, and the
    socket's options at that close (the minisock keeps them; on the wire they
    are the blocker's own ``options``, source ``closer``)."""

    pid: int = on_wire(kinds=INT)
    comm: str = on_wire(kinds=STR)
    ts: datetime = on_wire(**TIME)
    opts: SockOpts = on_wire(UNKNOWN_OPTS, shown=False, absent=UNKNOWN_OPTS)


@dataclass(frozen=True)
class Blocker:
    state: str = on_wire(kinds=STR)
    protocol: str = on_wire(kinds=STR, absent="tcp")
    family: str = on_wire(kinds=STR, absent="inet")
    local: Endpoint = on_wire(kinds=DICT, **_one(Endpoint))
    remote: Endpoint | None = on_wire(kinds=OPT_DICT, **_one(Endpoint))
    processes: tuple[ProcessRef, ...] = on_wire(**_many(ProcessRef))
    inode: int = on_wire(kinds=INT, absent=0)
    uid: int = on_wire(kinds=INT, absent=0)
    # Minisocks only: seconds left at lookup.
    expires_s: float | None = on_wire(kinds=OPT_NUM,
                                      decode=lambda v, where: None if v is None else float(v))
    closed_by: Closer | None = on_wire(kinds=OPT_DICT, **_one(Closer))
    minisock: bool = on_wire(kinds=BOOL, absent=False)
    v6only: bool | None = on_wire(kinds=OPT_BOOL, absent=None)
    bound_dev_if: int = on_wire(kinds=INT, absent=0)
    opts: SockOpts = on_wire(UNKNOWN_OPTS, **_options(lambda b: b.opts_source or UNKNOWN_SOURCE))
    # Where opts come from: "probes" (this socket's fd), "binder" (the process
    # seen binding this address), "closer" (the close that made the minisock).
    opts_source: str | None = on_wire(None, **SOURCE)
    # The kernel's rule, given what is known:
    conflict: bool | None = on_wire(None, key="conflicts", kinds=OPT_BOOL, absent=None)
    # More holders than listed: how many in all.
    processes_total: int | None = on_wire(
        None, kinds=OPT_INT, absent=None, after="processes",
        write=lambda b: b.processes_total or len(b.processes))
    # False: some processes' fds were unreadable (not root).
    holders_known: bool = on_wire(True, kinds=BOOL, absent=True, after="processes_total")


@dataclass(frozen=True)
class PortUsage:
    """The ephemeral port range the kernel searched (low-high: the namespace's,
    narrowed by the socket's own IP_LOCAL_PORT_RANGE) and how much is taken.
    On the wire low and high are one ``range`` pair."""

    low: int = on_wire(key="range", write=lambda u: [u.low, u.high],
                       read=lambda d, where: get(d, "range", LIST, where)[0])
    high: int = on_wire(shown=False, read=lambda d, where: get(d, "range", LIST, where)[1])
    reserved: int = on_wire(kinds=INT, absent=0)  # ports of the range in ip_local_reserved_ports
    in_use: int = on_wire(kinds=INT, absent=0)  # distinct local ports of the range held
    # Sockets on those ports, by state:
    by_state: dict[str, int] = on_wire(
        encode=dict, read=lambda d, where: dict(get(d, "by_state", DICT, where, {})))
    # connect(): TIME_WAIT toward the destination, and FIN_WAIT2 minisocks:
    time_wait_to_destination: int | None = on_wire(None, kinds=ANY, absent=None)
    fin_wait2_to_destination: int | None = on_wire(None, kinds=ANY, absent=None)
    netns_range: tuple[int, int] | None = on_wire(None, **PAIR)  # the namespace's range
    socket_range: tuple[int, int] | None = on_wire(None, **PAIR)  # IP_LOCAL_PORT_RANGE, if set


@dataclass(frozen=True)
class Verdict:
    cause: str = on_wire(kinds=STR)  # see diagnose.CAUSES
    summary: str = on_wire(kinds=STR)
    advice: tuple[str, ...] = on_wire(kinds=LIST, encode=list,
                                      decode=lambda v, where: tuple(str(a) for a in v))


@dataclass(frozen=True)
class Netns:
    """The network namespace the blockers were looked up in.

    ``source``: ``process`` when entered through the failing thread's
    ``/proc/<pid>/task/<tid>/ns/net``. When that thread had already exited:
    ``pinned`` (through its name under /run/netns) or ``member`` (through
    another process in it), for the inode the kernel reported (CO-RE engine);
    ``gone`` when nothing held that namespace any more (nothing looked up);
    ``tracer`` when the engine could not tell the namespace (bcc) and
    portrace's own was used instead; ``closed`` when it exists but portrace
    runs without CAP_SYS_ADMIN, which setns() into it takes (nothing looked
    up). ``name``: its name under /run/netns (``ip netns``), if it has one.
    """

    inode: int = on_wire(kinds=INT, absent=0)
    source: str = on_wire(kinds=STR, absent="tracer")
    name: str | None = on_wire(None, kinds=OPT_STR, absent=None)

    @property
    def searchable(self) -> bool:
        """Whether this is the failing socket's namespace, entered: only then
        may a blocker be named from it."""
        return self.source not in ("gone", "tracer", "closed")


@dataclass(frozen=True)
class SnapshotSource:
    """Where a port's snapshot came from, and what it cost the host.

    ``sockets``, per protocol: ``bind_hash`` (TCP: the port's bucket of the
    bind hash, include/net/inet_hashtables.h: inet_bhashfn), ``udp_hash`` (the
    port's slot of the netns's udp_table, 6.2+), ``iterators`` (iter/tcp or
    iter/udp over every socket of the netns) or ``sock_diag`` (bcc engine).
    ``holders``: ``binder`` (the fds of the processes the kernel saw bind or
    listen, which account for every reference to each socket's file),
    ``cgroup`` (those and the fds of the processes in each socket's cgroup,
    which account for them), ``host`` (every fd of the host, iter/task_file),
    ``proc`` (bcc: /proc/PID/fd) or ``none`` (no socket on the port has a file).
    ``fallback``: why a cheaper path was not taken (None: none was left out).
    """

    sockets: dict[str, str] = on_wire(kinds=DICT, encode=dict,
                                      decode=lambda v, where: dict(v))
    holders: str = on_wire(kinds=STR)
    fallback: str | None = on_wire(None, kinds=OPT_STR, absent=None)


@dataclass(frozen=True)
class AddressState:
    """A bind()'s address as the failing namespace has it, for a bind()
    refused with EADDRNOTAVAIL (portrace.observe.addresses): ``interface``
    where it is assigned (None: nowhere), whether that is up and has a
    carrier, its IPv6 DAD state, how long DAD takes there (``dad_s``), and the
    named namespaces (``ip netns``) that have it instead."""

    addr: str = on_wire(kinds=STR)
    interface: str | None = on_wire(None, kinds=OPT_STR, absent=None)
    interface_up: bool | None = on_wire(None, kinds=OPT_BOOL, absent=None)  # IFF_UP
    carrier: bool | None = on_wire(None, kinds=OPT_BOOL, absent=None)  # IFLA_CARRIER
    tentative: bool = on_wire(False, kinds=BOOL, absent=False)
    dadfailed: bool = on_wire(False, kinds=BOOL, absent=False)
    dad_s: float | None = on_wire(None, kinds=OPT_NUM, absent=None)
    elsewhere: tuple[str, ...] = on_wire((), kinds=LIST, absent=(), encode=list,
                                         decode=lambda v, where: tuple(v))

    @property
    def assigned(self) -> bool:
        return self.interface is not None


@dataclass(frozen=True)
class PortRule:
    """The privileged-port rule's facts, for a bind() refused with EACCES
    (portrace.observe.privilege): the netns's ip_unprivileged_port_start,
    whether the process holds CAP_NET_BIND_SERVICE, the inodes of its user
    namespace and of the one owning the netns, and how they relate: ``same``,
    ``ancestor`` (the process's is above the owner) or ``other`` (below or
    beside: no capability of the process counts there)."""

    port_start: int | None = on_wire(None, kinds=OPT_INT, absent=None)
    cap_net_bind_service: bool | None = on_wire(None, kinds=OPT_BOOL, absent=None)
    user_ns: int | None = on_wire(None, kinds=OPT_INT, absent=None)
    netns_user_ns: int | None = on_wire(None, kinds=OPT_INT, absent=None)
    relation: str | None = on_wire(None, kinds=OPT_STR, absent=None)

    def allows(self, port: int) -> bool | None:
        """Whether the rule lets the process bind ``port`` (None: not known)."""
        if self.port_start is None:
            return None
        if port == 0 or port >= self.port_start:
            return True
        if self.relation == "other":
            return False
        if self.cap_net_bind_service is None or self.relation is None:
            return None
        return self.cap_net_bind_service


@dataclass(frozen=True)
class CgroupProgram:
    """A cgroup BPF program that runs on a process's bind() (observe.cgroups):
    its id, name and tag (``bpftool prog show id ID``), its hook (``bind4``,
    ``bind6``, ``post_bind4``, ``post_bind6``) and the cgroup it is attached
    at (a path under the cgroup2 mount; None if not found)."""

    id: int = on_wire(kinds=INT)
    name: str = on_wire(kinds=STR)
    tag: str = on_wire(kinds=STR)
    hook: str = on_wire(kinds=STR)
    cgroup: str | None = on_wire(None, kinds=OPT_STR, absent=None)


@dataclass(frozen=True)
class Policy:
    """What may refuse a bind() besides the port rule (observe.policy): the
    cgroup BPF programs that run on it (None: not read), the active LSMs, the
    process's LSM label (``/proc/PID/attr/current``, where an LSM gives one),
    and its seccomp mode (0 off, 1 strict, 2 filter) with its filter count."""

    cgroup_programs: tuple[CgroupProgram, ...] | None = on_wire(
        None, kinds=(list, _NONE), absent=None,
        encode=lambda vs: None if vs is None else [write(v) for v in vs],
        decode=lambda vs, where: None if vs is None else tuple(
            read(CgroupProgram, v, f"{where}[{i}].") for i, v in enumerate(vs)))
    lsms: tuple[str, ...] = on_wire((), kinds=LIST, absent=(), encode=list,
                                    decode=lambda v, where: tuple(v))
    lsm_label: str | None = on_wire(None, kinds=OPT_STR, absent=None)
    seccomp: int | None = on_wire(None, kinds=OPT_INT, absent=None)
    seccomp_filters: int | None = on_wire(None, kinds=OPT_INT, absent=None)


def _netns_read(d: Mapping[str, Any], where: str) -> Netns:
    ns = d.get("netns")
    return read(Netns, ns, f"{where}netns.") if isinstance(ns, dict) else Netns(0, "tracer")


NETNS: dict[str, Any] = {"encode": write, "read": _netns_read}
BLOCKERS: dict[str, Any] = _many(Blocker)
# A listed blocker count where the event lists all of them: their number.
TOTAL: dict[str, Any] = {"kinds": OPT_INT, "absent": None, "after": "blockers",
                         "write": lambda ev: ev.blockers_total or len(ev.blockers)}


def _failed_call(d: Mapping[str, Any], where: str) -> SocketCall:
    call: SocketCall = read(SocketCall, d, where)
    return dataclasses.replace(call, call=call.call.removesuffix("_error"))


@dataclass(frozen=True)
class CallError:
    """A failed bind()/listen()/connect() with what blocked it, as printed.
    On the wire the attempt's fields are the event's own (view FAILURE)."""

    attempt: SocketCall = on_wire(spread=True, read=_failed_call, write=lambda ev: {
        # A failure's errno is always named, as the number it was written from.
        **write(ev.attempt, FAILURE), "errno": errno_name(ev.attempt.errno)})
    cmdline: list[str] | None = on_wire(kinds=ANY, absent=None, after="comm")
    netns: Netns = on_wire(**NETNS)
    blockers: tuple[Blocker, ...] = on_wire(**BLOCKERS)
    verdict: Verdict = on_wire(kinds=DICT, **_one(Verdict))
    # From the failure in the kernel to the snapshot of its port:
    lookup_ms: float = on_wire(kinds=NUM, absent=0.0, encode=lambda v: round(v, 3),
                               decode=lambda v, where: float(v))
    # When no blocker was left to find:
    last_seen: StateChange | None = on_wire(
        None, kinds=ANY, absent=None, encode=_one(StateChange)["encode"],
        decode=lambda v, where: read(StateChange, v) if isinstance(v, dict) else None)
    # Ephemeral exhaustion: the range and its use.
    usage: PortUsage | None = on_wire(
        None, key="ephemeral", kinds=ANY, absent=None, encode=_one(PortUsage)["encode"],
        decode=lambda v, where: read(PortUsage, v, "ephemeral.") if isinstance(v, dict)
        else None)
    sysctls: dict[str, str] = on_wire(factory=dict, encode=dict, read=_mapping("sysctls"))
    # context.process_facts of the failing process:
    process: dict[str, Any] | None = on_wire(None, kinds=OPT_DICT, absent=None)
    # When it had exited before they were read: its owner, as the cgroup the
    # kernel saw it fail in names it.
    exited_owner: Owner | None = on_wire(None, kinds=OPT_DICT, absent=None, after="process",
                                         **_one(Owner))
    host: dict[str, str] = on_wire(factory=dict, read=_mapping("host"))
    # Transitions on the port shortly before:
    recent: tuple[StateChange, ...] = on_wire(
        (), encode=lambda vs: [write(s) for s in vs],
        read=lambda d, where: tuple(read(StateChange, s) for s in d.get("recent") or ()
                                    if isinstance(s, dict)))
    # From the failure in the kernel to the event's emission:
    verdict_ms: float | None = on_wire(None, after="lookup_ms", **MS)
    # More blockers than are listed (a busy port): how many in all, by state.
    blockers_total: int | None = on_wire(None, **TOTAL)
    blockers_by_state: dict[str, int] | None = on_wire(None, kinds=OPT_DICT, absent=None,
                                                       after="blockers_total")
    # A bind() refused for its address (EADDRNOTAVAIL) or its port (EACCES):
    # the facts judged; None for every other failure.
    address: AddressState | None = on_wire(None, kinds=OPT_DICT, absent=None,
                                           **_one(AddressState))
    port_rule: PortRule | None = on_wire(None, kinds=OPT_DICT, absent=None, **_one(PortRule))
    # A bind() refused with EPERM, or EACCES the port rule does not explain:
    # what else may refuse it.
    policy: Policy | None = on_wire(None, kinds=OPT_DICT, absent=None, **_one(Policy))
    # A bind() refused with EINVAL: the address its socket already had.
    already_bound: Endpoint | None = on_wire(None, kinds=OPT_DICT, absent=None, **_one(Endpoint))
    # The engine's own time for the port's snapshot (sockets and holders), without
    # the wait before it that lookup_ms includes; None when no snapshot was taken.
    snapshot_ms: float | None = on_wire(None, after="verdict_ms", **MS)
    # How that snapshot was taken (None: none was).
    snapshot_source: SnapshotSource | None = on_wire(None, kinds=OPT_DICT, absent=None,
                                                     after="snapshot_ms", **_one(SnapshotSource))
    type: str = on_wire("", init=False)  # bind_error | listen_error | connect_error
    # connect() only: the destination again, and the port the socket was bound to.
    destination: Endpoint | None = on_wire(
        None, init=False, encode=lambda e: OMIT if e is None else write(e))
    local_port: int | None = on_wire(
        None, init=False, write=lambda ev: OMIT if ev.destination is None else ev.local_port)

    def __post_init__(self) -> None:
        a = self.attempt
        object.__setattr__(self, "type", f"{a.call}_error")
        if a.call == "connect":
            object.__setattr__(self, "destination", Endpoint(a.addr, a.port))
            object.__setattr__(self, "local_port", a.local_port or None)

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

    ts: datetime = on_wire(**TIME)
    free: bool = on_wire(True, init=False)  # no verdict: nothing blocks it
    protocol: str = on_wire(kinds=STR)
    family: str = on_wire(kinds=STR)
    addr: str = on_wire(kinds=STR)
    port: int = on_wire(kinds=INT)
    opts: SockOpts = on_wire(**_options(lambda c: "given"))
    uid: int | None = on_wire(kinds=OPT_INT, absent=None)
    netns: Netns = on_wire(**NETNS)
    engine: str = on_wire(kinds=STR)
    blockers: tuple[Blocker, ...] = on_wire(**BLOCKERS)
    verdict: Verdict | None = on_wire(  # None: free
        kinds=ANY, absent=None, encode=_one(Verdict)["encode"],
        decode=lambda v, where: read(Verdict, v, "verdict.") if isinstance(v, dict) else None)
    can_destroy: bool | None = on_wire(None, kinds=OPT_BOOL, absent=None)
    sysctls: dict[str, str] = on_wire(factory=dict, encode=dict,
                                      read=lambda d, where: dict(d.get("sysctls") or {}))
    waited_s: float | None = on_wire(None, **MS)
    waited_for: tuple[str, ...] = on_wire((), encode=list,
                                          read=lambda d, where: tuple(d.get("waited_for") or ()))
    blockers_total: int | None = on_wire(None, **TOTAL)
    blockers_by_state: dict[str, int] | None = on_wire(None, kinds=ANY, absent=None,
                                                       after="blockers_total")
    # Refused before any socket counts: the address is not usable, or the
    # port rule does not let --pid's process bind the port.
    address: AddressState | None = on_wire(None, kinds=OPT_DICT, absent=None,
                                           **_one(AddressState))
    port_rule: PortRule | None = on_wire(None, kinds=OPT_DICT, absent=None, **_one(PortRule))
    # With --pid: the cgroup programs that would run on its bind(), which
    # decide only when run (None: none, or not asked).
    policy: Policy | None = on_wire(None, kinds=OPT_DICT, absent=None, **_one(Policy))
    # How the port's snapshot was taken (None: none was, the address or port
    # rule refused first).
    snapshot_source: SnapshotSource | None = on_wire(None, kinds=OPT_DICT, absent=None,
                                                     **_one(SnapshotSource))
    type: str = on_wire("check", init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "free", self.verdict is None)


@dataclass(frozen=True)
class Repeats:
    """Failures identical to a reported one (same process, call, address,
    errno) that came within the tracer's coalescing window, or while the one
    before was still being diagnosed: counted, not diagnosed again. ``ts``:
    the last of them; ``since``: the report they repeat."""

    ts: datetime = on_wire(**TIME)
    since: datetime = on_wire(**TIME)
    call: str = on_wire(kinds=STR)
    pid: int = on_wire(kinds=INT)
    comm: str = on_wire(kinds=STR)
    family: str = on_wire(kinds=STR, absent="inet")
    addr: str = on_wire(kinds=STR)
    port: int = on_wire(kinds=INT)
    errno: int = on_wire(kinds=STR, **ERRNO)
    count: int = on_wire(kinds=INT)
    type: str = on_wire("repeats", init=False)


def failure_summary(a: SocketCall) -> dict[str, Any]:
    """The fields that identify a failure, for an ``error`` event about it."""
    return {"call": a.call, "pid": a.pid, "comm": a.comm, "addr": a.addr, "port": a.port,
            "errno": errno_name(a.errno)}


Event = Union[Ready, Lost, ErrorRecord, StateChange, SocketCall, CallError, Repeats, Check]
# Each JSON ``type`` and the event it reads into.
TYPES: dict[str, type[Any]] = {
    "ready": Ready, "lost": Lost, "error": ErrorRecord, "repeats": Repeats,
    "state": StateChange, "check": Check,
    **{call: SocketCall for call in ("bind", "listen", "connect")},
    **{f"{call}_error": CallError for call in ("bind", "listen", "connect")},
}
