"""Which sockets block a failed bind()/listen(), by the kernel's own rules.

Pure functions of data (a sock_diag snapshot, the options the probes saw,
close history): unit-testable without root. Every rule portrace applies is in
RULES below, with the kernel function it mirrors (Linux 6.x), so a reader can
check each against the source. Verdict text lives in portrace.judge.advice.

Options (SO_REUSEADDR, SO_REUSEPORT, IPV6_V6ONLY, SO_BINDTODEVICE) are
three-valued: True/False when the probes saw them, None when not. A socket is
left out only when the rules say it certainly does not conflict.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from portrace.events import (
    UNKNOWN_OPTS,
    Blocker,
    Closer,
    Endpoint,
    Owner,
    ProcessRef,
    SocketCall,
    SockOpts,
)
from portrace.kernel.engine import Holder, SocketEntry


@dataclass(frozen=True)
class Rule:
    source: str  # file: function, in the kernel tree
    says: str


RULES: dict[str, Rule] = {
    "overlap": Rule(
        "net/ipv4/inet_connection_sock.c: inet_rcv_saddr_equal, ipv6_rcv_saddr_equal",
        "two local addresses overlap when equal or either is a wildcard; [::] without "
        "IPV6_V6ONLY also covers IPv4; a v4-mapped address is its IPv4 address"),
    "v6only_specific": Rule(
        "net/ipv6/af_inet6.c: __inet6_bind",
        "binding a specific, non-mapped IPv6 address sets IPV6_V6ONLY"),
    "v6only_never_v4": Rule(
        "net/ipv4/inet_connection_sock.c: __inet_bhash2_conflict",
        "an IPV6_V6ONLY socket never conflicts with an IPv4 or v4-mapped bind"),
    "device": Rule(
        "net/ipv4/inet_connection_sock.c: inet_bind_conflict",
        "sockets bound to different devices (SO_BINDTODEVICE) never conflict"),
    "reuseaddr": Rule(
        "net/ipv4/inet_connection_sock.c: inet_bind_conflict",
        "no conflict when both sockets have SO_REUSEADDR and the old one is not LISTEN"),
    "reuseport": Rule(
        "net/ipv4/inet_connection_sock.c: inet_bind_conflict",
        "no conflict when both sockets have SO_REUSEPORT and the old one is TIME_WAIT "
        "or has the same owner: sk_uid, the creator's fsuid at socket(), not the caller's uid "
        "(sk_reuseport_match)"),
    "udp_reuse": Rule(
        "net/ipv4/udp.c: udp_lib_lport_inuse",
        "UDP: no conflict when both have SO_REUSEADDR, or both SO_REUSEPORT and the "
        "same uid"),
    "minisock_keeps_flags": Rule(
        "net/ipv4/inet_timewait_sock.c: inet_twsk_alloc",
        "a TIME_WAIT / FIN_WAIT2 minisock keeps the closed socket's SO_REUSEADDR and "
        "SO_REUSEPORT"),
    "accept_keeps_flags": Rule(
        "net/core/sock.c: sk_clone_lock",
        "an accepted socket is a clone of its listener and keeps its options"),
    "listen_recheck": Rule(
        "net/ipv4/inet_connection_sock.c: inet_csk_listen_start",
        "listen() checks the port again as a LISTEN socket: two SO_REUSEADDR sockets "
        "may share an address until one listens"),
    "timewait_len": Rule(
        "include/net/tcp.h: TCP_TIMEWAIT_LEN",
        "TIME_WAIT lasts 60 s, fixed at compile time; in-window segments re-arm it"),
    "fin_timeout": Rule(
        "net/ipv4/tcp.c: tcp_close; include/net/tcp.h: tcp_fin_time",
        "net.ipv4.tcp_fin_timeout bounds how long an orphaned FIN_WAIT2 lives"),
    "tw_reuse": Rule(
        "net/ipv4/tcp_ipv4.c: tcp_twsk_unique",
        "net.ipv4.tcp_tw_reuse lets connect() take over a TIME_WAIT 4-tuple: 1 = any, "
        "2 = loopback only; needs timestamps seen on it (tcp_timestamps), waits "
        "tcp_tw_reuse_delay ms after it entered TIME_WAIT, never for a FIN_WAIT2 minisock; "
        "bind() and listen() never read it"),
    "timewait_table": Rule(
        "net/ipv4/inet_timewait_sock.c: inet_twsk_alloc; net/ipv4/tcp_minisocks.c: "
        "tcp_time_wait",
        "no TIME_WAIT or FIN_WAIT2 minisock is made while the namespace holds "
        "net.ipv4.tcp_max_tw_buckets of them: the socket is closed at once and its port "
        "is free (counted as TcpExt TCPTimeWaitOverflow)"),
    "autobind": Rule(
        "net/ipv4/inet_connection_sock.c: inet_csk_find_open_port",
        "bind() to port 0 and listen() on an unbound socket pick a free port of "
        "ip_local_port_range, skipping ip_local_reserved_ports; none free: EADDRINUSE"),
    "local_port_range": Rule(
        "net/ipv4/inet_connection_sock.c: inet_sk_get_local_port_range",
        "a socket's own IP_LOCAL_PORT_RANGE (6.8+) narrows ip_local_port_range for that "
        "socket, each end only where it falls inside the namespace's range"),
    "connect_port": Rule(
        "net/ipv4/inet_hashtables.c: __inet_hash_connect",
        "connect() on an unbound socket picks a local port of ip_local_port_range, "
        "skipping ip_local_reserved_ports, whose 4-tuple is unused (or a reusable "
        "TIME_WAIT's); none left: EADDRNOTAVAIL"),
    "destroy": Rule(
        "net/ipv4/tcp.c: tcp_abort (CONFIG_INET_DIAG_DESTROY)",
        "sock_diag can destroy a socket, TIME_WAIT included: ss -K"),
    # bind() refused before any socket is compared (judge.refusals).
    "port_rule": Rule(
        "include/net/ip.h: inet_port_requires_bind_service; net/ipv4/af_inet.c: __inet_bind",
        "a port below the netns's net.ipv4.ip_unprivileged_port_start (IPv6 too) needs "
        "CAP_NET_BIND_SERVICE in the user namespace that owns the netns, else EACCES"),
    "ns_capable": Rule(
        "kernel/capability.c: ns_capable; security/commoncap.c: cap_capable",
        "a capability counts in the user namespace it is held in and in those it owns "
        "below; held in a namespace below or beside the netns's owner, it does not"),
    "v4_local": Rule(
        "net/ipv4/af_inet.c: __inet_bind, inet_addr_valid_or_nonlocal",
        "an IPv4 address must be local in the netns (assigned to an interface, up or "
        "down), unless net.ipv4.ip_nonlocal_bind, IP_FREEBIND or IP_TRANSPARENT; else "
        "EADDRNOTAVAIL"),
    "v6_local": Rule(
        "net/ipv6/af_inet6.c: __inet6_bind, ipv6_can_nonlocal_bind",
        "an IPv6 address must be assigned in the netns, and not tentative, unless "
        "net.ipv6.ip_nonlocal_bind, IPV6_FREEBIND or IPV6_TRANSPARENT; else EADDRNOTAVAIL"),
    "v6_tentative": Rule(
        "net/ipv6/addrconf.c: ipv6_chk_addr (IFA_F_TENTATIVE banned)",
        "an address counts as assigned only once duplicate address detection is done"),
    "cgroup_bind": Rule(
        "net/ipv4/af_inet.c: inet_bind_sk; kernel/bpf/cgroup.c: "
        "__cgroup_bpf_run_filter_sock_addr, bpf_prog_run_array_cg",
        "the cgroup's bind4/bind6 programs run before the port rule; one that returns 0 "
        "gives EPERM, or the errno it set with bpf_set_retval"),
    "lsm_bind": Rule(
        "net/socket.c: __sys_bind_socket, security_socket_bind",
        "every active LSM is asked before the address family's bind; a refusal is EACCES"),
    "seccomp_first": Rule(
        "kernel/entry/common.c: syscall_trace_enter",
        "a seccomp filter decides before the sys_enter tracepoint: a call it refuses "
        "(SECCOMP_RET_ERRNO) is never traced, so portrace does not see it"),
    "bound_once": Rule(
        "net/ipv4/af_inet.c: __inet_bind; net/ipv6/af_inet6.c: __inet6_bind",
        "a socket already bound (inet_num set) or no longer in TCP_CLOSE gets EINVAL"),
    "v6_scope": Rule(
        "net/ipv6/af_inet6.c: __inet6_bind",
        "a link-local address needs an interface, sin6_scope_id or SO_BINDTODEVICE; else "
        "EINVAL"),
    "dad": Rule(
        "net/ipv6/addrconf.c: addrconf_dad_begin, addrconf_dad_work",
        "DAD starts once the interface is up with a carrier and sends dad_transmits "
        "neighbour solicitations retrans_time_ms apart; one answer from another node makes "
        "the address dadfailed for good"),
}

CAUSES = (
    "listener",
    "connected_socket",
    "bound_socket",
    "time_wait",
    "fin_wait2",
    "udp_socket",
    "ephemeral_exhausted",
    "unknown",
    "not_a_conflict",
    "privileged_port",
    "address_not_local",
    "address_tentative",
    "address_dadfailed",
    "already_bound",
    "link_local_scope",
    "cgroup_bpf",
    "lsm",
)

TCP_TIMEWAIT_LEN_S = 60
# A busy port (thousands of connections) is summarised: the blockers listed
# are the first of these, the rest only counted by state (blockers_total,
# blockers_by_state).
MAX_BLOCKERS_LISTED = 32
EADDRINUSE, EADDRNOTAVAIL = 98, 99

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address
# Parsed once per address: a port with 8k sockets has a handful of local
# addresses, and parsing was a third of judging them.
_ip4 = functools.lru_cache(maxsize=1024)(IPv4)
_ip6 = functools.lru_cache(maxsize=1024)(IPv6)

# (family, addr, port) a successful bind() asked for; the key of ``binders``,
# whose values are the recent successful binds of that address, oldest first
# (SO_REUSEADDR / SO_REUSEPORT let several sockets bind one address).
BoundAddress = tuple[str, str, int]
Binders = Mapping[BoundAddress, Sequence[SocketCall]]


@dataclass(frozen=True)
class Request:
    """The address a failing socket asked for (bind) or holds (listen).

    ``v6only``: True/False when known, None when IPV6_V6ONLY was not seen and
    net.ipv6.bindv6only was not given.
    """

    protocol: str  # tcp | udp | unknown
    family: str  # inet | inet6
    addr: str
    port: int
    v6only: bool | None = None
    opts: SockOpts = UNKNOWN_OPTS
    uid: int | None = None  # the socket's owner (sk_uid), None when not known
    call: str = "bind"

    @classmethod
    def of(cls, attempt: SocketCall, bindv6only: bool | None = None) -> Request:
        """The owner uid is the socket's sk_uid where the engine read it; the
        caller's uid is no stand-in for it (RULES reuseport), so else None."""
        v6only = attempt.opts.v6only
        if attempt.family == "inet6":
            a = IPv6(attempt.addr)
            if not a.is_unspecified and a.ipv4_mapped is None:
                v6only = True  # RULES["v6only_specific"]
            elif v6only is None:
                v6only = bindv6only
        return cls(attempt.protocol, attempt.family, attempt.addr, attempt.port, v6only,
                   attempt.opts, attempt.sk_uid, attempt.call)


