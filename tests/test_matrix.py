"""Issue 3's scenario matrix: every case the Linux 6.x port-allocation code
distinguishes, staged for real, with the cause and the blocker asserted.

Set PORTRACE_MATRIX_OUT=FILE to also append each row's printed verdict there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import contract
import pytest
from conftest import PORTS, TracerProcess
from test_walk import view

from portrace.commands.stage import ScratchNetns, Staged
from portrace.kernel.core import CoreEngine

MATRIX_PORTS = PORTS[-6:]  # watched by the session tracer, unused by other modules

Event = dict[str, Any]


@dataclass
class Row:
    id: str
    stage: Callable[[TracerProcess, ScratchNetns, int], tuple[Event | None, dict[str, Any]]]
    check: Callable[[Event | None, dict[str, Any], int], None]


@pytest.fixture
def scratch() -> Iterator[ScratchNetns]:
    with ScratchNetns(f"portrace-mx-{os.getpid()}") as ns:
        yield ns


# The port's own bucket (walk_port) and the iterators, unattached, as `portrace
# check` has them: while a row holds its sockets, both must name the same.
_LOOKUPS: dict[bool, CoreEngine] = {}


@pytest.fixture(scope="module", autouse=True)
def lookups() -> Iterator[None]:
    yield
    for e in _LOOKUPS.values():
        e.close()
    _LOOKUPS.clear()


def same_lookup(ns: ScratchNetns, port: int, protocol: str) -> None:
    if not _LOOKUPS:
        for walk in (True, False):
            e = CoreEngine(MATRIX_PORTS, lambda ev: None, attach=False, walk=walk)
            e.open()
            _LOOKUPS[walk] = e
    fd = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
    try:
        inode = os.fstat(fd).st_ino
        walk, it = (_LOOKUPS[w].snapshot(port, (protocol,), fd, inode, (), True)
                    for w in (True, False))
    finally:
        os.close(fd)
    assert view(walk) == view(it), "the walk and the iterators disagree"
    assert walk.source is not None and walk.source.sockets == {
        protocol: "bind_hash" if protocol == "tcp" else "udp_hash"}, walk.source


def await_error(tracer: TracerProcess, pid: int, mark: int, timeout: float = 15.0
                ) -> Event | None:
    return tracer.wait_for(lambda e: e["type"].endswith("_error") and e["pid"] == pid,
                           timeout=timeout, start=mark)


def attempt(tracer: TracerProcess, ns: ScratchNetns, addr: str, port: int, *args: str,
            expect: str) -> tuple[Event | None, Staged]:
    """A `new-server` process tries bind (and listen); its reported results
    must be `expect`; returns portrace's error event (None if there was none)."""
    mark = tracer.mark()
    p = Staged("bind", addr, port, *args, "--hold", name="new-server", netns=ns)
    try:
        assert p.info == expect, f"staging gave {p.info!r}, wanted {expect!r}"
        if port and tracer.engine == "core":
            same_lookup(ns, port, "udp" if "--udp" in args else "tcp")
        if "EADDRINUSE" in expect or "EADDRNOTAVAIL" in expect:
            return await_error(tracer, p.pid, mark), p
        seen = tracer.wait_for(lambda e: e["pid"] == p.pid, start=mark)
        assert seen is not None and seen["type"] == "bind", "the probes did not see it"
        return await_error(tracer, p.pid, mark, timeout=1.0), p
    finally:
        p.release()


def holding(role: str, addr: str, port: int, *args: str, ns: ScratchNetns,
            name: str = "holder") -> Staged:
    return Staged(role, addr, port, *args, "--hold", name=name, netns=ns)


def against(tr: TracerProcess, ns: ScratchNetns, port: int, holder: tuple[str, ...],
            new: tuple[str, ...], expect: str) -> tuple[Event | None, dict[str, Any]]:
    """A `holder` process (role, addr, args...) holds the port while a
    `new-server` (addr, args...) tries it; the holder is released after."""
    role, addr, *args = holder
    h = holding(role, addr, port, *args, ns=ns)
    try:
        ev, _ = attempt(tr, ns, new[0], port, *new[1:], expect=expect)
    finally:
        h.release()
    return ev, {"holder": h.pid}


