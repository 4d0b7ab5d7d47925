"""The pipeline: probes -> typed events -> socket snapshot -> verdict -> sinks.

A failed bind is diagnosed inside the ring-buffer callback, before the next
record is read: the blocker may be gone a moment later, and so may the failing
process whose network namespace says where to look.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from datetime import datetime, timezone

import psutil

from portrace import diagnose, sockets
from portrace.events import (
    BindAttempt,
    BindError,
    Closer,
    Endpoint,
    Event,
    Lost,
    Ready,
    StateChange,
    Task,
)
from portrace.probes import Probes

Sink = Callable[[Event], None]

HISTORY_PER_PORT = 64  # transitions kept per watched port, for "blocker gone"
MAX_BINDERS = 4096  # bound address -> who bound it last, most recent kept
SYSCTLS = ("net.ipv4.tcp_fin_timeout",)  # what the verdicts quote, per netns


class Tracer:
    """Watches ``ports`` (empty: every port) and hands every event to ``sink``.

    ``pid``: only report failures of this process (tgid). Raises the
    :mod:`portrace.errors` of ``Probes.open`` from :meth:`start`.
    """

    def __init__(self, ports: Iterable[int], sink: Sink, pid: int | None = None,
                 ringbuf_pages: int = 64) -> None:
        self.ports = sorted(set(ports))
        self.sink = sink
        self.pid = pid
        self.probes = Probes(self.ports, self._on_event, ringbuf_pages=ringbuf_pages)
        self.history: dict[int, deque[StateChange]] = {}
        self.binders: OrderedDict[diagnose.BoundAddress, Task] = OrderedDict()
        self.lost_total = 0

    def start(self) -> Ready:
        self.probes.open()
        ready = Ready(ts=datetime.now(timezone.utc), engine="bcc", ports=self.ports,
                      kernel=os.uname().release)
        self.sink(ready)
        return ready

    def run(self, stop: threading.Event, poll_ms: int = 100) -> None:
        """Poll until ``stop`` is set. Lost records are reported as they are counted."""
        while not stop.is_set():
            self.probes.poll(poll_ms)
            self._report_lost()
        self.probes.poll(0)
        self._report_lost()

    def close(self) -> None:
        self.probes.close()

    def _report_lost(self) -> None:
        lost = self.probes.take_lost()
        if lost:
            self.lost_total += lost
            self.sink(Lost(ts=datetime.now(timezone.utc), count=lost))

    def _on_event(self, ev: StateChange | BindAttempt) -> None:
        if isinstance(ev, StateChange):
            self.history.setdefault(ev.local.port, deque(maxlen=HISTORY_PER_PORT)).append(ev)
            self.sink(ev)
        elif ev.ok:
            self._remember_binder(ev)
            if self.pid is None or ev.pid == self.pid:
                self.sink(ev)
        elif self.pid is None or ev.pid == self.pid:
            self.sink(self.diagnose(ev))

    def _remember_binder(self, ev: BindAttempt) -> None:
        # Keyed by address, not by the socket's inode: reading the inode means
        # readlink(/proc/pid/fd/N), which pins the file (proc_fd_link takes a
        # reference), so a socket closed meanwhile would be released late, by
        # us, and the process's next bind() would fail with EADDRINUSE.
        key = (ev.family, ev.addr, ev.port)
        self.binders[key] = Task(pid=ev.pid, tid=ev.tid, comm=ev.comm, ts=ev.ts)
        self.binders.move_to_end(key)
        while len(self.binders) > MAX_BINDERS:
            self.binders.popitem(last=False)

    def diagnose(self, attempt: BindAttempt) -> BindError:
        """Snapshot the port in the failing thread's netns and judge it."""
        netns_fd, netns = sockets.open_netns(attempt.pid, attempt.tid)
        try:
            protocol = sockets.socket_protocol(attempt.pid, attempt.fd) or attempt.protocol
            attempt = dataclasses.replace(attempt, protocol=protocol)
            cmdline = _cmdline(attempt.pid)
            req = diagnose.Request.of(attempt)
            snap = sockets.Snapshot(sockets=[])
            if attempt.errno == diagnose.EADDRINUSE:
                protos = ("tcp", "udp") if protocol == "unknown" else (protocol,)
                snap = sockets.snapshot(attempt.port, protos, netns_fd, SYSCTLS)
            lookup_ms = (time.time() - attempt.ts.timestamp()) * 1000.0
        finally:
            if netns_fd is not None:
                os.close(netns_fd)
        blockers = diagnose.find_blockers(req, snap.sockets, snap.holders,
                                          self._closers(snap.sockets), self.binders)
        last_seen = None
        if not blockers:
            seen = self.history.get(attempt.port)
            last_seen = seen[-1] if seen else None
        verdict = diagnose.verdict(req, attempt, blockers, snap.sysctls, last_seen,
                                   netns.source)
        return BindError(attempt=attempt, cmdline=cmdline, netns=netns,
                         blockers=tuple(blockers), verdict=verdict, lookup_ms=lookup_ms,
                         last_seen=last_seen)

    def _closers(self, socks: list[sockets.SocketEntry]
                 ) -> dict[tuple[str, Endpoint, Endpoint], Closer]:
        out = {}
        for s in socks:
            if s.minisock and s.remote is not None:
                c = self.probes.closer(s.family, s.local, s.remote)
                if c is not None:
                    out[(s.family, s.local, s.remote)] = c
        return out


def _cmdline(pid: int) -> list[str] | None:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return None
