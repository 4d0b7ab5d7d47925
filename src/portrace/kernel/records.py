"""Kernel records (``bpf/portrace.h``) -> typed events, for both engines.

Each engine hands over ctypes objects laid out as the compiler laid out the C
records (bcc: read from a map's value type; CO-RE: from the object's BTF);
field names are the header's, so one decoder serves both.
"""

from __future__ import annotations

import ctypes
import socket
import time
from datetime import datetime, timezone
from typing import Any

from portrace.events import (
    FAMILIES,
    PROTOCOLS,
    UNKNOWN_OPTS,
    Endpoint,
    SocketCall,
    SockOpts,
    StateChange,
    Task,
    tcp_state_name,
)
from portrace.kernel.header import value

# enum pt_kind, enum pt_opt, enum pt_source and PT_UID_UNKNOWN, as the header says
PT_BIND_ERROR, PT_BIND_OK, PT_STATE, PT_LISTEN_ERROR, PT_CONNECT_ERROR, PT_LISTEN_OK = map(
    value, ("PT_BIND_ERROR", "PT_BIND_OK", "PT_STATE", "PT_LISTEN_ERROR", "PT_CONNECT_ERROR",
            "PT_LISTEN_OK"))
CALLS = {PT_BIND_ERROR: "bind", PT_BIND_OK: "bind", PT_LISTEN_ERROR: "listen",
         PT_CONNECT_ERROR: "connect", PT_LISTEN_OK: "listen"}
PT_OPT_REUSEADDR, PT_OPT_REUSEPORT, PT_OPT_V6ONLY, PT_OPT_BINDTODEVICE = map(
    value, ("PT_OPT_REUSEADDR", "PT_OPT_REUSEPORT", "PT_OPT_V6ONLY", "PT_OPT_BINDTODEVICE"))
PT_OPT_ALL = PT_OPT_REUSEADDR | PT_OPT_REUSEPORT | PT_OPT_V6ONLY | PT_OPT_BINDTODEVICE
SOURCES = {value("PT_SRC_UNKNOWN"): None, value("PT_SRC_PROBES"): "probes",
           value("PT_SRC_KERNEL"): "kernel"}
PT_UID_UNKNOWN = value("PT_UID_UNKNOWN")


class MonotonicClock:
    """Turns ``bpf_ktime_get_ns()`` (CLOCK_MONOTONIC) into wall-clock UTC."""

    def __init__(self) -> None:
        self.offset_ns = time.time_ns() - time.monotonic_ns()

    def wall(self, mono_ns: int) -> datetime:
        return datetime.fromtimestamp((mono_ns + self.offset_ns) / 1e9, tz=timezone.utc)


def addr_text(family: int, raw: Any) -> str:
    data = bytes(raw)
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, data[:4])
    return socket.inet_ntop(socket.AF_INET6, data[:16])


def opts_of(known: int, on: int) -> SockOpts:
    """PT_OPT_* bit sets -> SockOpts (None where a bit is not known)."""
    def bit(b: int) -> bool | None:
        return bool(on & b) if known & b else None
    if not known:
        return UNKNOWN_OPTS
    return SockOpts(reuseaddr=bit(PT_OPT_REUSEADDR), reuseport=bit(PT_OPT_REUSEPORT),
                    v6only=bit(PT_OPT_V6ONLY), bound_to_device=bit(PT_OPT_BINDTODEVICE))


def decode_opts(raw: Any) -> SockOpts:
    """``struct pt_opts`` -> SockOpts."""
    return opts_of(raw.known, raw.on)


def decode_task(raw: Any, clock: MonotonicClock) -> Task | None:
    """``struct pt_task`` -> Task, None when no process was recorded."""
    if raw.pid == 0:
        return None
    return Task(pid=raw.pid, tid=raw.tid, comm=raw.comm.decode(errors="replace"),
                ts=clock.wall(raw.ts_ns))


def decode_call(raw: Any, clock: MonotonicClock) -> SocketCall:
    """``struct pt_call`` -> SocketCall."""
    return SocketCall(
        ts=clock.wall(raw.task.ts_ns),
        call=CALLS[raw.kind],
        pid=raw.task.pid,
        tid=raw.task.tid,
        comm=raw.task.comm.decode(errors="replace"),
        uid=raw.uid,
        fd=raw.fd,
        errno=raw.err,
        protocol=PROTOCOLS.get(raw.protocol, "unknown"),
        family=FAMILIES.get(raw.family, "inet"),
        addr=addr_text(raw.family or socket.AF_INET, raw.addr),
        port=raw.port,
        cgroup_id=raw.cgroup_id,
        opts=decode_opts(raw.opts),
        local_port=raw.local_port,
        opts_source=SOURCES.get(raw.opts_source),
        netns=raw.netns or None,
        sk_uid=None if raw.sk_uid == PT_UID_UNKNOWN else raw.sk_uid,
        port_range=(raw.range_lo, raw.range_hi) if raw.range_hi else None,
        inode=raw.inode or None,
        skaddr=raw.skaddr,
    )


def decode_event(raw: Any, clock: MonotonicClock) -> SocketCall | StateChange | None:
    """``union pt_event`` -> the typed event its ``kind`` names, None for an
    unknown kind."""
    kind = raw.call.kind
    if kind in CALLS:
        return decode_call(raw.call, clock)
    if kind == PT_STATE:
        return decode_state(raw.state, clock)
    return None


def fill_tuple(key: Any, family: str, local: Endpoint, remote: Endpoint) -> Any:
    """Fill a ``struct pt_tuple`` (the closers map's key) for a 4-tuple."""
    fam = socket.AF_INET if family == "inet" else socket.AF_INET6
    key.family, key.sport, key.dport = fam, local.port, remote.port
    for dst, addr in ((key.saddr, local.addr), (key.daddr, remote.addr)):
        packed = socket.inet_pton(fam, addr)
        ctypes.memmove(ctypes.addressof(dst), packed, len(packed))
    return key


def decode_state(raw: Any, clock: MonotonicClock) -> StateChange:
    """``struct pt_state`` -> StateChange."""
    t = raw.tuple
    return StateChange(
        ts=clock.wall(raw.ts_ns),
        skaddr=raw.skaddr,
        protocol=PROTOCOLS.get(raw.protocol, str(raw.protocol)),
        family=FAMILIES.get(t.family, str(t.family)),
        local=Endpoint(addr_text(t.family, t.saddr), t.sport),
        remote=Endpoint(addr_text(t.family, t.daddr), t.dport),
        old=tcp_state_name(raw.oldstate),
        new=tcp_state_name(raw.newstate),
        owner=decode_task(raw.owner, clock),
    )