def one_blocker(ev: Event | None) -> Event:
    assert ev is not None, "portrace reported nothing"
    assert len(ev["blockers"]) == 1, ev["blockers"]
    return ev["blockers"][0]


def advice(ev: Event) -> str:
    return " ".join(ev["verdict"]["advice"])


# -- rows -------------------------------------------------------------------


def stage_listen_recheck(tr, ns, port):
    # Both bind with SO_REUSEADDR (allowed: neither listens yet), then the
    # first listens, then the second.
    first = holding("listen", "127.0.0.1", port, "--reuseaddr", "--late-listen", ns=ns,
                    name="first")
    second = Staged("bind", "127.0.0.1", port, "--reuseaddr", "--listen", "--wait", "--hold",
                    name="new-server", netns=ns, first="waiting")
    mark = tr.mark()
    try:
        assert first.go() == "ok"
        assert second.go() == "ok EADDRINUSE"
        ev = await_error(tr, second.pid, mark)
    finally:
        second.release()
        first.release()
    return ev, {"holder": first.pid}


def check_listen_recheck(ev, ctx, port):
    b = one_blocker(ev)
    assert ev["type"] == "listen_error" and ev["verdict"]["cause"] == "listener"
    assert b["state"] == "LISTEN" and b["local"] == {"addr": "127.0.0.1", "port": port}
    assert [(p["pid"], p["inherited"]) for p in b["processes"]] == [(ctx["holder"], False)]
    assert b["options"]["so_reuseaddr"] is True and ev["options"]["so_reuseaddr"] is True
    assert "only one may listen" in advice(ev)


def _occupy_range(ns: ScratchNetns) -> Staged:
    ns.sysctl("net.ipv4.ip_local_port_range", "41000 41003")
    return holding("occupy", "0.0.0.0", 41000, "--count", "4", ns=ns, name="hog")


def stage_bind0_exhausted(tr, ns, port):
    hog = _occupy_range(ns)
    try:
        ev, _ = attempt(tr, ns, "127.0.0.1", 0, expect="EADDRINUSE")
    finally:
        hog.release()
    return ev, {}


def stage_listen_autobind_exhausted(tr, ns, port):
    hog = _occupy_range(ns)
    try:
        ev, _ = attempt(tr, ns, "127.0.0.1", 0, "--no-bind", "--listen", expect="EADDRINUSE")
    finally:
        hog.release()
    return ev, {}


def check_exhausted(call):
    def check(ev, ctx, port):
        assert ev is not None and ev["type"] == f"{call}_error"
        assert ev["verdict"]["cause"] == "ephemeral_exhausted" and ev["blockers"] == []
        eph = ev["ephemeral"]
        assert eph["range"] == [41000, 41003] and eph["in_use"] == 4
        assert eph["by_state"] == {"CLOSE": 4}
        assert "ip_local_port_range 41000-41003 (4 ports, 0 reserved): 4 in use" in \
            ev["verdict"]["summary"]
    return check


def stage_connect_exhausted(tr, ns, port):
    ns.sysctl("net.ipv4.ip_local_port_range", "42000 42007")
    ns.sysctl("net.ipv4.tcp_tw_reuse", "0")
    srv = Staged("serve", "127.0.0.1", port, name="server", netns=ns)
    mark = tr.mark()
    try:
        cli = Staged("connect-until-fail", "127.0.0.1", port, "--hold", name="client",
                     netns=ns, timeout=30)
        ev = await_error(tr, cli.pid, mark)
        cli.release()
    finally:
        srv.release()
    return ev, {"result": cli.info}


def check_connect_exhausted(ev, ctx, port):
    assert ctx["result"].split()[0] == "EADDRNOTAVAIL"
    assert ev is not None and ev["type"] == "connect_error"
    assert ev["errno"] == "EADDRNOTAVAIL" and ev["destination"] == {"addr": "127.0.0.1",
                                                                    "port": port}
    assert ev["verdict"]["cause"] == "ephemeral_exhausted"
    eph = ev["ephemeral"]
    assert eph["range"] == [42000, 42007] and eph["time_wait_to_destination"] == 8
    assert eph["fin_wait2_to_destination"] == 0
    assert ev["sysctls"]["net.ipv4.tcp_tw_reuse"] == "0"
    assert "net.ipv4.tcp_tw_reuse = 0: set it to 1" in advice(ev)


