"""``portrace check``: would bind() of a described socket succeed now, and if
not, what blocks it; with ``--wait``, block until it would.

No probe runs: the socket is described (address, protocol, options, owner
uid), the port's sockets are read now, and from that observation on it takes
a traced failure's path (portrace.observe.observation, portrace.judge.judgement). The
sockets come from the CO-RE engine's iterators where it loads (each socket's
own options, minisocks' included), else from sock_diag, which needs no BPF
and no root (then options of live sockets are unknown, and other users'
holders are not named).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from portrace import errors
from portrace.events import Check, Netns, SocketCall, SockOpts
from portrace.judge import diagnose, judgement, phrases
from portrace.kernel import capabilities, chooser, engine, lookup, namespaces, sockdiag
from portrace.observe import observation

POLL_S = 0.25  # --wait: how often the port is looked at again
ENGINES = ("auto", "core", "sock_diag")


@dataclass(frozen=True)
class Wanted:
    """The socket a deploy is about to bind: ``protocol`` tcp|udp, ``addr``
    (IPv4 or IPv6 text), ``port``, its options as it will set them before
    bind(), and ``uid`` its owner's (SO_REUSEPORT compares it; None: not given)."""

    protocol: str
    addr: str
    port: int
    opts: SockOpts
    uid: int | None = None

    @property
    def family(self) -> str:
        return "inet6" if ipaddress.ip_address(self.addr).version == 6 else "inet"

    def attempt(self, ts: datetime) -> SocketCall:
        """The bind() as the probes would report it failing: what the verdicts judge."""
        return SocketCall(
            ts=ts, call="bind", pid=0, tid=0, comm="portrace-check", uid=self.uid or 0, fd=-1,
            errno=diagnose.EADDRINUSE, protocol=self.protocol, family=self.family,
            addr=self.addr, port=self.port, cgroup_id=0, opts=self.opts, opts_source="kernel",
            sk_uid=self.uid)


class Looker:
    """Reads a port's sockets in one namespace: the CO-RE engine's iterators
    or sock_diag (``engine`` after open: ``core`` | ``sock_diag``).

    ``netns_fd``: the namespace (None: portrace's own); the caller keeps it open.
    Raises, from open(), what capabilities.require and the CO-RE engine raise
    when ``core`` was asked for; ``auto`` falls back to sock_diag instead.
    """

    def __init__(self, requested: str, netns_fd: int | None, netns: Netns) -> None:
        self.requested = requested
        self.netns_fd = netns_fd
        self.netns = netns
        self.engine = "sock_diag"
        self._core: Any = None

    def open(self) -> Looker:
        if self.requested == "sock_diag":
            return self
        if self.requested == "core":
            capabilities.require("core")
        elif capabilities.missing("core"):
            return self  # auto without the right to load BPF: sock_diag, asked nothing else
        why_not = chooser.core_unavailable()
        if why_not is not None:
            if self.requested == "core":
                raise chooser.core_required(why_not)
            return self
        core = chooser.make(engine.Choice("core", "check"), [], lambda _ev: None,
                            ringbuf_pages=1, states=False, attach=False)
        try:
            core.open()
        except errors.PortraceError:
            if self.requested == "core":
                raise
            return self
        self._core, self.engine = core, "core"
        return self

    def close(self) -> None:
        if self._core is not None:
            self._core.close()
            self._core = None

    def snapshot(self, port: int, protocol: str) -> engine.Snapshot:
        if self._core is not None:
            return self._core.snapshot(port, (protocol,), self.netns_fd, self.netns.inode,
                                       lookup.VERDICT_SYSCTLS, holders=True)
        return sockdiag.snapshot(port, (protocol,), self.netns_fd, lookup.VERDICT_SYSCTLS)


def check_once(wanted: Sequence[Wanted], looker: Looker, pid: int | None) -> list[Check]:
    """One answer per wanted socket, from a snapshot taken now: observed as a
    described socket, judged and made an event as a traced failure is."""
    now = datetime.now(timezone.utc)
    out = []
    for w in wanted:
        snap = looker.snapshot(w.port, w.protocol)
        obs = observation.described(w.attempt(now), snap, looker.netns, looker.netns_fd, pid)
        out.append(judgement.check_event(obs, judgement.judge(obs), now, looker.engine, w.uid))
    return out


def wait_free(wanted: Sequence[Wanted], looker: Looker, pid: int | None,
              timeout_s: float | None, on_blocked: Callable[[Check], None],
              poll_s: float = POLL_S) -> list[Check]:
    """Check until every wanted socket would bind, or ``timeout_s`` (None:
    no limit) has passed. ``on_blocked`` hears each first blocked answer.
    Returns the last answers, with how long was waited and for what."""
    start = time.monotonic()
    first: dict[int, Check] = {}
    while True:
        answers = check_once(wanted, looker, pid)
        for i, a in enumerate(answers):
            if not a.free and i not in first:
                first[i] = a
                on_blocked(a)
        waited = time.monotonic() - start
        if all(a.free for a in answers) or (timeout_s is not None and waited >= timeout_s):
            return [_waited(a, first.get(i), waited) for i, a in enumerate(answers)]
        time.sleep(poll_s if timeout_s is None else max(0.0, min(poll_s, timeout_s - waited)))


def _waited(a: Check, first: Check | None, waited: float) -> Check:
    what: tuple[str, ...] = ()
    if first is not None:  # the blockers first seen, or what refused the address or port
        what = tuple(phrases.blocker(b) for b in first.blockers) or (
            (first.verdict.summary,) if first.verdict else ())
    return dataclasses.replace(a, waited_s=waited, waited_for=what)


@contextlib.contextmanager
def namespace(name: str | None, pid: int | None) -> Iterator[tuple[int | None, Netns]]:
    """The namespace to look in: ``ip netns`` NAME, a process's, or portrace's
    own; an fd on it (None for our own) and its Netns. Raises BadNamespace."""
    own = os.stat("/proc/self/ns/net").st_ino
    if name is None and pid is None:
        yield None, Netns(inode=own, source="own", name=namespaces.netns_name(own))
        return
    path = f"{namespaces.NETNS_NAMES}/{name}" if name is not None else f"/proc/{pid}/ns/net"
    if name is not None and ("/" in name or name in (".", "..")):
        raise errors.BadNamespace(f"--netns {name!r}: not a namespace name")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        what = f"--netns {name}" if name is not None else f"--pid {pid}"
        raise errors.BadNamespace(f"{what}: cannot open {path}: {exc.strerror}") from None
    try:
        inode = os.fstat(fd).st_ino
        source = "pinned" if name is not None else "process"
        yield (None if inode == own else fd), Netns(inode=inode, source=source,
                                                    name=namespaces.netns_name(inode))
    finally:
        os.close(fd)
