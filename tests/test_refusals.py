"""bind() refused before any socket is compared, staged for real and judged
by its own cause: the address (EADDRNOTAVAIL: not assigned, assigned in
another netns, IPv6 DAD still running, DAD failed), the port (EACCES: the
netns's own ip_unprivileged_port_start, a process without
CAP_NET_BIND_SERVICE, and one that holds it only in a user namespace of its
own), the socket (EINVAL: bound twice, link-local without a scope), and
policy (a cgroup bind4 program, a Landlock domain; a seccomp filter's refusal
is never traced). Each
verdict is checked against what the kernel did: the errno the staged process
got, and the facts the event carries."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import IN_CI, PORTS, TracerProcess, need_root
from test_check import check

from portrace.commands import stage
from portrace.commands.stage import ScratchNetns, Staged
from portrace.judge import refusals
from portrace.observe import policy

NOBODY = 65534
# A watched port no other module uses (conftest's pool stops before it):
# every bind() here is refused before taking it, so these tests share it.
REFUSED_PORT = PORTS[-12]
_names = itertools.count()


@pytest.fixture
def scratch(engine: str) -> Iterator[ScratchNetns]:
    need_root()
    with ScratchNetns(f"pt-refuse-{engine}-{os.getpid()}-{next(_names)}") as ns:
        yield ns


def refused(tracer: TracerProcess, addr: str, *args: str, netns: ScratchNetns,
            errno: str) -> dict[str, Any]:
    """A process binds addr:REFUSED_PORT in ``netns`` and the kernel refuses it
    with ``errno``; returns portrace's bind_error for it."""
    mark = tracer.mark()
    # Held until the event is in: what is read of it (its fd, its /proc) needs it alive.
    binder = Staged("bind", addr, REFUSED_PORT, *args, "--hold", name="refused", netns=netns)
    try:
        assert binder.info == errno, f"the kernel answered {binder.info}, not {errno}"
        ev = tracer.wait_for(lambda e: e["type"] == "bind_error" and e["pid"] == binder.pid,
                             start=mark)
    finally:
        binder.release()
    assert ev is not None, "portrace reported no bind_error for the refused bind()"
    assert ev["errno"] == errno and ev["port"] == REFUSED_PORT
    return ev


def veth(ns: ScratchNetns, name: str, peer: str, peer_ns: ScratchNetns | None = None) -> None:
    ns.ip("link", "add", name, "type", "veth", "peer", "name", peer)
    if peer_ns is not None:
        ns.ip("link", "set", peer, "netns", peer_ns.name)
        peer_ns.ip("link", "set", peer, "up")
    else:
        ns.ip("link", "set", peer, "up")


def test_an_address_no_namespace_has(tracer, scratch):
    ev = refused(tracer, "192.0.2.99", netns=scratch, errno="EADDRNOTAVAIL")
    assert ev["verdict"]["cause"] == "address_not_local"
    assert ev["address"]["interface"] is None and ev["address"]["elsewhere"] == []
    assert "not assigned in the failing socket's netns" in ev["verdict"]["summary"]
    # The family's own sysctl, never the other's.
    assert any("net.ipv4.ip_nonlocal_bind" in a for a in ev["verdict"]["advice"])
    assert not any("ipv6" in a for a in ev["verdict"]["advice"])
    assert ev["blockers"] == [] and ev["snapshot_ms"] is None


def test_an_address_that_lives_in_another_named_netns(tracer, scratch, engine):
    with ScratchNetns(f"pt-owner-{engine}-{os.getpid()}") as owner:
        veth(owner, "vo", "vo-peer")
        owner.ip("addr", "add", "192.0.2.98/24", "dev", "vo")
        owner.ip("link", "set", "vo", "up")
        ev = refused(tracer, "192.0.2.98", netns=scratch, errno="EADDRNOTAVAIL")
        assert ev["verdict"]["cause"] == "address_not_local"
        assert ev["address"]["elsewhere"] == [owner.name]
        assert f"assigned in netns {owner.name}" in ev["verdict"]["summary"]


def test_an_ipv6_address_still_in_dad(tracer, scratch):
    """Five probes a second apart: the address stays tentative for 5 s."""
    veth(scratch, "va", "vb")
    scratch.sysctl("net.ipv6.conf.va.dad_transmits", "5")
    scratch.sysctl("net.ipv6.neigh.va.retrans_time_ms", "1000")
    scratch.ip("link", "set", "va", "up")
    scratch.ip("-6", "addr", "add", "2001:db8::5/64", "dev", "va")
    ev = refused(tracer, "2001:db8::5", netns=scratch, errno="EADDRNOTAVAIL")
    a = ev["address"]
    assert ev["verdict"]["cause"] == "address_tentative", ev["verdict"]
    assert a["interface"] == "va" and a["tentative"] and not a["dadfailed"]
    assert a["dad_s"] == 5.0 and a["carrier"] is True
    assert any("net.ipv6.ip_nonlocal_bind" in x for x in ev["verdict"]["advice"])
    assert not any("net.ipv4.ip_nonlocal_bind" in x for x in ev["verdict"]["advice"])
    # And the kernel agrees: once DAD is over, the same bind() succeeds.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        b = Staged("bind", "2001:db8::5", REFUSED_PORT, name="after-dad", netns=scratch)
        b.release()
        if b.info == "ok":
            break
        time.sleep(0.5)
    assert b.info == "ok"