def _timewait(ns, port, *old_args):
    old = Staged("timewait", "127.0.0.1", port, *old_args, name="old-server", netns=ns)
    old.release()
    return old


def stage_tw_new_lacks_reuseaddr(tr, ns, port):
    old = _timewait(ns, port, "--reuseaddr")
    ev, _ = attempt(tr, ns, "127.0.0.1", port, expect="EADDRINUSE")
    return ev, {"old": old.pid}


def check_tw_new_lacks(ev, ctx, port):
    b = one_blocker(ev)
    assert ev["verdict"]["cause"] == "time_wait" and b["state"] == "TIME_WAIT"
    assert b["closed_by"]["pid"] == ctx["old"]
    # The CO-RE engine reads the minisock's own copy; bcc saw the close.
    source = {"core": "kernel", "bcc": "closer"}[ctx["engine"]]
    assert b["options"]["so_reuseaddr"] is True and b["options"]["source"] == source
    assert ev["options"]["so_reuseaddr"] is False
    assert "The new socket did not set SO_REUSEADDR" in advice(ev)


def stage_tw_old_lacks_reuseaddr(tr, ns, port):
    old = _timewait(ns, port)
    ev, _ = attempt(tr, ns, "127.0.0.1", port, "--reuseaddr", expect="EADDRINUSE")
    return ev, {"old": old.pid}


def check_tw_old_lacks(ev, ctx, port):
    b = one_blocker(ev)
    assert ev["verdict"]["cause"] == "time_wait"
    assert b["options"]["so_reuseaddr"] is False and ev["options"]["so_reuseaddr"] is True
    assert "but the old socket (closed by old-server" in advice(ev)
    assert "the minisock keeps that" in advice(ev)


def stage_tw_both_reuseaddr(tr, ns, port):
    _timewait(ns, port, "--reuseaddr")
    ev, _ = attempt(tr, ns, "127.0.0.1", port, "--reuseaddr", expect="ok")
    return ev, {}


def check_no_event(ev, ctx, port):
    assert ev is None, f"a bind the kernel allowed was reported: {ev}"


def stage_reuseaddr_vs_listen(tr, ns, port):
    return against(tr, ns, port, ("listen", "127.0.0.1", "--reuseaddr"),
                   ("127.0.0.1", "--reuseaddr"), expect="EADDRINUSE")


def check_reuseaddr_vs_listen(ev, ctx, port):
    b = one_blocker(ev)
    assert ev["verdict"]["cause"] == "listener" and b["state"] == "LISTEN"
    source = {"core": "kernel", "bcc": "probes"}[ctx["engine"]]
    assert b["options"]["so_reuseaddr"] is True and b["options"]["source"] == source
    assert "never passes a LISTEN socket" in advice(ev)


def stage_reuseport_other_uid(tr, ns, port):
    return against(tr, ns, port, ("listen", "127.0.0.1", "--reuseport"),
                   ("127.0.0.1", "--reuseport", "--uid", "65534"), expect="EADDRINUSE")


def check_reuseport_other_uid(ev, ctx, port):
    b = one_blocker(ev)
    assert ev["uid"] == 65534 and b["uid"] == 0
    assert b["options"]["so_reuseport"] is True and ev["options"]["so_reuseport"] is True
    if ctx["engine"] == "core":
        assert ev["sk_uid"] == 65534
        assert "SO_REUSEPORT is set on both, but refused: the old socket belongs to uid 0 " \
               "and the new one to uid 65534" in advice(ev)
    else:  # bcc cannot read sk_uid: it says so, and lists the listener as possible
        assert ev["sk_uid"] is None and b["conflicts"] is None
        assert "cannot read the new socket's" in advice(ev)


def stage_reuseport_same_uid(tr, ns, port):
    return against(tr, ns, port, ("listen", "127.0.0.1", "--reuseport"),
                   ("127.0.0.1", "--reuseport"), expect="ok")


