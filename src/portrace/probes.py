"""Load, attach and read the kernel side (``bpf/``). The only module that touches bcc.

``Probes.open()`` checks the host first and raises a :mod:`portrace.errors`
error that names the fix (not root, no tracefs, no headers, no tracepoint,
BPF refused). Records are decoded with the layout the compiler gave
``union pt_event`` (read back from the ``pt_layout`` map), so the frontend
never keeps a second copy of ``bpf/portrace.h``.
"""

from __future__ import annotations

import ctypes
import os
import socket
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from portrace import errors
from portrace.events import (
    FAMILIES,
    PROTOCOLS,
    UNKNOWN_OPTS,
    Closer,
    Endpoint,
    SocketCall,
    SockOpts,
    StateChange,
    Task,
    tcp_state_name,
)

PT_BIND_ERROR, PT_BIND_OK, PT_STATE, PT_LISTEN_ERROR, PT_CONNECT_ERROR, PT_LISTEN_OK = range(1, 7)
CALLS = {PT_BIND_ERROR: "bind", PT_BIND_OK: "bind", PT_LISTEN_ERROR: "listen",
         PT_CONNECT_ERROR: "connect", PT_LISTEN_OK: "listen"}
PT_OPT_REUSEADDR, PT_OPT_REUSEPORT, PT_OPT_V6ONLY, PT_OPT_BINDTODEVICE = 1, 2, 4, 8

TRACEFS_ROOTS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
TRACEPOINTS = ("sock/inet_sock_set_state",) + tuple(
    f"syscalls/sys_{edge}_{call}"
    for call in ("bind", "listen", "connect", "socket", "setsockopt", "accept", "accept4",
                 "close", "shutdown")
    for edge in ("enter", "exit")
)


def bpf_source_dir() -> Path:
    """Where ``portrace.bpf.c`` and ``portrace.h`` are (installed as package data)."""
    return Path(str(resources.files("portrace"))) / "bpf"


def find_tracefs() -> Path:
    """The mounted tracefs. Raises ``NoTracefs`` with the mount command to run."""
    override = os.environ.get("PORTRACE_TRACEFS")
    roots = (Path(override),) if override else TRACEFS_ROOTS
    for root in roots:
        if (root / "events").is_dir():
            return root
    raise errors.NoTracefs(
        f"tracefs is not mounted at {', '.join(map(str, roots))}: "
        "run `mount -t tracefs tracefs /sys/kernel/tracing` (or `sudo make setup`)"
    )


def kernel_headers_dir() -> Path | None:
    """The headers bcc will compile against, as bcc looks for them."""
    env = os.environ.get("BCC_KERNEL_SOURCE")
    candidates = [Path(env)] if env else [Path(f"/lib/modules/{os.uname().release}/build")]
    for c in candidates:
        if (c / "include").is_dir():
            return c
    if not env and Path("/sys/kernel/kheaders.tar.xz").exists():
        return Path("/sys/kernel/kheaders.tar.xz")
    return None


CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39  # include/uapi/linux/capability.h


def effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def can_load_tracing_bpf(caps: int) -> bool:
    """CAP_BPF + CAP_PERFMON, or CAP_SYS_ADMIN (kernel/bpf/syscall.c: bpf_prog_load)."""
    def has(cap: int) -> bool:
        return bool(caps >> cap & 1)
    return has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON))


