"""Prometheus metrics of a recorder (``portrace record --metrics HOST:PORT``),
served by prometheus_client from the typed events the recorder writes: a sink
like any other, so what is scraped and what is on disk are the same events.

Label cardinality is bounded: ``port`` is a watched port; when every port is
watched, the first TOP_PORTS ports that fail get their own label and the rest
are ``other``. A port is *blocked* from its first bind()/listen() failure
with EADDRINUSE until the next successful bind() or listen() on it, which the
probes report for watched ports only: blocked windows are measured there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import start_http_server

from portrace.events import CallError, Event, Lost, Ready, Repeats, SocketCall, errno_name
from portrace.judge.diagnose import EADDRINUSE

TOP_PORTS = 32
OTHER = "other"
# Blocked windows: from a restart's retry (ms) to a TIME_WAIT (60 s) and beyond.
WINDOW_BUCKETS_S = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics:
    """The recorder's metrics in their own registry. ``ports``: the watched
    ports (empty: every port). Call as a sink; :meth:`serve` starts the
    HTTP endpoint (raises OSError when HOST:PORT cannot be bound)."""

    def __init__(self, ports: Iterable[int], registry: CollectorRegistry | None = None) -> None:
        self.ports = set(ports)
        self.registry = registry or CollectorRegistry()
        self._created = time.monotonic()
        self._labelled: set[int] = set()
        self._blocked_since: dict[int, float] = {}  # port -> epoch s of its first failure
        self._lock = threading.Lock()
        r = self.registry
        self.failures = Counter(
            "portrace_failures", "Failed bind(), listen() and connect() calls diagnosed, by "
            "port, call, errno and the verdict's cause (repeats are counted apart).",
            ["port", "call", "errno", "cause"], registry=r)
        self.repeats = Counter(
            "portrace_repeats", "Failures identical to a diagnosed one, counted without "
            "a diagnosis of their own.", ["port", "call"], registry=r)
        self.lost = Counter(
            "portrace_lost_records", "Records lost: kernel (a ring buffer was full), limit "
            "(over a port's rate), queue (portrace's backlog was full).", ["source"], registry=r)
        self.blocked = Gauge(
            "portrace_blocked_ports", "Watched ports whose last bind()/listen() failed with "
            "EADDRINUSE and that nothing has bound or listened on since.", registry=r)
        self.window = Histogram(
            "portrace_blocked_window_seconds", "From a watched port's first EADDRINUSE to "
            "the next successful bind() or listen() on it.", ["port"],
            buckets=WINDOW_BUCKETS_S, registry=r)
        self.startup = Gauge(
            "portrace_probe_startup_seconds", "From the recorder's start to its probes "
            "attached (the ready event).", registry=r)
        self.engine = Info("portrace_engine", "The engine recording, and the kernel.",
                           registry=r)

    def serve(self, host: str, port: int) -> None:
        """Serve /metrics on HOST:PORT from a daemon thread, for the life of
        the process. (prometheus_client 0.16, Debian 12's, returns nothing
        from start_http_server; 0.17+ the server and its thread.)"""
        start_http_server(port, addr=host, registry=self.registry)

    def _port(self, port: int) -> str:
        if self.ports:
            return str(port) if port in self.ports else OTHER
        if port in self._labelled or len(self._labelled) < TOP_PORTS:
            self._labelled.add(port)
            return str(port)
        return OTHER

    def __call__(self, ev: Event) -> None:
        with self._lock:
            self._observe(ev)

    def _observe(self, ev: Event) -> None:
        if isinstance(ev, Ready):
            self.startup.set(time.monotonic() - self._created)
            self.engine.info({"engine": ev.engine, "kernel": ev.kernel})
        elif isinstance(ev, CallError):
            a = ev.attempt
            self.failures.labels(self._port(a.port), a.call, errno_name(a.errno),
                                 ev.verdict.cause).inc()
            if (a.call in ("bind", "listen") and a.errno == EADDRINUSE
                    and a.port in self.ports):
                self._blocked_since.setdefault(a.port, a.ts.timestamp())
        elif isinstance(ev, Repeats):
            self.repeats.labels(self._port(ev.port), ev.call).inc(ev.count)
        elif isinstance(ev, Lost):
            self.lost.labels(ev.source).inc(ev.count)
        elif isinstance(ev, SocketCall) and ev.ok and ev.call in ("bind", "listen"):
            since = self._blocked_since.pop(ev.port, None)
            if since is not None:
                self.window.labels(str(ev.port)).observe(max(0.0, ev.ts.timestamp() - since))
        self.blocked.set(len(self._blocked_since))