def all3(*vals: bool | None) -> bool | None:
    """Three-valued AND: False if any is False, None if any is unknown."""
    if any(v is False for v in vals):
        return False
    return None if any(v is None for v in vals) else True


def any3(*vals: bool | None) -> bool | None:
    if any(v is True for v in vals):
        return True
    return None if any(v is None for v in vals) else False


@functools.lru_cache(maxsize=1024)
def _v4_view(family: str, addr: str) -> IPv4 | None:
    """The IPv4 address a socket also answers for, None if it has none."""
    if family == "inet":
        return _ip4(addr)
    a = _ip6(addr)
    if a.is_unspecified:
        return _ip4("0.0.0.0")
    return a.ipv4_mapped


def _overlaps(req: Request, req_v6only: bool, sock: SocketEntry) -> bool:
    other_v6only = bool(sock.v6only)
    if req.family == "inet":
        # ipv4_rcv_saddr_equal(sk, sk2, sk2_ipv6only, true, true)
        if other_v6only:
            return False
        mine, theirs = _ip4(req.addr), _v4_view(sock.family, sock.local.addr)
        if theirs is None:
            return False
        return mine == theirs or mine.is_unspecified or theirs.is_unspecified
    # ipv6_rcv_saddr_equal(sk1 = request, sk2 = existing, ..., true, true)
    mine6 = _ip6(req.addr)
    mine_mapped = mine6.ipv4_mapped is not None
    theirs6 = _ip6(sock.local.addr) if sock.family == "inet6" else None
    theirs_mapped = theirs6 is None or theirs6.ipv4_mapped is not None
    if mine_mapped and theirs_mapped:
        if other_v6only:
            return False
        a, b = mine6.ipv4_mapped, _v4_view(sock.family, sock.local.addr)
        return a == b or bool(a and a.is_unspecified) or bool(b and b.is_unspecified)
    mine_any = mine6.is_unspecified
    theirs_any = theirs6 is not None and theirs6.is_unspecified
    if mine_any and theirs_any:
        return True
    if theirs_any and not (other_v6only and mine_mapped):
        return True
    if mine_any and not (req_v6only and theirs_mapped):
        return True
    return theirs6 is not None and mine6 == theirs6


