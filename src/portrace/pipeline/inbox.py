"""The bounded hand-off from the thread that drains the ring buffers to the
thread that diagnoses: draining must never wait for a diagnosis, and no flood
may grow portrace's memory or delay a fresh failure behind a stale backlog.

- Transitions and successful calls keep their order, up to ``STREAM_MAX``.
- Failures wait under their coalescing key (process, call, address, errno):
  an identical failure that arrives while one waits only counts as its
  repeat. Each port has its own line of at most ``PER_PORT_MAX`` keys (the
  oldest dropped first), and ports take turns: a flood of distinct failures
  on one port cannot push another port's failure out or hold it back.
- Within a port, the newest waiting failure is diagnosed first: its blocker
  is the likeliest to still exist.

Whatever is dropped is counted, and reported as ``lost`` with source ``queue``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass

from portrace.events import SocketCall, StateChange

STREAM_MAX = 65536  # transitions and successes waiting to be emitted
PER_PORT_MAX = 64  # distinct failures of one port waiting for a diagnosis
PORTS_MAX = 1024  # ports with failures waiting (every-port mode); the stalest goes

FailureKey = tuple[int, str, str, str, int, int]  # pid, call, family, addr, port, errno


def failure_key(ev: SocketCall) -> FailureKey:
    return (ev.pid, ev.call, ev.family, ev.addr, ev.port, ev.errno)


@dataclass
class Waiting:
    """A failure waiting for its diagnosis, and the identical ones that came
    while it waited (``repeats``; ``last`` is the newest of them)."""

    first: SocketCall
    last: SocketCall
    repeats: int = 0


class Inbox:
    """Thread-safe; ``put_*`` never block (called from the ring-buffer
    callback), ``take`` blocks the diagnosing thread up to ``timeout`` s."""

    def __init__(self, stream_max: int = STREAM_MAX, per_port_max: int = PER_PORT_MAX,
                 ports_max: int = PORTS_MAX) -> None:
        self._cond = threading.Condition()
        self._stream: deque[StateChange | SocketCall] = deque()
        # port -> its waiting failures by key; the port next in turn comes first
        self._ports: OrderedDict[int, OrderedDict[FailureKey, Waiting]] = OrderedDict()
        self.stream_max = stream_max
        self.per_port_max = per_port_max
        self.ports_max = ports_max
        self.dropped = 0  # records dropped here, since the start

    def put_stream(self, ev: StateChange | SocketCall) -> None:
        with self._cond:
            if len(self._stream) >= self.stream_max:
                self.dropped += 1
                return
            self._stream.append(ev)
            self._cond.notify()

    def put_failure(self, ev: SocketCall) -> None:
        key = failure_key(ev)
        with self._cond:
            line = self._ports.get(ev.port)
            if line is None:
                if len(self._ports) >= self.ports_max:
                    _, stale = self._ports.popitem(last=True)  # the last in turn
                    self.dropped += sum(1 + w.repeats for w in stale.values())
                line = self._ports[ev.port] = OrderedDict()
            waiting = line.get(key)
            if waiting is not None:
                waiting.repeats += 1
                waiting.last = ev
                line.move_to_end(key)
                return
            if len(line) >= self.per_port_max:
                _, old = line.popitem(last=False)
                self.dropped += 1 + old.repeats
            line[key] = Waiting(first=ev, last=ev)
            self._cond.notify()

    def take(self, timeout: float) -> tuple[list[StateChange | SocketCall], Waiting | None]:
        """Everything streamed so far, in order, and the newest waiting
        failure of the port whose turn it is (or None); both empty after
        ``timeout`` s with nothing."""
        with self._cond:
            if not self._stream and not self._ports:
                self._cond.wait(timeout)
            stream = list(self._stream)
            self._stream.clear()
            failure = None
            if self._ports:
                port, line = next(iter(self._ports.items()))
                failure = line.popitem(last=True)[1]
                if line:
                    self._ports.move_to_end(port)  # its next one waits for the others
                else:
                    del self._ports[port]
            return stream, failure

    def abandon(self) -> None:
        """Drop everything waiting (portrace is stopping), counted in ``dropped``."""
        with self._cond:
            self.dropped += len(self._stream) + sum(1 + w.repeats for line in self._ports.values()
                                                    for w in line.values())
            self._stream.clear()
            self._ports.clear()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()
