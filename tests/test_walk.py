"""Issue 19: the CO-RE engine's per-port lookup (walk_port over the port's own
hash bucket, holders from the binders' fds) against the iterators it replaces,
on real sockets in a scratch netns, with both engines attached before the
sockets exist, as the tracer has them.

Each case asserts that both paths name the same sockets and the same holders,
and which path the lookup took: the binders alone only when their fds account
for every reference to each socket's file, the host walk otherwise."""

from __future__ import annotations

import array
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PORTS, bpf_unavailable, need_root

from portrace import errors
from portrace.commands.stage import ScratchNetns, Staged
from portrace.kernel import cgroups, namespaces
from portrace.kernel.core import WALK, CoreEngine
from portrace.kernel.engine import Snapshot

WALK_PORT = PORTS[-1] + 51  # watched by this module's engines only
NOWALK_OBJECT = Path(__file__).parent / "bpf" / "core_nowalk.bpf.o"  # make test-objects


def view(snap: Snapshot) -> list[Any]:
    """What a verdict reads of a snapshot, in a comparable order."""
    return sorted((s.protocol, s.family, s.state, str(s.local), str(s.remote), s.inode,
                   s.opts, sorted((h.pid, h.fds) for h in snap.holders.get(s.inode, ())))
                  for s in snap.sockets)


class Lookups:
    """The engine under test (walk) and its reference (iterators), attached."""

    def __init__(self, ns: ScratchNetns, **walk_args: Any) -> None:
        self.ns = ns
        self.engines = {w: CoreEngine([WALK_PORT], lambda ev: None, walk=w, **walk_args)
                        for w in (True, False)}
        for e in self.engines.values():
            try:
                e.open()
            except errors.PortraceError as exc:
                bpf_unavailable(str(exc))
        self.fd = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
        self.inode = os.fstat(self.fd).st_ino

    def sock(self, family: int, kind: int) -> socket.socket:
        """A socket made in the scratch netns (a socket keeps its creator's)."""
        with namespaces.entered(self.fd):
            return socket.socket(family, kind)

    def both(self, protocols: tuple[str, ...] = ("tcp",)) -> tuple[Snapshot, Snapshot]:
        """(walk, iterators) snapshots of the port; they must agree."""
        snaps = [self.engines[w].snapshot(WALK_PORT, protocols, self.fd, self.inode, (), True)
                 for w in (True, False)]
        assert view(snaps[0]) == view(snaps[1]), "the walk and the iterators disagree"
        assert snaps[1].source is not None and snaps[1].source.holders in ("host", "none")
        return snaps[0], snaps[1]

    def close(self) -> None:
        for e in self.engines.values():
            e.close()
        os.close(self.fd)


@pytest.fixture
def lookups() -> Iterator[Lookups]:
    need_root()
    with ScratchNetns(f"portrace-walk-{os.getpid()}") as ns:
        lk = Lookups(ns)
        try:
            yield lk
        finally:
            lk.close()


def listener(lk: Lookups, addr: str = "127.0.0.1", family: int = socket.AF_INET,
             v6only: bool | None = None) -> socket.socket:
    s = lk.sock(family, socket.SOCK_STREAM)
    if v6only is not None:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    s.bind((addr, WALK_PORT))
    s.listen(16)
    return s


def client(lk: Lookups, addr: str = "127.0.0.1") -> socket.socket:
    c = lk.sock(socket.AF_INET, socket.SOCK_STREAM)
    c.connect((addr, WALK_PORT))
    return c


def states(snap: Snapshot) -> list[str]:
    return sorted(s.state for s in snap.sockets)


def holder_pids(snap: Snapshot) -> set[int]:
    return {h.pid for held in snap.holders.values() for h in held}


def test_listener_children_time_wait_and_fin_wait2_come_from_the_bucket(lookups):
    lk = lookups
    lst = listener(lk)
    kept = client(lk)
    child, _ = lst.accept()
    # The server closes first while its client stays: FIN_WAIT2 minisock.
    c2 = client(lk)
    a2, _ = lst.accept()
    a2.close()
    # The server closes first and the client closes too: TIME_WAIT minisock.
    c3 = client(lk)
    a3, _ = lst.accept()
    a3.close()
    time.sleep(0.05)
    c3.close()
    time.sleep(0.1)
    walk, _ = lk.both()
    assert states(walk) == ["ESTABLISHED", "FIN_WAIT2", "LISTEN", "TIME_WAIT"]
    assert walk.source is not None
    assert walk.source.sockets == {"tcp": "bind_hash"} and walk.source.holders == "binder"
    assert walk.source.fallback is None
    assert holder_pids(walk) == {os.getpid()}
    for s in (lst, kept, child, c2):
        s.close()


def test_a_forked_holder_sends_the_lookup_over_the_host(lookups):
    lk = lookups
    lst = listener(lk)
    # The child inherits the listening fd (fork + exec), the parent keeps it.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             pass_fds=[lst.fileno()])
    try:
        time.sleep(0.2)
        walk, _ = lk.both()
        assert walk.source is not None and walk.source.holders == "host"
        assert f"1 reference(s) beyond the fds of {os.getpid()}" in (walk.source.fallback or "")
        assert holder_pids(walk) == {os.getpid(), child.pid}
    finally:
        child.kill()
        child.wait()
        lst.close()


def _send_fd(over: socket.socket, fd: int) -> None:
    over.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def test_an_fd_in_flight_over_scm_rights_is_a_reference_no_process_holds(lookups):
    lk = lookups
    lst = listener(lk)
    a, b = socket.socketpair()
    _send_fd(a, lst.fileno())  # queued on b, never received
    try:
        walk, _ = lk.both()
        assert walk.source is not None and walk.source.holders == "host"
        assert holder_pids(walk) == {os.getpid()}
    finally:
        for s in (a, b, lst):
            s.close()


