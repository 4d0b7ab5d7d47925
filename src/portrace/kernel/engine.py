"""What an engine is (:class:`Engine`) and what every engine needs first: the
checks before loading, the ring-polling budget, the lost-record slots. It
imports no engine; ``portrace.kernel.chooser`` picks and makes one.

Two engines produce the same typed events (``portrace.kernel.records``); everything
after them is shared:

- ``core`` (``portrace.kernel.core``): a libbpf CO-RE object compiled at build time,
  relocated against the kernel's BTF at load, reading the kernel's own socket
  state and BPF iterators. Needs ``/sys/kernel/btf/vmlinux`` and ``libbpf.so.1``.
- ``bcc`` (``portrace.kernel.bcc``): compiled by bcc at every start against kernel
  headers; tracepoint arguments and user memory only. The fallback where the
  kernel has no BTF.

``--engine auto`` (the default) takes ``core`` where it can run, else ``bcc``,
and says why in the ``ready`` event.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from portrace import errors
from portrace.events import Closer, Endpoint, SnapshotSource, SockOpts, StateChange, Task
from portrace.kernel import capabilities, header

ENGINES = ("auto", "core", "bcc")
# Overridable, as PORTRACE_TRACEFS is, to point at another kernel's files.
KERNEL_BTF = Path(os.environ.get("PORTRACE_KERNEL_BTF", "/sys/kernel/btf/vmlinux"))
CORE_OBJECT = "core.bpf.o"
TRACEFS_ROOTS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))


# What an engine's snapshot holds: the port's sockets and who holds them.
MINISOCK_STATES = ("TIME_WAIT", "FIN_WAIT2")


# sock_diag reports an unconnected UDP socket in TCP_CLOSE; ss calls it UNCONN.
UDP_STATE = {7: "UNCONN", 1: "ESTABLISHED"}


@dataclass(frozen=True)
class SocketEntry:
    """One socket from a sock_diag dump. ``expires_ms`` is set for minisocks."""

    protocol: str  # tcp | udp
    family: str  # inet | inet6
    state: str
    local: Endpoint
    remote: Endpoint | None  # None when unconnected
    inode: int
    uid: int
    cookie: int
    expires_ms: int | None
    v6only: bool | None  # inet6 only (INET_DIAG_SKV6ONLY)
    bound_dev_if: int
    # Read from the socket itself (CO-RE engine), minisocks included; None
    # when the snapshot came from sock_diag, which does not report them.
    opts: SockOpts | None = None
    skaddr: int = 0  # the struct sock, 0 when not known (sock_diag)

    @property
    def minisock(self) -> bool:
        return is_minisock(self.protocol, self.inode, self.state)


def is_minisock(protocol: str, inode: int, state: str) -> bool:
    """A TIME_WAIT/FIN_WAIT2 timewait socket: no inode, so no owner process."""
    return protocol == "tcp" and inode == 0 and state in MINISOCK_STATES


@dataclass(frozen=True)
class Holder:
    pid: int
    ppid: int
    comm: str
    fds: tuple[int, ...]


@dataclass
class Snapshot:
    sockets: list[SocketEntry]
    holders: dict[int, list[Holder]] = field(default_factory=dict)  # inode -> holders
    sysctls: dict[str, str] = field(default_factory=dict)  # as the namespace sees them
    # False when some process's fds could not be read (not root): then a
    # socket listed with no holder may still have one.
    holders_complete: bool = True
    source: SnapshotSource | None = None  # how the engine took it


class Engine(Protocol):
    """What the tracer asks of an engine. ``on_event`` (given at construction)
    receives SocketCall and StateChange objects from :meth:`poll`."""

    name: str
    # Once open: how the calls are seen ("fexit" or "tracepoints"), and the
    # optional parts the kernel did not take, with why (CoreEngine.off).
    probes: str
    off: dict[str, str]

    def open(self) -> None: ...
    def poll(self, timeout_ms: int) -> None: ...
    def lost_total(self) -> int: ...  # records a full ring dropped since open()
    def limited_total(self) -> int: ...  # failures over their port's rate since open()
    def detach(self) -> None: ...  # stop the probes; maps stay readable
    def close(self) -> None: ...
    def closer(self, family: str, local: Endpoint, remote: Endpoint) -> Closer | None: ...
    def snapshot(self, port: int, protocols: Iterable[str], netns_fd: int | None,
                 netns_inode: int, sysctls: Iterable[str], holders: bool
                 ) -> Snapshot: ...
    def fd_opts(self, holders: dict[int, list[Holder]]) -> dict[int, SockOpts]: ...
    def owner(self, skaddr: int) -> Task | None: ...
    def recent(self, port: int) -> list[StateChange] | None: ...


POLL_BUDGET_S = 0.05  # one pass of a poll over the rings
STOP = -errno.ECANCELED  # a ring callback's "enough for this pass" (libbpf and bcc alike)
# Slots of the probes' lost map: the events ring, the failures ring was full;
# a watched port's failure over its rate (PT_RATE_MAX per PT_RATE_NS).
LOST_FULL = (header.value("PT_LOST_EVENTS"), header.value("PT_LOST_FAILURES"))
LOST_LIMITED = header.value("PT_LOST_LIMITED")
RATE_MAX, RATE_WINDOW_MS = header.value("PT_RATE_MAX"), header.value("PT_RATE_NS") // 1_000_000


class PollBudget:
    """How long the ring callbacks may go on within one pass of a poll:
    under a sustained flood libbpf would otherwise keep delivering records
    and never return (tools/lib/bpf/ringbuf.c: ringbuf_process_ring loops
    while new data arrives), so signals and lost counts would wait for the
    flood's end. A callback returns :meth:`after_record`; STOP ends the pass,
    the record consumed all the same."""

    def __init__(self, seconds: float = POLL_BUDGET_S) -> None:
        self.seconds = seconds
        self._deadline = 0.0

    def poll(self, wait: Callable[[], object], consume: Callable[[], object]) -> None:
        """Two passes, each with a fresh budget: ``wait`` (epoll: rings in
        any order), then ``consume`` (rings in their order, the failures ring
        first), so the failures ring is served every poll however long a
        flood on the other lasts."""
        self._deadline = time.monotonic() + self.seconds
        wait()
        self._deadline = time.monotonic() + self.seconds
        consume()

    def after_record(self) -> int:
        return STOP if time.monotonic() > self._deadline else 0


def side_by_side(calls: Iterable[Callable[[], object]]) -> None:
    """Run ``calls`` in threads and wait for all. For detaching probes: each
    tracepoint detach waits for an RCU grace period (kernel/tracepoint.c:
    tracepoint_synchronize_unregister), ~65 ms on a 2-CPU VM, and detaches
    that wait side by side share grace periods. ctypes releases the GIL."""
    threads = [threading.Thread(target=call) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@dataclass(frozen=True)
class Choice:
    name: str  # core | bcc
    reason: str  # why, as the ready event says it


def core_object() -> Path:
    override = os.environ.get("PORTRACE_CORE_OBJECT")
    return Path(override) if override else header.bpf_dir() / CORE_OBJECT


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


def require_tracing(tracepoints: Iterable[str], engine: str) -> Path:
    """What every engine needs, cheapest first: the capabilities ``engine``
    cannot run without, tracefs and these tracepoints (``group/name``).
    Returns the tracefs root.

    Raises NeedsRoot, BpfUnavailable, NoTracefs, MissingTracepoint.
    """
    capabilities.require(engine)
    tracefs = find_tracefs()
    for tp in tracepoints:
        if not (tracefs / "events" / tp).is_dir():
            raise errors.MissingTracepoint(
                f"this kernel has no tracepoint {tp.replace('/', ':')} "
                f"(looked in {tracefs}/events); portrace needs it"
                + (" (CONFIG_FTRACE_SYSCALLS)" if tp.startswith("syscalls") else "")
            )
    return tracefs
