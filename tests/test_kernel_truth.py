"""Rows only kernel truth can pass (issue 8): exact on the CO-RE engine, and on
the bcc engine exact or said to be unknown, never wrong. Each row stages real
processes; some start their own tracer, after the sockets they judge exist."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import PORTS, TracerProcess, bpf_unavailable, need_root

from portrace.commands.stage import ScratchNetns, Staged

TRUTH_PORTS = list(range(PORTS[-1] + 10, PORTS[-1] + 20))  # not the session tracer's

Event = dict[str, Any]


@pytest.fixture
def scratch() -> Iterator[ScratchNetns]:
    need_root()
    with ScratchNetns(f"portrace-kt-{os.getpid()}") as ns:
        yield ns


def _ns_inode(ns: ScratchNetns) -> int:
    return os.stat(f"/run/netns/{ns.name}").st_ino


def start_tracer(engine: str, ports: list[int]) -> TracerProcess:
    t = TracerProcess(ports, engine=engine)
    if t.wait_for(lambda e: e["type"] == "ready", timeout=120) is None:
        code, err = t.stop()
        bpf_unavailable(f"portrace --engine {engine} exited {code}: {err[-800:]}")
    return t


def await_error(t: TracerProcess, pid: int, mark: int = 0) -> Event:
    ev = t.wait_for(lambda e: e["type"].endswith("_error") and e["pid"] == pid, start=mark)
    assert ev is not None, "portrace reported no failure"
    return ev


@pytest.mark.parametrize("old_reuseaddr", [False, True], ids=["old-off", "old-on"])
def test_timewait_of_a_server_older_than_portrace(engine, scratch, old_reuseaddr):
    """The SRE's order: the service runs, portrace starts, the service restarts."""
    port = TRUTH_PORTS[0]
    old = Staged("timewait", "127.0.0.1", port, "--wait",
                 *(["--reuseaddr"] if old_reuseaddr else []), name="old-server",
                 netns=scratch, first="waiting")
    t = start_tracer(engine, [port])
    try:
        assert old.go() and old.proc.wait(10) == 0  # closed first, exited: TIME_WAIT left
        # Held, so the bcc engine reads its netns from /proc: the race of a process that
        # exits at once is test_netns_process_exiting_at_once_never_blames_the_host's.
        new = Staged("bind", "127.0.0.1", port, "--hold", name="new-server", netns=scratch)
        assert new.info == "EADDRINUSE"
        ev = await_error(t, new.pid)
        new.release()
    finally:
        t.stop()
    [tw] = ev["blockers"]
    assert tw["state"] == "TIME_WAIT" and ev["verdict"]["cause"] == "time_wait"
    if engine == "core":  # the minisock's own copy of the flag (inet_twsk_alloc)
        assert tw["options"]["so_reuseaddr"] is old_reuseaddr
        assert tw["options"]["source"] == "kernel"
    else:  # the socket predates the probes: unknown, not a guess
        assert tw["options"]["so_reuseaddr"] is None and tw["options"]["source"] == "unknown"


def test_failing_socket_created_before_portrace(engine, scratch):
    port = TRUTH_PORTS[1]
    holder = Staged("listen", "127.0.0.1", port, "--hold", name="holder", netns=scratch)
    new = Staged("bind", "127.0.0.1", port, "--reuseaddr", "--wait", "--hold",
                 name="new-server", netns=scratch, first="waiting")
    t = start_tracer(engine, [port])
    try:
        assert new.go() == "EADDRINUSE"
        ev = await_error(t, new.pid)
    finally:
        t.stop()
        new.release()
        holder.release()
    assert ev["verdict"]["cause"] == "listener"
    if engine == "core":
        assert ev["options"]["so_reuseaddr"] is True and ev["options"]["source"] == "kernel"
        assert ev["protocol"] == "tcp"
    else:
        assert ev["options"]["so_reuseaddr"] is None and ev["options"]["source"] == "unknown"


def test_netns_process_exiting_at_once_never_blames_the_host(engine, tracer, scratch):
    port = PORTS[-7]  # watched by the session tracer, used by no other test
    host = Staged("listen", "0.0.0.0", port, "--hold", name="host-holder")
    inner = Staged("listen", "0.0.0.0", port, "--hold", name="netns-holder", netns=scratch)
    try:
        mark = tracer.mark()
        new = Staged("bind", "0.0.0.0", port, name="new-server", netns=scratch)  # exits at once
        assert new.info == "EADDRINUSE"
        ev = await_error(tracer, new.pid, mark)
    finally:
        host.release()
        inner.release()
    named = [p["comm"] for b in ev["blockers"] for p in b["processes"]]
    assert "host-holder" not in named
    assert not any(f"kill {host.pid}" in a for a in ev["verdict"]["advice"])
    if engine == "core":  # the kernel said which namespace; /run/netns still pins it
        assert ev["netns"]["inode"] == _ns_inode(scratch)
        assert ev["netns"]["source"] in ("process", "pinned")
        assert named == ["netns-holder"]
    elif ev["netns"]["source"] == "tracer":
        assert ev["verdict"]["cause"] == "unknown" and named == []
    else:
        assert named == ["netns-holder"]