def preflight() -> Path:
    """Check what loading needs, cheapest first. Returns the tracefs root.

    Raises NeedsRoot, BpfUnavailable, NoBcc, NoTracefs, MissingTracepoint,
    NoKernelHeaders.
    """
    if os.geteuid() != 0:
        raise errors.NeedsRoot(
            "needs root to load BPF programs and read other processes' sockets: run with sudo"
        )
    if not can_load_tracing_bpf(effective_caps()):
        raise errors.BpfUnavailable(
            "root, but without CAP_BPF + CAP_PERFMON or CAP_SYS_ADMIN: the kernel will refuse "
            "the BPF programs (a container or capability bounding set dropped them)"
        )
    try:
        import bcc  # noqa: F401
    except ImportError as exc:
        raise errors.NoBcc(
            f"cannot import bcc ({exc}): install the OS package python3-bpfcc and run portrace "
            "from a venv made with --system-site-packages (`sudo make setup` does both)"
        ) from None
    tracefs = find_tracefs()
    for tp in TRACEPOINTS:
        if not (tracefs / "events" / tp).is_dir():
            raise errors.MissingTracepoint(
                f"this kernel has no tracepoint {tp.replace('/', ':')} "
                f"(looked in {tracefs}/events); portrace needs it"
                + (" (CONFIG_FTRACE_SYSCALLS)" if tp.startswith("syscalls") else "")
            )
    if kernel_headers_dir() is None:
        where = os.environ.get("BCC_KERNEL_SOURCE") or f"/lib/modules/{os.uname().release}/build"
        raise errors.NoKernelHeaders(
            f"no kernel headers at {where}: bcc needs them to compile the probes; "
            "run `sudo make setup` (installs them, or links the distribution's generic headers)"
        )
    return tracefs


class MonotonicClock:
    """Turns ``bpf_ktime_get_ns()`` (CLOCK_MONOTONIC) into wall-clock UTC."""

    def __init__(self) -> None:
        self.offset_ns = time.time_ns() - time.monotonic_ns()

    def wall(self, mono_ns: int) -> datetime:
        return datetime.fromtimestamp((mono_ns + self.offset_ns) / 1e9, tz=timezone.utc)


def _addr(family: int, raw: Any) -> str:
    data = bytes(raw)
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, data[:4])
    return socket.inet_ntop(socket.AF_INET6, data[:16])


def decode_opts(raw: Any) -> SockOpts:
    """``struct pt_opts`` -> SockOpts (None where the bit is not known)."""
    def bit(b: int) -> bool | None:
        return bool(raw.on & b) if raw.known & b else None
    if not raw.known:
        return UNKNOWN_OPTS
    return SockOpts(reuseaddr=bit(PT_OPT_REUSEADDR), reuseport=bit(PT_OPT_REUSEPORT),
                    v6only=bit(PT_OPT_V6ONLY), bound_to_device=bit(PT_OPT_BINDTODEVICE))


def _task(raw: Any, clock: MonotonicClock) -> Task | None:
    if raw.pid == 0:
        return None
    return Task(pid=raw.pid, tid=raw.tid, comm=raw.comm.decode(errors="replace"),
                ts=clock.wall(raw.ts_ns))


def decode_call(raw: Any, clock: MonotonicClock) -> SocketCall:
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
        addr=_addr(raw.family or socket.AF_INET, raw.addr),
        port=raw.port,
        cgroup_id=raw.cgroup_id,
        opts=decode_opts(raw.opts),
        local_port=raw.local_port,
    )


def decode_state(raw: Any, clock: MonotonicClock) -> StateChange:
    t = raw.tuple
    return StateChange(
        ts=clock.wall(raw.ts_ns),
        skaddr=raw.skaddr,
        protocol=PROTOCOLS.get(raw.protocol, str(raw.protocol)),
        family=FAMILIES.get(t.family, str(t.family)),
        local=Endpoint(_addr(t.family, t.saddr), t.sport),
        remote=Endpoint(_addr(t.family, t.daddr), t.dport),
        old=tcp_state_name(raw.oldstate),
        new=tcp_state_name(raw.newstate),
        owner=_task(raw.owner, clock),
    )