def overlaps(req: Request, sock: SocketEntry) -> bool:
    """Whether ``sock``'s local address overlaps the requested one, as
    inet_rcv_saddr_equal(sk, sk2, true) decides. An unknown IPV6_V6ONLY on the
    request counts as overlapping if either setting would."""
    if req.v6only is None:
        return _overlaps(req, False, sock) or _overlaps(req, True, sock)
    return _overlaps(req, req.v6only, sock)


def conflicts(req: Request, sock: SocketEntry, opts: SockOpts) -> bool | None:
    """Whether ``sock`` (with options ``opts``) blocks ``req`` once the addresses
    overlap: RULES device, reuseaddr, reuseport (TCP) or udp_reuse. None when an
    unknown option decides it."""
    if sock.bound_dev_if and req.opts.bound_to_device is not False:
        return None  # both may be bound, to devices we cannot compare
    same_uid = None if req.uid is None or sock.minisock else req.uid == sock.uid
    if sock.protocol == "udp":
        passes = any3(all3(req.opts.reuseaddr, opts.reuseaddr),
                      all3(req.opts.reuseport, opts.reuseport, same_uid))
    else:
        passes = any3(
            all3(req.opts.reuseaddr, opts.reuseaddr, sock.state != "LISTEN"),
            all3(req.opts.reuseport, opts.reuseport,
                 any3(sock.state == "TIME_WAIT", same_uid)))
    return None if passes is None else not passes