def test_an_ipv6_address_without_a_carrier_stays_tentative(tracer, scratch):
    scratch.ip("link", "add", "vc", "type", "veth", "peer", "name", "vd")
    scratch.ip("link", "set", "vc", "up")  # its peer stays down: no carrier, no DAD
    scratch.ip("-6", "addr", "add", "2001:db8::6/64", "dev", "vc")
    ev = refused(tracer, "2001:db8::6", netns=scratch, errno="EADDRNOTAVAIL")
    assert ev["verdict"]["cause"] == "address_tentative"
    assert ev["address"]["carrier"] is False
    assert "no carrier" in ev["verdict"]["summary"]


def test_an_ipv6_address_another_node_already_uses(tracer, scratch, engine):
    """Two namespaces on one link claim 2001:db8::7: the second's DAD fails."""
    with ScratchNetns(f"pt-other-node-{engine}-{os.getpid()}") as other:
        veth(other, "vx", "vy", peer_ns=scratch)
        other.ip("link", "set", "vx", "up")
        other.ip("-6", "addr", "add", "2001:db8::7/64", "dev", "vx", "nodad")
        scratch.ip("-6", "addr", "add", "2001:db8::7/64", "dev", "vy")
        deadline = time.monotonic() + 10
        while "dadfailed" not in subprocess.run(
                ["ip", "-n", scratch.name, "-6", "addr", "show", "dev", "vy"],
                capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline, "the kernel never failed DAD"
            time.sleep(0.2)
        ev = refused(tracer, "2001:db8::7", netns=scratch, errno="EADDRNOTAVAIL")
        assert ev["verdict"]["cause"] == "address_dadfailed"
        assert ev["address"]["dadfailed"] and ev["address"]["interface"] == "vy"


def test_a_port_below_the_netns_own_unprivileged_start(tracer, scratch):
    """The rule is per netns: here it starts above the watched port."""
    scratch.sysctl("net.ipv4.ip_unprivileged_port_start", str(REFUSED_PORT + 1))
    ev = refused(tracer, "127.0.0.1", "--uid", str(NOBODY), netns=scratch, errno="EACCES")
    rule = ev["port_rule"]
    assert ev["verdict"]["cause"] == "privileged_port", ev["verdict"]
    assert rule["port_start"] == REFUSED_PORT + 1 and rule["cap_net_bind_service"] is False
    assert rule["relation"] == "same"
    assert f"ip_unprivileged_port_start ({REFUSED_PORT + 1})" in ev["verdict"]["summary"]
    assert any(f"ip_unprivileged_port_start={REFUSED_PORT}" in a
               for a in ev["verdict"]["advice"])


def test_the_capability_held_in_the_wrong_user_namespace(tracer, scratch):
    """uid 0 of a user namespace of its own has every capability there, and
    none over a netns the initial user namespace owns."""
    scratch.sysctl("net.ipv4.ip_unprivileged_port_start", str(REFUSED_PORT + 1))
    ev = refused(tracer, "127.0.0.1", "--userns", netns=scratch, errno="EACCES")
    rule = ev["port_rule"]
    assert ev["verdict"]["cause"] == "privileged_port", ev["verdict"]
    assert rule["cap_net_bind_service"] is True and rule["relation"] == "other"
    assert rule["user_ns"] != rule["netns_user_ns"]
    assert f"in user namespace {rule['user_ns']}" in ev["verdict"]["summary"]


def test_root_binds_below_the_start_and_nothing_is_reported(tracer, scratch):
    scratch.sysctl("net.ipv4.ip_unprivileged_port_start", str(REFUSED_PORT + 1))
    mark = tracer.mark()
    b = Staged("bind", "127.0.0.1", REFUSED_PORT, name="root-binds", netns=scratch)
    b.release()
    assert b.info == "ok"
    assert tracer.wait_for(lambda e: e["type"] == "bind_error" and e["pid"] == b.pid,
                           timeout=1.0, start=mark) is None


def test_a_socket_bound_twice(tracer, scratch):
    ev = refused(tracer, "127.0.0.1", "--rebind", netns=scratch, errno="EINVAL")
    bound = ev["already_bound"]
    assert ev["verdict"]["cause"] == "already_bound", ev["verdict"]
    assert bound["addr"] == "127.0.0.1" and bound["port"] not in (0, REFUSED_PORT)
    assert f"already bound, to 127.0.0.1:{bound['port']}" in ev["verdict"]["summary"]


def test_a_link_local_address_without_a_scope(tracer, scratch):
    ev = refused(tracer, "fe80::1", netns=scratch, errno="EINVAL")
    assert ev["verdict"]["cause"] == "link_local_scope", ev["verdict"]
    assert ev["already_bound"] is None


OBJ = Path(__file__).resolve().parent / "bpf" / "refuse_bind.bpf.o"


@contextlib.contextmanager
def refusing_cgroup(program: str) -> Iterator[str]:
    """A cgroup of the test's own with one of tests/bpf/refuse_bind.bpf.o's
    bind4 programs attached; yields its path below the cgroup2 mount."""
    assert OBJ.exists(), f"{OBJ} missing: `make setup-test` builds it"
    with stage.refusing_cgroup(OBJ, program, f"portrace-test-{os.getpid()}-{next(_names)}") \
            as rel:
        yield rel


def refused_in(tracer: TracerProcess, cgroup: str, netns: ScratchNetns,
               errno: str) -> dict[str, Any]:
    """A process moved into ``cgroup`` before it makes its socket (a socket
    keeps the cgroup it was made in), then binds 127.0.0.1:REFUSED_PORT."""
    mark = tracer.mark()
    binder = Staged("bind", "127.0.0.1", REFUSED_PORT, "--pause", "--hold", name="refused",
                    netns=netns, first="paused")
    try:
        with open(f"{policy.cgroup2_mount()}{cgroup}/cgroup.procs", "w") as f:
            f.write(str(binder.pid))
        info = binder.go()
        assert info == errno, f"the kernel answered {info}, not {errno}"
        ev = tracer.wait_for(lambda e: e["type"] == "bind_error" and e["pid"] == binder.pid,
                             start=mark)
    finally:
        binder.release()  # out of the cgroup before it is removed
    assert ev is not None, "portrace reported no bind_error for the refused bind()"
    return ev


def test_a_cgroup_bind4_program_that_returns_0(tracer, scratch):
    with refusing_cgroup("refuse_eperm") as cgroup:
        ev = refused_in(tracer, cgroup, scratch, "EPERM")
    [prog] = ev["policy"]["cgroup_programs"]
    assert prog["name"] == "refuse_eperm" and prog["hook"] == "bind4"
    assert prog["cgroup"] == cgroup
    assert ev["verdict"]["cause"] == "cgroup_bpf", ev["verdict"]
    assert f"refuse_eperm (id {prog['id']}, bind4, attached at {cgroup})" in \
        ev["verdict"]["summary"]
    assert any(f"bpftool prog show id {prog['id']}" in a for a in ev["verdict"]["advice"])


def test_a_cgroup_program_that_sets_eacces_beside_an_active_lsm(tracer, scratch):
    """EACCES may be the program's (bpf_set_retval) or an LSM's: where an LSM
    that can refuse a TCP bind() is active, both remain, and the verdict says so."""
    with refusing_cgroup("refuse_eacces") as cgroup:
        ev = refused_in(tracer, cgroup, scratch, "EACCES")
    lsms = [x for x in ev["policy"]["lsms"] if x in refusals.BIND_LSMS]
    summary = ev["verdict"]["summary"]
    assert "refuse_eacces" in summary
    if lsms:
        assert ev["verdict"]["cause"] == "not_a_conflict", ev["verdict"]
        assert all(f"the {x} LSM" in summary for x in lsms) and "cannot tell" in summary
    else:
        assert ev["verdict"]["cause"] == "cgroup_bpf", ev["verdict"]


def test_a_bind_that_seccomp_refuses_is_never_traced(tracer, scratch):
    """The filter decides before the sys_enter tracepoint (kernel/entry/common.c:
    syscall_trace_enter): the kernel refuses with EPERM, and no probe sees the
    call. What the README says of it must stay true."""
    mark = tracer.mark()
    b = Staged("bind", "127.0.0.1", REFUSED_PORT, "--seccomp-refuse-bind", "--hold",
               name="filtered", netns=scratch)
    try:
        assert b.info == "EPERM"
        assert tracer.wait_for(lambda e: e.get("pid") == b.pid, timeout=2.0,
                               start=mark) is None
    finally:
        b.release()


def test_a_landlock_domain_that_refuses_tcp_bind(tracer, scratch):
    if "landlock" not in policy.active_lsms():
        if IN_CI:  # CI's machine runs Landlock (ABI 7): its absence there is a failure
            pytest.fail("Landlock is not an active LSM on CI's kernel")
        pytest.skip("Landlock is not an active LSM on this kernel")
    ev = refused(tracer, "127.0.0.1", "--landlock-refuse-bind", netns=scratch, errno="EACCES")
    assert ev["port_rule"]["port_start"] <= REFUSED_PORT  # the port rule allows it
    assert ev["policy"]["cgroup_programs"] == []
    assert ev["verdict"]["cause"] == "lsm", ev["verdict"]
    assert "landlock" in ev["verdict"]["summary"]


# `portrace check` answers the same refusals before the bind() is tried: no
# probe runs, the described socket is checked in the kernel's order.

@pytest.fixture
def plain_scratch() -> Iterator[ScratchNetns]:
    """A namespace for `check`, which runs no engine: once, not per engine."""
    need_root()
    with ScratchNetns(f"pt-refuse-check-{os.getpid()}-{next(_names)}") as ns:
        yield ns


def test_check_waits_for_dad_to_end(plain_scratch):
    scratch = plain_scratch
    veth(scratch, "va", "vb")
    scratch.sysctl("net.ipv6.conf.va.dad_transmits", "3")
    scratch.sysctl("net.ipv6.neigh.va.retrans_time_ms", "1000")
    scratch.ip("link", "set", "va", "up")
    code, [now], _ = check("--engine", "sock_diag", "--netns", scratch.name, "--addr",
                           "2001:db8::8", str(REFUSED_PORT))
    assert code == 1 and now["free"] is False  # not added yet: not local
    assert now["verdict"]["cause"] == "address_not_local" and now["blockers"] == []
    scratch.ip("-6", "addr", "add", "2001:db8::8/64", "dev", "va")
    added = time.monotonic()
    code, [ans], _ = check("--engine", "sock_diag", "--netns", scratch.name, "--addr",
                           "2001:db8::8", "--wait", "--timeout", "30", str(REFUSED_PORT))
    took = time.monotonic() - added
    assert code == 0 and ans["free"] is True, ans
    assert ans["waited_for"] and "tentative" in ans["waited_for"][0]
    # DAD takes 3 s here: the answer comes within a second of its end.
    assert 3.0 <= took < 3.0 + 1.0 + 1.5  # + portrace's own start-up
    b = Staged("bind", "2001:db8::8", REFUSED_PORT, name="after-dad", netns=scratch)
    b.release()
    assert b.info == "ok"


def test_check_pid_without_the_capability(plain_scratch):
    scratch = plain_scratch
    scratch.sysctl("net.ipv4.ip_unprivileged_port_start", str(REFUSED_PORT + 1))
    nobody = Staged("bind", "127.0.0.1", 0, "--uid", str(NOBODY), "--hold", name="nobody",
                    netns=scratch)
    try:
        code, [ans], _ = check("--engine", "sock_diag", "--pid", str(nobody.pid), "--addr",
                               "127.0.0.1", str(REFUSED_PORT))
    finally:
        nobody.release()
    assert code == 1 and ans["free"] is False
    assert ans["verdict"]["cause"] == "privileged_port"
    assert ans["port_rule"]["cap_net_bind_service"] is False


def test_a_link_local_address_on_another_interface(tracer, scratch):
    """fe80::a is on va; the bind() names vb (SO_BINDTODEVICE)."""
    veth(scratch, "va", "vb")
    scratch.ip("link", "set", "va", "up")
    scratch.ip("-6", "addr", "add", "fe80::a/64", "dev", "va", "nodad")
    ev = refused(tracer, "fe80::a", "--device", "vb", netns=scratch, errno="EADDRNOTAVAIL")
    assert ev["verdict"]["cause"] == "address_not_local", ev["verdict"]
    assert ev["address"]["interface"] == "va"
    assert "named another interface" in ev["verdict"]["summary"]


def test_check_names_the_cgroup_programs_that_will_decide(plain_scratch):
    """check cannot run a cgroup program: it says one will decide, and which."""
    with refusing_cgroup("refuse_eperm") as cgroup:
        holder = Staged("bind", "127.0.0.1", 0, "--pause", "--hold", name="in-cgroup",
                        netns=plain_scratch, first="paused")
        try:
            with open(f"{policy.cgroup2_mount()}{cgroup}/cgroup.procs", "w") as f:
                f.write(str(holder.pid))
            code, [ans], _ = check("--engine", "sock_diag", "--pid", str(holder.pid),
                                   "--addr", "127.0.0.1", str(REFUSED_PORT))
        finally:
            holder.release()
    assert code == 0 and ans["free"] is True
    [prog] = ans["policy"]["cgroup_programs"]
    assert prog["name"] == "refuse_eperm" and prog["cgroup"] == cgroup
