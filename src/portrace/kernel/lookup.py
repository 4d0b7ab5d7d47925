"""What the kernel holds for one failure, read in the failing socket's network
namespace in one pass: the port's sockets and their holders (the engine's
snapshot; the whole ephemeral range for connect() and autobind), who closed
each minisock, the options the probes hold through the holders' fds, who bound
each socket, and the port's recent transitions.

Two steps, because some facts must be read while the failing process most
likely still lives: :func:`failing_place` holds its namespace open (and lets
the caller read such facts), :func:`look_up` then asks the engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from portrace.events import Closer, Endpoint, Netns, SocketCall, SockOpts, StateChange
from portrace.kernel import capabilities, namespaces, sockdiag
from portrace.kernel.engine import Engine, Snapshot, SocketEntry

RECENT_S = 60  # transitions on the port kept in a failure's evidence
# What the verdicts quote, read in the failing process's namespace.
VERDICT_SYSCTLS = (
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_max_tw_buckets",
    "net.ipv6.bindv6only",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.ip_autobind_reuse",
    "net.ipv4.tcp_tw_reuse",
    "net.ipv4.tcp_tw_reuse_delay",
    "net.ipv4.tcp_timestamps",
)


@dataclass(frozen=True)
class Place:
    """A failure's namespace, held open: ``netns_fd`` (None: portrace's own,
    or not held) and what is known of it, ``attempt`` with its protocol read
    from the fd where the probes did not know it, and ``own_inode``, the
    failing socket's (a failed listen() leaves it bound: never its own blocker)."""

    attempt: SocketCall
    netns_fd: int | None
    netns: Netns
    own_inode: int | None


@contextlib.contextmanager
def failing_place(attempt: SocketCall) -> Iterator[Place]:
    """The failing thread's namespace, open for the body: by the inode the
    kernel reported (CO-RE engine) or through the thread (bcc)."""
    if attempt.netns:
        netns_fd, netns = namespaces.open_netns_inode(attempt.netns, attempt.pid, attempt.tid)
    else:
        netns_fd, netns = namespaces.open_netns(attempt.pid, attempt.tid)
    if netns_fd is not None and not namespaces.is_own(netns_fd) \
            and not capabilities.held("CAP_SYS_ADMIN"):
        os.close(netns_fd)
        netns_fd, netns = None, dataclasses.replace(netns, source="closed")
    try:
        if attempt.opts_source != "kernel" or attempt.protocol == "unknown":
            protocol = sockdiag.socket_protocol(attempt.pid, attempt.fd) or attempt.protocol
            attempt = dataclasses.replace(attempt, protocol=protocol)
        own = attempt.inode
        if own is None and attempt.call == "listen":
            own = sockdiag.fd_inode(attempt.pid, attempt.fd)
        yield Place(attempt, netns_fd, netns, own)
    finally:
        if netns_fd is not None:
            os.close(netns_fd)


@dataclass(frozen=True)
class Lookup:
    """The kernel's answer for one failure (see the module). ``attempt``: as
    judged (a listen() found bound is judged on its port). ``binder_pids``:
    struct sock address -> the pid the kernel saw bind or listen on it.
    ``lookup_ms``: from the failure in the kernel to the end of the lookup;
    ``snapshot_ms``: the engine's own time for the snapshot (None: none taken,
    as for another errno or a namespace that could not be searched)."""

    attempt: SocketCall
    netns: Netns
    own_inode: int | None
    snapshot: Snapshot
    closers: Mapping[tuple[str, Endpoint, Endpoint], Closer]
    fd_opts: Mapping[int, SockOpts]
    binder_pids: Mapping[int, int]
    recent: tuple[StateChange, ...]
    lookup_ms: float = 0.0
    snapshot_ms: float | None = None


def look_up(engine: Engine, place: Place,
            history: Mapping[int, Sequence[StateChange]]) -> Lookup:
    """One failure's :class:`Lookup`. Nothing is looked up in a namespace other
    than the failing socket's: where it cannot be searched (``netns.source``
    ``gone`` or ``tracer``), the snapshot is empty. ``history``: the
    transitions portrace streamed per port, for an engine that keeps none."""
    attempt, snap, snapshot_ms = place.attempt, Snapshot(sockets=[]), None
    # Only these have their cause on the port: a conflict, or connect()'s
    # exhausted range (bind()'s EADDRNOTAVAIL is its address's: observe.addresses).
    on_port = attempt.errno == errno.EADDRINUSE or (
        attempt.errno == errno.EADDRNOTAVAIL and attempt.call == "connect")
    if on_port and place.netns.searchable:
        protos = ("tcp", "udp") if attempt.protocol == "unknown" else (attempt.protocol,)
        whole_range = attempt.call == "connect" or attempt.port == 0
        started = time.perf_counter()
        snap = engine.snapshot(0 if whole_range else attempt.port, protos, place.netns_fd,
                               place.netns.inode, VERDICT_SYSCTLS, holders=not whole_range)
        snapshot_ms = (time.perf_counter() - started) * 1000.0
        attempt, snap = _bound_listen(attempt, snap, place.own_inode)
    lookup_ms = (time.time() - attempt.ts.timestamp()) * 1000.0
    by_port = attempt.call != "connect" and attempt.port != 0
    return Lookup(
        attempt=attempt, netns=place.netns, own_inode=place.own_inode, snapshot=snap,
        closers=_closers(engine, snap.sockets) if by_port else {},
        fd_opts=engine.fd_opts(snap.holders) if by_port else {},
        binder_pids={s.skaddr: o.pid for s in snap.sockets
                     if by_port and s.skaddr and s.inode and (o := engine.owner(s.skaddr))},
        recent=_recent(engine, attempt, history), lookup_ms=lookup_ms, snapshot_ms=snapshot_ms)


def _bound_listen(attempt: SocketCall, snap: Snapshot, own: int | None
                  ) -> tuple[SocketCall, Snapshot]:
    """listen() with no bind seen: if its socket is bound after all (the bind
    predates the probes), judge that port instead of ephemeral exhaustion."""
    if attempt.call != "listen" or attempt.port != 0 or not own:
        return attempt, snap
    mine = next((s for s in snap.sockets if s.inode == own and s.local.port), None)
    if mine is None:
        return attempt, snap  # unbound: listen() autobound and found nothing free
    attempt = dataclasses.replace(attempt, addr=mine.local.addr, port=mine.local.port,
                                  family=mine.family)
    on_port = [s for s in snap.sockets if s.local.port == mine.local.port]
    source = dataclasses.replace(snap.source, holders="proc") if snap.source else None
    return attempt, Snapshot(sockets=on_port,
                             holders=sockdiag.holders_of(s.inode for s in on_port),
                             sysctls=snap.sysctls, source=source)


def _closers(engine: Engine, socks: Sequence[SocketEntry]
             ) -> dict[tuple[str, Endpoint, Endpoint], Closer]:
    out = {}
    for s in socks:
        if s.minisock and s.remote is not None:
            c = engine.closer(s.family, s.local, s.remote)
            if c is not None:
                out[(s.family, s.local, s.remote)] = c
    return out


def _recent(engine: Engine, attempt: SocketCall,
            history: Mapping[int, Sequence[StateChange]]) -> tuple[StateChange, ...]:
    """Transitions on the port in the RECENT_S before the failure: from the
    kernel's per-port ring where the engine keeps one, else as streamed."""
    kept = engine.recent(attempt.port) if attempt.port else None
    seen = kept if kept is not None else history.get(attempt.port, ())
    since = attempt.ts.timestamp() - RECENT_S
    return tuple(ev for ev in seen if ev.ts.timestamp() >= since)
