"""The diagnosis on recorded data: pure functions, no root needed.

Socket rows are what sock_diag returned on 6.18 for the staged scenarios
(e.g. a fresh TIME_WAIT minisock: idiag_expires 59860 ms, inode 0, uid 0)."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

import pytest

from portrace.events import (
    UNKNOWN_OPTS,
    Closer,
    Endpoint,
    SocketCall,
    SockOpts,
    StateChange,
    Task,
)
from portrace.judge.advice import verdict
from portrace.judge.diagnose import Request, find_blockers, overlaps
from portrace.kernel.engine import Holder, SocketEntry

NOW = datetime(2026, 11, 24, 6, 26, 26, tzinfo=timezone.utc)


def sock(state: str, addr: str, port: int = 9090, *, family: str | None = None,
         remote: Endpoint | None = None, inode: int = 7001, expires_ms: int | None = None,
         v6only: bool | None = None, protocol: str = "tcp") -> SocketEntry:
    fam = family or ("inet6" if ":" in addr else "inet")
    if fam == "inet6" and v6only is None:
        v6only = False
    return SocketEntry(protocol=protocol, family=fam, state=state, local=Endpoint(addr, port),
                       remote=remote, inode=inode, uid=0, cookie=1, expires_ms=expires_ms,
                       v6only=v6only, bound_dev_if=0)


def attempt(addr: str, port: int = 9090, *, protocol: str = "tcp", errno: int = 98,
            call: str = "bind", opts: SockOpts = UNKNOWN_OPTS, uid: int = 0) -> SocketCall:
    return SocketCall(ts=NOW, call=call, pid=3364, tid=3364, comm="new-server", uid=uid, fd=3,
                      errno=errno, protocol=protocol,
                      family="inet6" if ":" in addr else "inet", addr=addr, port=port,
                      cgroup_id=1, opts=opts)


def req(addr: str, v6only: bool | None = None) -> Request:
    r = Request.of(attempt(addr))
    return r if v6only is None else Request(r.protocol, r.family, r.addr, r.port, v6only)


# (requested address, request v6only, existing socket's address, its v6only, overlap?)
OVERLAP = [
    ("0.0.0.0", None, "127.0.0.1", None, True),
    ("127.0.0.1", None, "0.0.0.0", None, True),
    ("127.0.0.1", None, "127.0.0.2", None, False),
    ("127.0.0.1", None, "::", False, True),  # dual-stack [::] covers IPv4
    ("127.0.0.1", None, "::", True, False),  # ... unless IPV6_V6ONLY
    ("127.0.0.1", None, "::ffff:127.0.0.1", False, True),
    ("127.0.0.2", None, "::ffff:127.0.0.1", False, False),
    ("127.0.0.1", None, "::1", True, False),
    ("::", None, "0.0.0.0", None, True),  # v6only unknown: could be dual-stack
    ("::", True, "0.0.0.0", None, False),
    ("::", False, "127.0.0.1", None, True),
    ("::", True, "::", True, True),  # two [::] always overlap
    ("::1", None, "0.0.0.0", None, False),  # specific v6 is forced IPV6_V6ONLY
    ("::1", None, "::", False, True),
    ("::1", None, "::1", True, True),
    ("::1", None, "::2", True, False),
    ("::ffff:127.0.0.1", None, "127.0.0.1", None, True),
    ("::ffff:127.0.0.1", None, "0.0.0.0", None, True),
    ("::ffff:127.0.0.1", None, "127.0.0.2", None, False),
    ("::ffff:127.0.0.1", None, "::", True, False),  # v6only [::] never takes mapped
]


@pytest.mark.parametrize(("mine", "mine_v6only", "theirs", "theirs_v6only", "expected"), OVERLAP)
def test_overlap_follows_inet_rcv_saddr_equal(mine, mine_v6only, theirs, theirs_v6only,
                                              expected):
    assert overlaps(req(mine, mine_v6only), sock("LISTEN", theirs, v6only=theirs_v6only)) \
        is expected


def test_specific_ipv6_request_is_v6only():
    assert Request.of(attempt("::1")).v6only is True
    assert Request.of(attempt("::")).v6only is None
    assert Request.of(attempt("::ffff:127.0.0.1")).v6only is None


def test_order_listen_live_bound_minisocks_longest_first():
    peer = Endpoint("127.0.0.1", 50000)
    socks = [
        sock("TIME_WAIT", "127.0.0.1", remote=peer, inode=0, expires_ms=12000),
        sock("CLOSE", "0.0.0.0", inode=7003),
        sock("TIME_WAIT", "127.0.0.1", remote=Endpoint("127.0.0.1", 50001), inode=0,
             expires_ms=59860),
        sock("ESTABLISHED", "127.0.0.1", remote=peer, inode=7002),
        sock("LISTEN", "0.0.0.0", inode=7001),
        sock("LISTEN", "127.0.0.2", inode=7009),  # does not overlap 127.0.0.1
        sock("LISTEN", "127.0.0.1", port=9091, inode=7010),  # other port
    ]
    got = find_blockers(req("127.0.0.1"), socks, {}, {}, {})
    assert [(b.state, b.inode, b.expires_s) for b in got] == [
        ("LISTEN", 7001, None), ("ESTABLISHED", 7002, None), ("CLOSE", 7003, None),
        ("TIME_WAIT", 0, 59.86), ("TIME_WAIT", 0, 12.0)]


def test_protocol_filters_and_unknown_keeps_both():
    socks = [sock("LISTEN", "0.0.0.0"), sock("UNCONN", "0.0.0.0", protocol="udp", inode=8)]
    tcp = find_blockers(req("0.0.0.0"), socks, {}, {}, {})
    assert [b.protocol for b in tcp] == ["tcp"]
    unknown = Request("unknown", "inet", "0.0.0.0", 9090)
    assert {b.protocol for b in find_blockers(unknown, socks, {}, {}, {})} == {"tcp", "udp"}


def test_holders_binders_and_closers_are_attached():
    peer = Endpoint("127.0.0.1", 56352)
    tw = sock("TIME_WAIT", "127.0.0.1", remote=peer, inode=0, expires_ms=59860)
    lst = sock("LISTEN", "0.0.0.0", inode=7001)
    holders = {7001: [Holder(pid=3367, ppid=1, comm="sleep", fds=(3,))]}
    binders = {("inet", "0.0.0.0", 9090): [dataclasses.replace(attempt("0.0.0.0"), pid=3366,
                                                               errno=0)]}
    closer = Closer(pid=3363, comm="old-server", ts=NOW)
    closers = {("inet", tw.local, peer): closer}
    got = find_blockers(req("0.0.0.0"), [tw, lst], holders, closers, binders)
    assert got[0].processes[0].inherited is True  # bound by 3366, held by 3367
    assert got[1].closed_by == closer and got[1].processes == ()


def test_child_sharing_with_parent_counts_as_inherited():
    lst = sock("LISTEN", "0.0.0.0", inode=7001)
    holders = {7001: [Holder(pid=10, ppid=1, comm="nginx", fds=(6,)),
                      Holder(pid=11, ppid=10, comm="nginx", fds=(6,))]}
    [b] = find_blockers(req("0.0.0.0"), [lst], holders, {}, {})
    assert [(p.pid, p.inherited) for p in b.processes] == [(10, None), (11, True)]


def test_time_wait_verdict_is_true_to_the_kernel():
    peer = Endpoint("127.0.0.1", 56352)
    tw = sock("TIME_WAIT", "127.0.0.1", remote=peer, inode=0, expires_ms=41200)
    r = req("127.0.0.1")
    blockers = find_blockers(r, [tw], {}, {}, {})
    v = verdict(r, attempt("127.0.0.1"), blockers, {}, None, "process")
    assert v.cause == "time_wait"
    text = " ".join(v.advice)
    assert "wait 41 s" in text
    assert "ss -K state time-wait src 127.0.0.1:9090 dst 127.0.0.1:56352" in text
    assert "TCP_TIMEWAIT_LEN = 60 s" in text
    assert "both the old and the new process" in text and "inet_twsk_alloc" in text
    assert "tcp_tw_reuse" in text and "tcp_twsk_unique" in text
    assert "tcp_fin_timeout bounds orphaned FIN_WAIT2 only" in text


def test_fin_wait2_verdict_cites_the_namespace_fin_timeout():
    peer = Endpoint("127.0.0.1", 40000)
    fw2 = sock("FIN_WAIT2", "127.0.0.1", remote=peer, inode=0, expires_ms=25000)
    r = req("127.0.0.1")
    v = verdict(r, attempt("127.0.0.1"), find_blockers(r, [fw2], {}, {}, {}),
                {"net.ipv4.tcp_fin_timeout": "30"}, None, "process")
    assert v.cause == "fin_wait2"
    assert "net.ipv4.tcp_fin_timeout = 30 s" in " ".join(v.advice)


@pytest.mark.parametrize(("entry", "cause"), [
    (sock("LISTEN", "0.0.0.0"), "listener"),
    (sock("ESTABLISHED", "127.0.0.1", remote=Endpoint("127.0.0.1", 1)), "connected_socket"),
    (sock("CLOSE", "0.0.0.0"), "bound_socket"),
    (sock("UNCONN", "0.0.0.0", protocol="udp"), "udp_socket"),
])
def test_causes(entry, cause):
    r = Request("unknown", "inet", "0.0.0.0", 9090)
    v = verdict(r, attempt("0.0.0.0"), find_blockers(r, [entry], {}, {}, {}), {}, None, "process")
    assert v.cause == cause


def test_gone_blocker_says_so_and_shows_last_seen():
    last = StateChange(ts=NOW, skaddr=1, protocol="tcp", family="inet",
                       local=Endpoint("127.0.0.1", 9090), remote=Endpoint("127.0.0.1", 5),
                       old="LISTEN", new="CLOSE",
                       owner=Task(pid=9, tid=9, comm="old-server", ts=NOW))
    v = verdict(req("127.0.0.1"), attempt("127.0.0.1"), [], {}, last, "process")
    assert v.cause == "unknown"
    assert "gone by lookup" in v.summary
    assert "last socket seen on the port: 127.0.0.1:9090 <-> 127.0.0.1:5 entering CLOSE, by " \
           "old-server[9], 0.000 s before the failure" in v.summary



@pytest.mark.parametrize("source", ["tracer", "gone"])
def test_no_blame_outside_the_failing_namespace(source):
    """A namespace that could not be entered (gone) or not known (bcc, the
    process exited) is not replaced by another: nothing is named, no kill."""
    v = verdict(req("127.0.0.1"), attempt("127.0.0.1"), [], {}, None, source)
    assert v.cause == "unknown"
    assert "nothing was looked up" in v.summary or "nothing could be looked up" in v.summary
    assert not any("kill" in a for a in v.advice)


def test_other_errno_is_not_called_a_conflict():
    v = verdict(req("0.0.0.0"), attempt("0.0.0.0", errno=13), [], {}, None, "process")
    assert v.cause == "not_a_conflict" and "EACCES" in v.summary


@pytest.mark.parametrize(("mine", "theirs", "v6only", "phrase"), [
    ("127.0.0.1", "::", False, "covers IPv4 because that socket is not IPV6_V6ONLY"),
    ("127.0.0.1", "::ffff:127.0.0.1", False, "v4-mapped IPv6 address"),
    ("::", "0.0.0.0", None, "A [::] socket without IPV6_V6ONLY also claims IPv4"),
    ("::ffff:127.0.0.1", "0.0.0.0", None, "v4-mapped address ::ffff:127.0.0.1 is the IPv4"),
])
def test_cross_family_note_names_the_real_reason(mine, theirs, v6only, phrase):
    r = req(mine)
    blockers = find_blockers(r, [sock("LISTEN", theirs, v6only=v6only)], {}, {}, {})
    v = verdict(r, attempt(mine), blockers, {}, None, "process")
    assert any(phrase in line for line in v.advice), v.advice


def test_connect_exhaustion_by_fin_wait2_says_tw_reuse_cannot_help():
    from portrace.events import PortUsage
    usage = PortUsage(low=42000, high=42007, reserved=0, in_use=8, by_state={"FIN_WAIT2": 8},
                      time_wait_to_destination=0, fin_wait2_to_destination=8)
    a = attempt("127.0.0.1", call="connect", errno=99)
    v = verdict(req("127.0.0.1"), a, [], {"net.ipv4.tcp_tw_reuse": "2",
                                          "net.ipv4.tcp_fin_timeout": "60"}, None, "process",
                usage)
    text = " ".join(v.advice)
    assert v.cause == "ephemeral_exhausted"
    assert "8 ports are held by orphaned FIN_WAIT2 minisocks" in text
    assert "tcp_tw_reuse never reuses those" in text and "tcp_fin_timeout = 60 s" in text
    assert "No TIME_WAIT toward this destination" in text


@pytest.mark.parametrize(("sysctls", "dest", "phrase"), [
    ({"net.ipv4.tcp_tw_reuse": "0"}, "10.0.0.9", "tcp_tw_reuse = 0: set it to 1"),
    ({"net.ipv4.tcp_tw_reuse": "2"}, "10.0.0.9", "applies to loopback only, and 10.0.0.9 is"),
    ({"net.ipv4.tcp_tw_reuse": "2"}, "127.0.0.1", "tcp_tw_reuse = 2 already applies"),
    ({"net.ipv4.tcp_tw_reuse": "1", "net.ipv4.tcp_timestamps": "0"}, "10.0.0.9",
     "cannot help while net.ipv4.tcp_timestamps = 0"),
])
def test_connect_exhaustion_follows_tcp_twsk_unique(sysctls, dest, phrase):
    from portrace.events import PortUsage
    usage = PortUsage(low=42000, high=42007, reserved=0, in_use=8, by_state={"TIME_WAIT": 8},
                      time_wait_to_destination=8, fin_wait2_to_destination=0)
    v = verdict(req(dest), attempt(dest, call="connect", errno=99), [], sysctls, None,
                "process", usage)
    assert phrase in " ".join(v.advice), v.advice


def test_two_binders_of_one_address_are_not_called_inherited():
    """SO_REUSEADDR lets two processes bind one address; the one holding the
    listener bound it itself even if the other bound after it."""
    lst = sock("LISTEN", "127.0.0.1", inode=7001)
    holders = {7001: [Holder(pid=10, ppid=1, comm="first", fds=(3,))]}
    first = dataclasses.replace(attempt("127.0.0.1"), pid=10, errno=0)
    second = dataclasses.replace(attempt("127.0.0.1"), pid=11, errno=0)
    binders = {("inet", "127.0.0.1", 9090): [first, second]}
    [b] = find_blockers(req("127.0.0.1"), [lst], holders, {}, binders)
    assert [(p.pid, p.inherited) for p in b.processes] == [(10, False)]


def test_connect_advice_on_a_kernel_without_tcp_tw_reuse_delay():
    """6.1 has no tcp_tw_reuse_delay (found in the Debian VM): a fixed second."""
    from portrace.events import PortUsage
    usage = PortUsage(low=42000, high=42007, reserved=0, in_use=8, by_state={"TIME_WAIT": 8},
                      time_wait_to_destination=8, fin_wait2_to_destination=0)
    v = verdict(req("127.0.0.1"), attempt("127.0.0.1", call="connect", errno=99), [],
                {"net.ipv4.tcp_tw_reuse": "0"}, None, "process", usage)
    text = " ".join(v.advice)
    assert "older than 1 s (fixed: this kernel has no tcp_tw_reuse_delay)" in text
    assert "tcp_tw_reuse_delay = " not in text