def stage_fin_wait2(tr, ns, port):
    ns.sysctl("net.ipv4.tcp_fin_timeout", "17")
    old = holding("finwait2", "127.0.0.1", port, ns=ns, name="old-server")
    try:
        ev, _ = attempt(tr, ns, "127.0.0.1", port, expect="EADDRINUSE")
    finally:
        old.release()
    return ev, {"peer": int(old.info)}


def check_fin_wait2(ev, ctx, port):
    b = one_blocker(ev)
    assert ev["verdict"]["cause"] == "fin_wait2" and b["state"] == "FIN_WAIT2"
    assert b["remote"]["port"] == ctx["peer"] and 0 < b["expires_s"] <= 17
    assert "net.ipv4.tcp_fin_timeout = 17 s" in advice(ev)


def stage_bound_only(tr, ns, port):
    return against(tr, ns, port, ("listen", "0.0.0.0", "--no-listen"), ("127.0.0.1",),
                   expect="EADDRINUSE")


def check_bound_only(ev, ctx, port):
    b = one_blocker(ev)
    assert ev["verdict"]["cause"] == "bound_socket" and b["state"] == "CLOSE"
    assert [p["pid"] for p in b["processes"]] == [ctx["holder"]]


def stage_v4_mapped(tr, ns, port):
    return against(tr, ns, port, ("listen", "::ffff:127.0.0.1", "--v6only", "0"), ("127.0.0.1",),
                   expect="EADDRINUSE")


def check_v4_mapped(ev, ctx, port):
    b = one_blocker(ev)
    assert b["family"] == "inet6" and b["local"]["addr"] == "::ffff:127.0.0.1"
    assert "v4-mapped IPv6 address" in advice(ev)


def stage_other_address(tr, ns, port):
    return against(tr, ns, port, ("listen", "127.0.0.1"), ("127.0.0.2",),
                   expect="ok")


def stage_v6only_vs_v4(tr, ns, port):
    return against(tr, ns, port, ("listen", "::", "--v6only", "1"), ("0.0.0.0",),
                   expect="ok")


def stage_dual_stack_new(tr, ns, port):
    return against(tr, ns, port, ("listen", "0.0.0.0"), ("::", "--v6only", "0"),
                   expect="EADDRINUSE")


def check_dual_stack_new(ev, ctx, port):
    b = one_blocker(ev)
    assert b["family"] == "inet" and ev["family"] == "inet6"
    assert ev["options"]["ipv6_v6only"] is False
    assert "A [::] socket without IPV6_V6ONLY also claims IPv4" in advice(ev)


def stage_devices_differ(tr, ns, port):
    ns.ip("link", "add", "pt0", "type", "veth", "peer", "name", "pt1")
    ns.ip("link", "set", "pt0", "up")
    h = holding("listen", "0.0.0.0", port, "--device", "lo", ns=ns)
    try:
        ev, _ = attempt(tr, ns, "0.0.0.0", port, "--device", "pt0", expect="ok")
    finally:
        h.release()
    return ev, {}


def stage_device_vs_unbound(tr, ns, port):
    return against(tr, ns, port, ("listen", "0.0.0.0", "--device", "lo"), ("0.0.0.0",),
                   expect="EADDRINUSE")


def check_device_vs_unbound(ev, ctx, port):
    b = one_blocker(ev)
    assert b["bound_dev_if"] == 1  # lo
    assert ev["options"]["so_bindtodevice"] is False
    assert ev["verdict"]["cause"] == "listener"


def stage_netns_not_host(tr, ns, port):
    host = Staged("listen", "0.0.0.0", port, "--hold", name="host-holder")
    inner = holding("listen", "0.0.0.0", port, ns=ns, name="netns-holder")
    try:
        ev, _ = attempt(tr, ns, "0.0.0.0", port, expect="EADDRINUSE")
    finally:
        host.release()
        inner.release()
    return ev, {"inner": inner.pid, "ns": ns.name,
                "inode": os.stat(f"/run/netns/{ns.name}").st_ino}


def check_netns_not_host(ev, ctx, port):
    b = one_blocker(ev)
    assert [p["comm"] for p in b["processes"]] == ["netns-holder"]
    assert ev["netns"] == {"inode": ctx["inode"], "source": "process", "name": ctx["ns"]}