def test_listener_held_by_ten_processes_after_forks(engine, tracer, scratch):
    port = PORTS[-8]
    mark = tracer.mark()
    group = Staged("listen-forks", "0.0.0.0", port, "--count", "9", name="master",
                   netns=scratch)
    master, *workers = (int(p) for p in group.info.split())
    try:
        new = Staged("bind", "0.0.0.0", port, "--hold", name="new-server", netns=scratch)
        ev = await_error(tracer, new.pid, mark)
        new.release()
    finally:
        group.release()
    [b] = ev["blockers"]
    held = {p["pid"]: p["inherited"] for p in b["processes"]}
    assert set(held) == {master, *workers} and len(held) == 10
    assert held[master] is False
    assert all(held[w] is True for w in workers)


def test_workers_of_a_killed_master_are_marked_inherited(engine, tracer, scratch):
    """nginx after `kill -9` of its master: two workers keep the listener."""
    port = PORTS[-9]
    mark = tracer.mark()
    group = Staged("listen-forks", "0.0.0.0", port, "--count", "2", "--orphan",
                   "--child-seconds", "60", name="master", netns=scratch)
    workers = [int(p) for p in group.info.split()]
    try:
        new = Staged("bind", "0.0.0.0", port, "--hold", name="new-server", netns=scratch)
        ev = await_error(tracer, new.pid, mark)
        new.release()
    finally:
        for w in workers:
            os.kill(w, signal.SIGTERM)
    [b] = ev["blockers"]
    held = {p["pid"]: p["inherited"] for p in b["processes"]}
    assert set(held) == set(workers)
    if engine == "core":  # the kernel saw the master bind this very socket
        assert all(v is True for v in held.values())
    else:  # the binder is gone and the workers are siblings: unknown, not "not inherited"
        assert all(v in (True, None) for v in held.values())


def test_reuseport_judged_by_the_sockets_owner_not_the_caller(engine, tracer, scratch):
    """The new socket is created under seteuid(65534) by a root process: the
    kernel compares sk_uid (65534) with the listener's (0) and refuses."""
    port = PORTS[-10]
    holder = Staged("listen", "127.0.0.1", port, "--reuseport", "--hold", name="holder",
                    netns=scratch)
    try:
        mark = tracer.mark()
        new = Staged("bind", "127.0.0.1", port, "--reuseport", "--euid", "65534", "--hold",
                     name="new-server", netns=scratch)
        assert new.info == "EADDRINUSE"
        ev = await_error(tracer, new.pid, mark)
        new.release()
    finally:
        holder.release()
    assert ev["uid"] == 0  # the caller's real uid
    assert ev["verdict"]["cause"] == "listener"  # never "gone" (the old wrong answer)
    [b] = ev["blockers"]
    text = " ".join(ev["verdict"]["advice"])
    if engine == "core":
        assert ev["sk_uid"] == 65534 and b["conflicts"] is True
        assert "the old socket belongs to uid 0 and the new one to uid 65534" in text
    else:
        assert ev["sk_uid"] is None and b["conflicts"] is None
        assert "cannot read the new socket's" in text


def test_socket_port_range_is_the_range_quoted(engine, tracer, scratch):
    """bind(0) on a socket whose IP_LOCAL_PORT_RANGE is 43000-43001, both taken,
    in a namespace whose range 43000-43009 has room left."""
    scratch.sysctl("net.ipv4.ip_local_port_range", "43000 43009")
    hog = Staged("occupy", "0.0.0.0", 43000, "--count", "2", "--hold", name="hog",
                 netns=scratch)
    try:
        mark = tracer.mark()
        new = Staged("bind", "127.0.0.1", 0, "--port-range", "43000-43001", "--hold",
                     name="new-server", netns=scratch)
        assert new.info == "EADDRINUSE"
        ev = await_error(tracer, new.pid, mark)
        new.release()
    finally:
        hog.release()
    assert ev["verdict"]["cause"] == "ephemeral_exhausted"
    text = ev["verdict"]["summary"] + " " + " ".join(ev["verdict"]["advice"])
    if engine == "core":
        assert ev["port_range"] == [43000, 43001]
        assert ev["ephemeral"]["range"] == [43000, 43001] and ev["ephemeral"]["in_use"] == 2
        assert "the socket's IP_LOCAL_PORT_RANGE 43000-43001" in text
        assert "widening net.ipv4.ip_local_port_range alone does not help" in text
    else:
        assert ev["port_range"] is None
        assert "may narrow it" in text  # unknown, said so; never "widen the sysctl" alone


def test_conflict_among_20k_sockets(engine, tracer, scratch):
    port = PORTS[-11]
    crowd = Staged("crowd", "127.0.0.1", port + 1000, "--count", "10000", "--hold",
                   name="crowd", netns=scratch, timeout=120)
    holder = Staged("listen", "127.0.0.1", port, "--hold", name="holder", netns=scratch)
    try:
        mark = tracer.mark()
        new = Staged("bind", "127.0.0.1", port, "--hold", name="new-server", netns=scratch)
        ev = await_error(tracer, new.pid, mark)
        new.release()
    finally:
        holder.release()
        crowd.release(timeout=30)
    assert int(crowd.info) == 20000
    [b] = ev["blockers"]
    assert b["state"] == "LISTEN" and [p["comm"] for p in b["processes"]] == ["holder"]