class Probes:
    """The attached tracepoints for a set of ports (empty: every port).

    ``on_event`` receives ``SocketCall`` and ``StateChange`` objects from
    :meth:`poll`. In all-ports mode only failed binds arrive.
    """

    def __init__(self, ports: Iterable[int], on_event: Callable[[Any], None],
                 ringbuf_pages: int = 64) -> None:
        self.ports = sorted(set(ports))
        self.on_event = on_event
        self.ringbuf_pages = ringbuf_pages
        self.clock = MonotonicClock()
        self._bpf: Any = None
        self._layout: Any = None
        self._lost_seen = 0

    def open(self) -> None:
        """Compile, load and attach. Raises the errors of :func:`preflight`,
        and ``BpfUnavailable`` when the kernel refuses the programs."""
        preflight()
        from bcc import BPF

        src = bpf_source_dir()
        cflags = [f"-I{src}", f"-DPT_RINGBUF_PAGES={self.ringbuf_pages}"]
        try:
            self._bpf = BPF(src_file=str(src / "portrace.bpf.c").encode(), cflags=cflags)
        except Exception as exc:  # bcc raises bare Exception for both cases
            msg = str(exc)
            if "compile" in msg.lower():
                raise errors.NoKernelHeaders(
                    f"bcc could not compile {src / 'portrace.bpf.c'} against the kernel headers "
                    f"at {kernel_headers_dir()} (compiler messages above); `sudo make setup` "
                    "reinstalls them"
                ) from None
            raise errors.BpfUnavailable(
                f"the kernel refused the BPF programs ({msg}); portrace needs CAP_BPF and "
                "CAP_PERFMON (or CAP_SYS_ADMIN) and tracepoint BPF support (CONFIG_BPF_EVENTS)"
            ) from None
        self._layout = self._bpf[b"pt_layout"].Leaf
        cfg = self._bpf[b"config"]
        value = cfg.Leaf()
        value.all_ports = 0 if self.ports else 1
        watched = self._bpf[b"watched_ports"]
        for port in self.ports:
            watched[watched.Key(port)] = watched.Leaf(1)
        cfg[cfg.Key(0)] = value  # last: the filter is complete before it applies
        self._bpf[b"events"].open_ring_buffer(self._on_record)

    def _on_record(self, _ctx: Any, data: Any, _size: int) -> None:
        rec = ctypes.cast(data, ctypes.POINTER(self._layout)).contents
        kind = rec.call.kind
        if kind in CALLS:
            self.on_event(decode_call(rec.call, self.clock))
        elif kind == PT_STATE:
            self.on_event(decode_state(rec.state, self.clock))

    def poll(self, timeout_ms: int) -> None:
        """Deliver pending records to ``on_event``; waits up to ``timeout_ms``."""
        self._bpf.ring_buffer_poll(timeout_ms)

    def take_lost(self) -> int:
        """Records dropped (ring buffer full) since the previous call."""
        total = int(self._bpf[b"lost"].sum(0).value)
        new = total - self._lost_seen
        self._lost_seen = total
        return new

    def closer(self, family: str, local: Endpoint, remote: Endpoint) -> Closer | None:
        """Who closed the socket with this 4-tuple, if the probes saw it close."""
        table = self._bpf[b"closers"]
        key = table.Key()
        fam = socket.AF_INET if family == "inet" else socket.AF_INET6
        key.family, key.sport, key.dport = fam, local.port, remote.port
        for dst, addr in ((key.saddr, local.addr), (key.daddr, remote.addr)):
            packed = socket.inet_pton(fam, addr)
            ctypes.memmove(ctypes.addressof(dst), packed, len(packed))
        try:
            raw = table[key]
        except KeyError:
            return None
        task = _task(raw, self.clock)
        if task is None:
            return None
        return Closer(pid=task.pid, comm=task.comm, ts=task.ts, opts=decode_opts(raw.opts))

    def sockopts(self, pid: int, fd: int) -> SockOpts | None:
        """What the probes know of a live process's socket fd, None if nothing."""
        table = self._bpf[b"sockinfo"]
        try:
            raw = table[table.Key(pid << 32 | fd)]
        except KeyError:
            return None
        return decode_opts(raw.opts)

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