def test_an_fd_received_over_scm_rights_is_counted_with_its_receiver(lookups):
    lk = lookups
    lst = listener(lk)
    a, b = socket.socketpair()
    _send_fd(a, lst.fileno())
    _, fds, _, _ = socket.recv_fds(b, 1, 1)
    try:
        walk, _ = lk.both()
        assert walk.source is not None and walk.source.holders == "binder"
        [held] = walk.holders.values()
        assert [(h.pid, len(h.fds)) for h in held] == [(os.getpid(), 2)]
    finally:
        os.close(fds[0])
        for s in (a, b, lst):
            s.close()


def test_a_thread_blocked_in_accept_holds_a_reference_of_its_own(lookups):
    lk = lookups
    lst = listener(lk)
    accepted: list[socket.socket] = []
    t = threading.Thread(target=lambda: accepted.append(lst.accept()[0]))
    t.start()
    time.sleep(0.2)  # in accept(): fdget() took a reference, the fd table being shared
    try:
        walk, _ = lk.both()
        assert walk.source is not None and walk.source.holders == "host"
        assert holder_pids(walk) == {os.getpid()}
    finally:
        c = client(lk)
        t.join()
        for s in (c, *accepted, lst):
            s.close()


def test_a_bound_only_socket_is_in_the_bucket(lookups):
    lk = lookups
    s = lk.sock(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", WALK_PORT))
    try:
        walk, it = lk.both()
        assert states(walk) == ["CLOSE"] and walk.source is not None
        assert walk.source.sockets == {"tcp": "bind_hash"} and walk.source.holders == "binder"
        # Without the bucket, only the host's fds find it.
        assert it.source is not None and it.source.holders == "host"
    finally:
        s.close()


def test_udp_v4_and_v6_and_a_dual_stack_listener(lookups):
    lk = lookups
    u4 = lk.sock(socket.AF_INET, socket.SOCK_DGRAM)
    u4.bind(("127.0.0.1", WALK_PORT))
    u6 = lk.sock(socket.AF_INET6, socket.SOCK_DGRAM)
    u6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    u6.bind(("::", WALK_PORT))
    dual = listener(lk, "::", socket.AF_INET6, v6only=False)
    try:
        walk, _ = lk.both(("tcp", "udp"))
        assert walk.source is not None
        assert walk.source.sockets == {"tcp": "bind_hash", "udp": "udp_hash"}
        assert sorted((s.protocol, s.family) for s in walk.sockets) == [
            ("tcp", "inet6"), ("udp", "inet"), ("udp", "inet6")]
        assert walk.source.holders == "binder"
    finally:
        for s in (u4, u6, dual):
            s.close()


@contextlib.contextmanager
def engines(ns: ScratchNetns, **args: Any) -> Iterator[Lookups]:
    lk = Lookups(ns, **args)
    try:
        yield lk
    finally:
        lk.close()


FALLBACKS = {  # how the walk is made to fail -> (engine arguments, what the event says)
    "step cap 1": ({"walk_steps": 1}, "more than 1 list nodes"),
    "object without walk_port": ({}, f"has no {WALK} program"),
}


@pytest.mark.parametrize("how", list(FALLBACKS))
def test_the_iterators_answer_when_the_walk_cannot_and_the_event_says_why(how, monkeypatch):
    need_root()
    args, said = FALLBACKS[how]
    if how == "object without walk_port":
        if not NOWALK_OBJECT.exists():
            pytest.fail(f"{NOWALK_OBJECT} missing: make test-objects builds it")
        monkeypatch.setenv("PORTRACE_CORE_OBJECT", str(NOWALK_OBJECT))
    with ScratchNetns(f"portrace-walkfb-{os.getpid()}") as ns, engines(ns, **args) as lk:
        lst = listener(lk)
        c = client(lk)
        child, _ = lst.accept()
        try:
            walk, it = lk.both()
            assert walk.source is not None and it.source is not None
            assert walk.source.sockets == {"tcp": "iterators"}
            assert said in (walk.source.fallback or ""), walk.source.fallback
            assert states(walk) == ["ESTABLISHED", "LISTEN"]
        finally:
            for s in (c, child, lst):
                s.close()


@contextlib.contextmanager
def cgroup_of_its_own() -> Iterator[str]:
    """A v2 cgroup of the test's own; yields its cgroup.procs path."""
    mount = cgroups.cgroup2_mount()
    assert mount is not None, "no cgroup2 mount"
    path = f"{mount}/portrace-walk-{os.getpid()}"
    os.mkdir(path)
    try:
        yield f"{path}/cgroup.procs"
    finally:
        for _ in range(50):  # its processes are gone once the kernel reaped them
            try:
                os.rmdir(path)
                break
            except OSError:
                time.sleep(0.1)


def test_a_forked_holder_in_its_binders_cgroup_is_found_there_not_on_the_host(lookups):
    lk = lookups
    with cgroup_of_its_own() as procs:
        p = Staged("listen-forks", "127.0.0.1", WALK_PORT, "--count", "2", "--pause",
                   name="master", netns=lk.ns, first="paused")
        try:
            with open(procs, "w") as f:
                f.write(str(p.pid))
            pids = {int(x) for x in p.go().split()}
            walk, _ = lk.both()
            assert walk.source is not None and walk.source.holders == "cgroup", walk.source
            assert "reference(s) beyond the fds of" in (walk.source.fallback or "")
            assert holder_pids(walk) == pids and len(pids) == 3
        finally:
            p.release()