def _rank(sock: SocketEntry) -> tuple[int, float]:
    """LISTEN first, then other live sockets, then bound-only, then minisocks
    (longest-lived first: the port is free only when the last one expires)."""
    if sock.state == "LISTEN":
        return (0, 0.0)
    if sock.minisock:
        return (3, -(sock.expires_ms or 0))
    if sock.state in ("CLOSE", "UNCONN", "BOUND_INACTIVE"):
        return (2, 0.0)
    return (1, 0.0)


def _processes(s: SocketEntry, holders: Mapping[int, Sequence[Holder]],
               binders: Binders, owners: Mapping[int, int],
               belongs: Mapping[tuple[int, int], Owner]) -> tuple[ProcessRef, ...]:
    """Holders of the socket, and whether each inherited it: it is not the
    process the kernel saw bind or listen on this very socket (``owners``, by
    struct sock), or not among the processes seen binding this address (one of
    which is), or it shares the socket with its parent."""
    held = holders.get(s.inode, ())
    pids = {h.pid for h in held}
    if s.skaddr in owners:
        # The kernel saw this very socket bound or listened on by that pid:
        # every other holder got the fd by fork/exec or SCM_RIGHTS.
        bound_by = {owners[s.skaddr]}
    else:
        bound_by = {b.pid for b in binders.get((s.family, s.local.addr, s.local.port), ())}
        if bound_by and len(held) > 1 and not bound_by & pids:
            bound_by = set()  # several holders, none a binder of the address: cannot tell
    refs = []
    for h in sorted(held, key=lambda h: h.pid):
        if bound_by:
            inherited: bool | None = h.pid not in bound_by
        elif h.ppid in pids:
            inherited = True  # shares the socket with its parent: fork inheritance
        else:
            inherited = None
        refs.append(ProcessRef(pid=h.pid, comm=h.comm, fds=h.fds, inherited=inherited,
                               owner=belongs.get((s.inode, h.pid))))
    return tuple(refs)


