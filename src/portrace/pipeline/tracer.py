"""The traced path: engine -> typed events -> observation -> judgement -> sinks.

Two threads. The caller's drains the ring buffers (each poll bounded in time
by the engine), reports lost records and honours ``stop``; it only decodes and
hands over (portrace.pipeline.inbox). The diagnosing thread takes the newest failure
first, observes it in the failing socket's namespace, judges it and emits it
(Tracer.diagnose): the blocker may be gone a moment later, so a fresh failure must not
wait behind a stale backlog, and no flood may make the drain or a signal wait.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

from portrace import errors
from portrace.events import (
    CallError,
    ErrorRecord,
    Event,
    Lost,
    Ready,
    Repeats,
    SocketCall,
    StateChange,
    failure_summary,
)
from portrace.judge import diagnose, judgement
from portrace.kernel import capabilities, chooser, engine
from portrace.observe import context, observation
from portrace.pipeline.inbox import FailureKey, Inbox, Waiting, failure_key

Sink = Callable[[Event], None]

HISTORY_PER_PORT = 64  # transitions kept per watched port, for "blocker gone"
MAX_BINDERS = 4096  # bound addresses remembered, most recent kept
BINDERS_PER_ADDRESS = 8  # recent successful binds kept per address
STOP_GRACE_S = 0.2  # after stop, how long a diagnosis under way may finish
LOST_EVERY_S = 1.0  # lost records are summed and reported at most this often


class Tracer:
    """Watches ``ports`` (empty: every port) and hands every event to ``sink``.

    ``pid``: only report failures of this process (tgid). Raises the
    :mod:`portrace.errors` of the engine's ``open`` from :meth:`start`.
    """

    def __init__(self, ports: Iterable[int], sink: Sink, pid: int | None = None,
                 ringbuf_pages: int = 64, options: dict[str, Any] | None = None,
                 coalesce_s: float = 1.0, engine_name: str = "auto",
                 states: bool = True) -> None:
        self.ports = sorted(set(ports))
        self.sink = sink
        self.pid = pid
        self.engine_name = engine_name
        self.ringbuf_pages = ringbuf_pages
        self.states = states  # stream transitions to the sink (--states, evidence)
        self._engine: engine.Engine | None = None
        self.history: dict[int, deque[StateChange]] = {}
        self.binders: OrderedDict[diagnose.BoundAddress, deque[SocketCall]] = OrderedDict()
        self.coalesce_s = coalesce_s
        # failure key -> the last report of it, and its repeats counted since
        self._reported: OrderedDict[FailureKey, _Coalesced] = OrderedDict()
        self.options = options
        self.host = context.host_facts()
        self.inbox = Inbox()
        self._lost_seen = {"kernel": 0, "limit": 0, "queue": 0}  # by Lost.source, reported
        self._sink_lock = threading.Lock()
        self._errors: dict[str, int] = {}
        self._stop = threading.Event()
        self._stopping = threading.Event()  # run() is ending: the worker finishes
        self._worker: threading.Thread | None = None
        self.broken_pipe = False  # stdout's reader went away: stop, exit 0

    def start(self) -> Ready:
        """Load and attach the chosen engine. Raises the portrace.errors of
        chooser.choose and of the engine's open(); ``auto`` falls back to bcc
        when the kernel refuses the CO-RE object, and says so in ``ready``."""
        choice = chooser.choose(self.engine_name)
        try:
            self._engine = self._open(choice)
        except errors.CoreLoadFailed as exc:
            if self.engine_name != "auto":
                raise
            choice = engine.Choice("bcc", f"CO-RE engine could not load: {exc}")
            self._engine = self._open(choice)
        ready = Ready(ts=datetime.now(timezone.utc), engine=choice.name,
                      engine_reason=choice.reason, probes=self._engine.probes,
                      left_out={**self._engine.off, **{
                          c.name: c.without for c in capabilities.lacking()}},
                      ports=self.ports,
                      kernel=os.uname().release, host=self.host, options=self.options)
        self._emit(ready)
        return ready

    def _open(self, choice: engine.Choice) -> engine.Engine:
        probes = chooser.make(choice, self.ports, self._on_event,
                             ringbuf_pages=self.ringbuf_pages, states=self.states)
        probes.open()
        return probes

    @property
    def engine(self) -> engine.Engine:
        if self._engine is None:
            raise RuntimeError("Tracer.start() was not called")
        return self._engine

    def run(self, stop: threading.Event, poll_ms: int = 100) -> None:
        """Drain the ring buffers until ``stop`` is set (by a signal, or by
        portrace itself when stdout's reader has gone); returns within about
        ``poll_ms`` + the engine's per-poll budget + STOP_GRACE_S of it.
        Lost records are reported as they are counted."""
        self._stop = stop
        worker = self._worker = threading.Thread(target=self._work, name="portrace-diagnosis",
                                                 daemon=True)
        worker.start()
        reported = 0.0
        while not stop.is_set():
            self.engine.poll(poll_ms)
            if time.monotonic() - reported >= LOST_EVERY_S:  # one line a second in a flood
                self._report_lost()
                reported = time.monotonic()
        self.engine.poll(0)
        self._stopping.set()
        self.inbox.wake()
        worker.join(STOP_GRACE_S)
        if worker.is_alive():  # a long diagnosis: what still waits is lost, and counted
            self.inbox.abandon()
        self._report_lost(wait=not worker.is_alive())

    def close(self) -> None:
        """Detach the probes, and free the engine unless a diagnosis still
        reads its maps after ``run`` gave up waiting for it (then the
        process's exit does)."""
        if self._engine is None:
            return
        self._engine.detach()
        if not self.busy:
            self._engine.close()

    def _report_lost(self, wait: bool = False) -> None:
        """Report what was lost since the last report. From the drain thread
        it never waits for the sink (a reader that stops reading stdout must
        not stop the drain or a signal): if the sink is busy, the counts wait
        for the next report."""
        if not self._sink_lock.acquire(timeout=5.0 if wait else 0.05):
            return
        try:
            now = datetime.now(timezone.utc)
            totals = {"kernel": self.engine.lost_total(), "limit": self.engine.limited_total(),
                      "queue": self.inbox.dropped}
            for source, total in totals.items():
                if total > self._lost_seen[source]:
                    self._emit_locked(Lost(ts=now, count=total - self._lost_seen[source],
                                           source=source))
                    self._lost_seen[source] = total
        finally:
            self._sink_lock.release()

    @property
    def lost_total(self) -> int:
        """Records a full ring buffer dropped, as reported so far."""
        return self._lost_seen["kernel"]

    @property
    def busy(self) -> bool:
        """Whether the diagnosing thread outlived ``run`` (a long diagnosis,
        or a sink that blocks): then only the process's exit ends it."""
        return self._worker is not None and self._worker.is_alive()

    def _emit(self, ev: Event) -> None:
        """Hand one event to the sink, from either thread."""
        with self._sink_lock:
            self._emit_locked(ev)

    def _emit_locked(self, ev: Event) -> None:
        """A sink that raises is counted and reported on stderr, never
        allowed to kill a thread; a closed stdout (EPIPE) stops portrace."""
        try:
            self.sink(ev)
        except BrokenPipeError:
            self.broken_pipe = True
            self._stop.set()
        except Exception as exc:  # noqa: BLE001 - the boundary: count, say, go on
            n = self._count_error("output")
            if n == 1 or n % 1000 == 0:
                print(f"portrace: an event could not be written ({n} so far): "
                      f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    def _count_error(self, where: str) -> int:
        self._errors[where] = self._errors.get(where, 0) + 1
        return self._errors[where]

    def _on_event(self, ev: StateChange | SocketCall) -> None:
        """From the ring-buffer callback: hand over, never wait."""
        if isinstance(ev, StateChange) or ev.ok:
            self.inbox.put_stream(ev)
        elif self.pid is None or ev.pid == self.pid:
            self.inbox.put_failure(ev)

    def _work(self) -> None:
        """The diagnosing thread: streamed events in order, then the newest
        waiting failure; until stopped and the inbox is empty."""
        while True:
            stream, waiting = self.inbox.take(0.2)
            for ev in stream:
                self._stream(ev)
            if waiting is not None:
                self._failure(waiting)
            self._flush_repeats(time.time() - self.coalesce_s)
            if self._stopping.is_set() and not stream and waiting is None:
                self._flush_repeats(float("inf"))
                return

    def _stream(self, ev: StateChange | SocketCall) -> None:
        if isinstance(ev, StateChange):
            self.history.setdefault(ev.local.port, deque(maxlen=HISTORY_PER_PORT)).append(ev)
            self._emit(ev)
            return
        if ev.call == "bind":
            self._remember_binder(ev)
        if self.pid is None or ev.pid == self.pid:
            # Its failures' repeats come first, so a report sees them in order.
            self._flush_repeats(float("inf"), pid=ev.pid, port=ev.port)
            self._emit(ev)

    def _failure(self, waiting: Waiting) -> None:
        ev = waiting.first
        key = failure_key(ev)
        seen = self._reported.get(key)
        if seen is not None and ev.ts.timestamp() - seen.since.timestamp() < self.coalesce_s:
            seen.count += 1 + waiting.repeats  # a retry loop must not cost a snapshot each
            seen.last = waiting.last
            return
        self._flush_repeats(float("inf"), key=key)
        self._reported[key] = _Coalesced(since=ev.ts, last=waiting.last, count=waiting.repeats)
        self._reported.move_to_end(key)
        while len(self._reported) > MAX_BINDERS:
            self._reported.popitem(last=False)
        try:
            report: Event = self.diagnose(ev)
        except Exception as exc:  # noqa: BLE001 - one failure's diagnosis, not the tracer
            report = ErrorRecord(
                ts=datetime.now(timezone.utc), where="diagnosis",
                message=f"{type(exc).__name__}: {exc}", count=self._count_error("diagnosis"),
                failure=failure_summary(ev))
        if isinstance(report, CallError):
            report = dataclasses.replace(
                report, verdict_ms=(time.time() - ev.ts.timestamp()) * 1000.0)
        self._emit(report)

    def _flush_repeats(self, before: float, key: FailureKey | None = None,
                       pid: int | None = None,
                       port: int | None = None) -> None:
        """Report the repeats counted for failures last reported before
        ``before`` (epoch s): all of them, one key's, or one process's on a port."""
        for k, c in list(self._reported.items()):
            if (not c.count or c.since.timestamp() >= before or (key is not None and k != key)
                    or (pid is not None and (k[0] != pid or k[4] != port))):
                continue
            last = c.last
            self._emit(Repeats(ts=last.ts, since=c.since, call=last.call, pid=last.pid,
                              comm=last.comm, family=last.family, addr=last.addr,
                              port=last.port, errno=last.errno, count=c.count))
            c.count = 0

    def _remember_binder(self, ev: SocketCall) -> None:
        # Keyed by address, not by the socket's inode: reading the inode means
        # readlink(/proc/pid/fd/N), which pins the file (proc_fd_link takes a
        # reference), so a socket closed meanwhile would be released late, by
        # us, and the process's next bind() would fail with EADDRINUSE.
        key = (ev.family, ev.addr, ev.port)
        self.binders.setdefault(key, deque(maxlen=BINDERS_PER_ADDRESS)).append(ev)
        self.binders.move_to_end(key)
        while len(self.binders) > MAX_BINDERS:
            self.binders.popitem(last=False)

    def diagnose(self, attempt: SocketCall) -> CallError:
        """One failure through the stages, each once: observed in its own
        namespace (the kernel's lookup, process facts, owners), judged, and made
        an event. Nothing is looked up in a namespace other than the failing
        socket's: when it cannot be entered or is not known (``netns.source``
        ``gone`` or ``tracer``), no blocker is named."""
        obs = observation.observe(self.engine, attempt, self.binders, self.history)
        return judgement.failure_event(
            obs, judgement.judge(obs), self.host,
            verdict_ms=(time.time() - attempt.ts.timestamp()) * 1000.0)


@dataclasses.dataclass
class _Coalesced:
    since: datetime  # the reported (diagnosed) failure's time
    last: SocketCall  # the latest failure counted as its repeat
    count: int = 0