def stage_gone(tr, ns, port):
    # The blocker is the new server's own earlier listener, closed
    # microseconds after the failure: gone before any lookup can run.
    h = holding("listen", "127.0.0.2", port, ns=ns, name="unrelated")  # other address
    try:
        ev, _ = attempt(tr, ns, "127.0.0.1", port, "--own-listener", expect="EADDRINUSE")
    finally:
        h.release()
    return ev, {}


def check_gone(ev, ctx, port):
    assert ev is not None and ev["verdict"]["cause"] == "unknown" and ev["blockers"] == []
    s = ev["verdict"]["summary"]
    # The failure is read before the listener's LISTEN -> CLOSE, so the last
    # socket seen is that listener, up: exactly the blocker that went away.
    assert "gone by lookup" in s and "last socket seen on the port: 127.0.0.1:" in s
    assert "entering LISTEN, by new-server[" in s
    assert ev["last_seen"]["new"] == "LISTEN" and ev["last_seen"]["comm"] == "new-server"


ROWS = [
    Row("1 listen() re-check after two SO_REUSEADDR binds", stage_listen_recheck,
        check_listen_recheck),
    Row("1 bind(0) with the ephemeral range exhausted", stage_bind0_exhausted,
        check_exhausted("bind")),
    Row("1 listen() autobind with the range exhausted", stage_listen_autobind_exhausted,
        check_exhausted("listen")),
    Row("2 connect() EADDRNOTAVAIL, TIME_WAIT piled up, tcp_tw_reuse=0",
        stage_connect_exhausted, check_connect_exhausted),
    Row("3 TIME_WAIT: new socket lacks SO_REUSEADDR", stage_tw_new_lacks_reuseaddr,
        check_tw_new_lacks),
    Row("3 TIME_WAIT: old socket lacked SO_REUSEADDR", stage_tw_old_lacks_reuseaddr,
        check_tw_old_lacks),
    Row("3 TIME_WAIT: both SO_REUSEADDR, bind succeeds", stage_tw_both_reuseaddr,
        check_no_event),
    Row("3 SO_REUSEADDR cannot pass LISTEN", stage_reuseaddr_vs_listen,
        check_reuseaddr_vs_listen),
    Row("3 SO_REUSEPORT refused across uids", stage_reuseport_other_uid,
        check_reuseport_other_uid),
    Row("3 SO_REUSEPORT same uid, bind succeeds", stage_reuseport_same_uid, check_no_event),
    Row("4 orphaned FIN_WAIT2, tcp_fin_timeout=17", stage_fin_wait2, check_fin_wait2),
    Row("5 bound-only socket", stage_bound_only, check_bound_only),
    Row("6 v4-mapped IPv6 blocks IPv4", stage_v4_mapped, check_v4_mapped),
    Row("6 other specific address, bind succeeds", stage_other_address, check_no_event),
    Row("6 [::] IPV6_V6ONLY vs IPv4, bind succeeds", stage_v6only_vs_v4, check_no_event),
    Row("6 new [::] without IPV6_V6ONLY vs IPv4 listener", stage_dual_stack_new,
        check_dual_stack_new),
    Row("6 SO_BINDTODEVICE different devices, bind succeeds", stage_devices_differ,
        check_no_event),
    Row("6 SO_BINDTODEVICE listener vs unbound new socket", stage_device_vs_unbound,
        check_device_vs_unbound),
    Row("7 netns failure never blames the host", stage_netns_not_host, check_netns_not_host),
    Row("8 blocker gone before lookup", stage_gone, check_gone),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_matrix(row: Row, tracer: TracerProcess, scratch: ScratchNetns):
    port = MATRIX_PORTS[ROWS.index(row) % len(MATRIX_PORTS)]
    ev, ctx = row.stage(tracer, scratch, port)
    row.check(ev, {**ctx, "engine": tracer.engine}, port)
    if ev is not None:
        contract.check(ev)
    out = os.environ.get("PORTRACE_MATRIX_OUT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"row": row.id, "event": ev}) + "\n")