def _options(s: SocketEntry, closer: Closer | None, fd_opts: Mapping[int, SockOpts],
             holders: Mapping[int, Sequence[Holder]],
             binders: Binders) -> tuple[SockOpts, str | None]:
    """A socket's options and where they come from: the close that made the
    minisock (RULES minisock_keeps_flags), the probes' record of a holder's fd
    (accepted sockets included: accept_keeps_flags), or the bind seen for its
    address, a holder's own if there is one (an inherited fd is the same socket)."""
    if s.opts is not None:
        return s.opts, "kernel"  # read from the socket (minisocks: their own copy)
    if s.minisock:
        if closer is None or closer.opts == UNKNOWN_OPTS:
            return UNKNOWN_OPTS, None
        return closer.opts, "closer"
    if s.inode in fd_opts:
        return fd_opts[s.inode], "probes"
    seen = binders.get((s.family, s.local.addr, s.local.port), ())
    if seen:
        pids = {h.pid for h in holders.get(s.inode, ())}
        own = [b for b in seen if b.pid in pids]
        return (own or list(seen))[-1].opts, "binder"
    return UNKNOWN_OPTS, None


def find_blockers(
    req: Request,
    sockets: Sequence[SocketEntry],
    holders: Mapping[int, Sequence[Holder]],
    closers: Mapping[tuple[str, Endpoint, Endpoint], Closer],
    binders: Binders,
    fd_opts: Mapping[int, SockOpts] | None = None,
    exclude_inodes: Iterable[int] = (),
    owners: Mapping[int, int] | None = None,
    holders_complete: bool = True,
    belongs: Mapping[tuple[int, int], Owner] | None = None,
) -> list[Blocker]:
    """The sockets on the requested port that overlap the request and may
    conflict with it, ordered LISTEN, live, bound-only, minisocks.

    ``closers``: minisock closers by (family, local, remote). ``binders``: the
    recent successful bind()s seen per (family, addr, port). ``fd_opts``: options
    the probes hold for a socket inode via a holder's fd. ``exclude_inodes``:
    the failing socket itself (bound, when listen() fails). ``owners``: struct
    sock address -> the pid the kernel saw bind or listen on it.
    ``holders_complete``: False when some processes' fds were unreadable.
    ``belongs``: (socket inode, pid) -> the holder's unit, container, pod."""
    skip = set(exclude_inodes) - {0}
    owners = owners or {}
    fd_opts = fd_opts or {}
    found = []
    for s in sockets:
        if (s.local.port != req.port or s.inode in skip
                or (req.protocol != "unknown" and s.protocol != req.protocol)
                or not overlaps(req, s)):
            continue
        closer = closers.get((s.family, s.local, s.remote)) if s.remote else None
        opts, source = _options(s, closer, fd_opts, holders, binders)
        verdict = conflicts(req, s, opts)
        if verdict is False:
            continue
        found.append((s, closer, opts, source, verdict))
    found.sort(key=lambda row: _rank(row[0]))
    return [
        Blocker(
            state=s.state,
            protocol=s.protocol,
            family=s.family,
            local=s.local,
            remote=s.remote,
            processes=_processes(s, holders, binders, owners, belongs or {}) if s.inode else (),
            inode=s.inode,
            uid=s.uid,
            expires_s=None if s.expires_ms is None else s.expires_ms / 1000.0,
            closed_by=closer,
            minisock=s.minisock,
            v6only=s.v6only,
            bound_dev_if=s.bound_dev_if,
            opts=opts,
            opts_source=source,
            conflict=verdict,
            holders_known=holders_complete or bool(s.inode and holders.get(s.inode)),
        )
        for s, closer, opts, source, verdict in found
    ]


def cause_of(b: Blocker) -> str:
    if b.protocol == "udp":
        return "udp_socket"
    if b.state == "LISTEN":
        return "listener"
    if b.minisock:
        return "time_wait" if b.state == "TIME_WAIT" else "fin_wait2"
    if b.state in ("CLOSE", "BOUND_INACTIVE"):
        return "bound_socket"
    return "connected_socket"


def summarised(blockers: list[Blocker]
                ) -> tuple[list[Blocker], int | None, dict[str, int] | None]:
    """At most MAX_BLOCKERS_LISTED blockers, those the kernel's rule says
    conflict and listeners first; with the total and a count by state when
    some are left out (None, None when all are listed)."""
    if len(blockers) <= MAX_BLOCKERS_LISTED:
        return blockers, None, None
    ranked = sorted(blockers, key=lambda b: (b.conflict is not True, b.state != "LISTEN"))
    return (ranked[:MAX_BLOCKERS_LISTED], len(blockers),
            dict(Counter(b.state for b in blockers)))
