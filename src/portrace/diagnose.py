"""Pair a failed bind() with what blocks it, and say why, as the kernel would.

Pure functions of data (a snapshot, close history, sysctls): unit-testable
without root. Each rule names the kernel function it mirrors (Linux 6.x):

- Address overlap: net/ipv4/inet_connection_sock.c: inet_rcv_saddr_equal,
  ipv4_rcv_saddr_equal, ipv6_rcv_saddr_equal (match_wildcard = true on bind), and
  __inet_bhash2_conflict (an IPV6_V6ONLY socket never conflicts with IPv4 or
  v4-mapped). A specific, non-mapped IPv6 bind is made IPV6_V6ONLY by the kernel
  (net/ipv6/af_inet6.c: __inet6_bind).
- TCP reuse: inet_bind_conflict: no conflict if both have SO_REUSEADDR and the
  old one is not LISTEN, or both SO_REUSEPORT and the old one is TIME_WAIT or has
  the same uid. Different bound devices never conflict.
- UDP reuse: net/ipv4/udp.c: udp_lib_lport_inuse: no conflict if both have
  SO_REUSEADDR, or both SO_REUSEPORT under the same uid.
- Minisocks keep the old socket's SO_REUSEADDR/SO_REUSEPORT
  (net/ipv4/inet_timewait_sock.c: inet_twsk_alloc).

The probes do not yet see SO_REUSEADDR/SO_REUSEPORT, IPV6_V6ONLY set by
setsockopt() or SO_BINDTODEVICE on the failing socket, so no overlapping socket
is excluded on those grounds: every socket listed could be the one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from portrace.events import (
    BindAttempt,
    Blocker,
    Closer,
    Endpoint,
    ProcessRef,
    StateChange,
    Task,
    Verdict,
    errno_name,
)
from portrace.sockets import Holder, SocketEntry

CAUSES = (
    "listener",
    "connected_socket",
    "bound_socket",
    "time_wait",
    "fin_wait2",
    "udp_socket",
    "unknown",
    "not_a_conflict",
)

TCP_TIMEWAIT_LEN_S = 60  # include/net/tcp.h; a compile-time constant
EADDRINUSE = 98

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address

# (family, addr, port) a successful bind() asked for; the key of ``binders``.
BoundAddress = tuple[str, str, int]


@dataclass(frozen=True)
class Request:
    """The address a failing socket asked for.

    ``v6only``: True/False when known, None when it depends on IPV6_V6ONLY /
    net.ipv6.bindv6only, which the probes do not see yet.
    """

    protocol: str  # tcp | udp | unknown
    family: str  # inet | inet6
    addr: str
    port: int
    v6only: bool | None = None

    @classmethod
    def of(cls, attempt: BindAttempt) -> Request:
        v6only = None
        if attempt.family == "inet6":
            a = IPv6(attempt.addr)
            if not a.is_unspecified and a.ipv4_mapped is None:
                v6only = True  # __inet6_bind forces it for a specific address
        return cls(attempt.protocol, attempt.family, attempt.addr, attempt.port, v6only)


def _v4_view(family: str, addr: str) -> IPv4 | None:
    """The IPv4 address a socket also answers for, None if it has none."""
    if family == "inet":
        return IPv4(addr)
    a = IPv6(addr)
    if a.is_unspecified:
        return IPv4("0.0.0.0")
    return a.ipv4_mapped


def _overlaps(req: Request, req_v6only: bool, sock: SocketEntry) -> bool:
    other_v6only = bool(sock.v6only)
    if req.family == "inet":
        # ipv4_rcv_saddr_equal(sk, sk2, sk2_ipv6only, true, true)
        if other_v6only:
            return False
        mine, theirs = IPv4(req.addr), _v4_view(sock.family, sock.local.addr)
        if theirs is None:
            return False
        return mine == theirs or mine.is_unspecified or theirs.is_unspecified
    # ipv6_rcv_saddr_equal(sk1 = request, sk2 = existing, ..., true, true)
    mine6 = IPv6(req.addr)
    mine_mapped = mine6.ipv4_mapped is not None
    theirs6 = IPv6(sock.local.addr) if sock.family == "inet6" else None
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
               binders: Mapping[BoundAddress, Task]) -> tuple[ProcessRef, ...]:
    """Holders of the socket, and whether each inherited it: the probes saw
    another process bind this address (and that process no longer holds it,
    or holds it too), or the holder shares it with its parent."""
    held = holders.get(s.inode, ())
    pids = {h.pid for h in held}
    binder = binders.get((s.family, s.local.addr, s.local.port))
    if binder is not None and len(held) > 1 and binder.pid not in pids:
        binder = None  # several holders, none the binder: cannot tell who inherited
    refs = []
    for h in sorted(held, key=lambda h: h.pid):
        if binder is not None:
            inherited: bool | None = h.pid != binder.pid
        elif h.ppid in pids:
            inherited = True  # shares the socket with its parent: fork inheritance
        else:
            inherited = None
        refs.append(ProcessRef(pid=h.pid, comm=h.comm, fds=h.fds, inherited=inherited))
    return tuple(refs)


def find_blockers(
    req: Request,
    sockets: Sequence[SocketEntry],
    holders: Mapping[int, Sequence[Holder]],
    closers: Mapping[tuple[str, Endpoint, Endpoint], Closer],
    binders: Mapping[BoundAddress, Task],
) -> list[Blocker]:
    """The sockets on the requested port whose address overlaps, ordered
    LISTEN, live, bound-only, minisocks. ``closers`` is keyed by
    (family, local, remote) of minisocks; ``binders`` by the address a
    successful bind() asked for."""
    found = [
        s for s in sockets
        if s.local.port == req.port
        and (req.protocol == "unknown" or s.protocol == req.protocol)
        and overlaps(req, s)
    ]
    found.sort(key=_rank)
    out = []
    for s in found:
        closed_by = closers.get((s.family, s.local, s.remote)) if s.remote else None
        out.append(Blocker(
            state=s.state,
            protocol=s.protocol,
            family=s.family,
            local=s.local,
            remote=s.remote,
            processes=_processes(s, holders, binders) if s.inode else (),
            inode=s.inode,
            uid=s.uid,
            expires_s=None if s.expires_ms is None else s.expires_ms / 1000.0,
            closed_by=closed_by,
            minisock=s.minisock,
            v6only=s.v6only,
            bound_dev_if=s.bound_dev_if,
        ))
    return out


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


def describe(b: Blocker) -> str:
    """One line: state, 4-tuple, timer, holders. Used by verdicts and render."""
    if b.remote is None:
        where = str(b.local)
    elif b.state in ("TIME_WAIT", "FIN_WAIT2") and b.minisock:
        where = f"{b.local} <- {b.remote}"
    else:
        where = f"{b.local} <-> {b.remote}"
    parts = [f"{b.protocol.upper() + ' ' if b.protocol == 'udp' else ''}{b.state} {where}"]
    if b.expires_s is not None:
        parts.append(f"{b.expires_s:.1f} s left")
    if b.closed_by is not None:
        parts.append(f"closed by {b.closed_by.comm}[{b.closed_by.pid}]")
    if b.processes:
        held = ", ".join(
            f"{p.comm}[{p.pid}]" + (" (inherited fd)" if p.inherited else "") for p in b.processes
        )
        parts.append(f"held by {held}")
    elif not b.minisock:
        parts.append("held by no process (orphaned)")
    return ", ".join(parts)


def _holders_phrase(b: Blocker) -> str:
    return ", ".join(f"{p.comm}[{p.pid}]" for p in b.processes)


def _kill_advice(b: Blocker) -> str:
    pids = " ".join(str(p.pid) for p in b.processes)
    text = f"Now: stop what holds it: `kill {pids}` ({_holders_phrase(b)})."
    if any(p.inherited for p in b.processes):
        text += (" It holds an fd it inherited (fork/exec) from the process that bound the "
                 "socket; open listeners with SOCK_CLOEXEC, or close them in the child.")
    return text


def _ss_kill(b: Blocker) -> str:
    dst = f" dst {b.remote}" if b.remote else ""
    state = b.state.lower().replace("_", "-")
    return f"`ss -K state {state} src {b.local}{dst}`"


_REUSEADDR_WHY = (
    "two SO_REUSEADDR sockets conflict only when the old one is LISTEN "
    "(net/ipv4/inet_connection_sock.c: inet_bind_conflict)"
)
_NOT_TW_REUSE = (
    "Does not apply: net.ipv4.tcp_tw_reuse is read only on the connect() path "
    "(net/ipv4/tcp_ipv4.c: tcp_twsk_unique), never by bind()"
)


def _overlap_note(req: Request, b: Blocker) -> str | None:
    """Why two sockets of different families meet (ipv6_rcv_saddr_equal)."""
    if req.family == "inet" and b.family == "inet6":
        if IPv6(b.local.addr).ipv4_mapped is not None:
            return (f"{b.local} is a v4-mapped IPv6 address: to the kernel it is the IPv4 "
                    f"address {IPv6(b.local.addr).ipv4_mapped}.")
        return (f"{b.local} covers IPv4 because that socket is not IPV6_V6ONLY: set "
                "IPV6_V6ONLY on it, or serve both families from one dual-stack socket.")
    if req.family == "inet6" and b.family == "inet":
        if IPv6(req.addr).ipv4_mapped is not None:
            return (f"The v4-mapped address {req.addr} is the IPv4 address "
                    f"{IPv6(req.addr).ipv4_mapped} to the kernel, which {b.local} covers.")
        return (f"A [::] socket without IPV6_V6ONLY also claims IPv4, which {b.local} holds: "
                "set IPV6_V6ONLY on the new socket if it should serve IPv6 only.")
    return None


def verdict(req: Request, attempt: BindAttempt, blockers: Sequence[Blocker],
            sysctls: Mapping[str, str], last_seen: StateChange | None,
            netns_source: str) -> Verdict:
    """The cause (one of CAUSES), a one-line summary and ordered advice:
    what to do now, what to change in code, which common fixes do not apply."""
    if attempt.errno != EADDRINUSE:
        return _not_a_conflict(attempt, sysctls)
    if not blockers:
        return _gone(req, last_seen, netns_source)
    b = blockers[0]
    cause = cause_of(b)
    advice: list[str] = []
    note = _overlap_note(req, b)
    others = len(blockers) - 1
    more = f" (+{others} more socket{'s' if others > 1 else ''} on the port)" if others else ""

    if cause == "listener":
        summary = f"{describe(b)}{more}"
        advice.append(_kill_advice(b) if b.processes else
                      "Now: the listener has no process left; it goes away when its last "
                      "accepted connection closes.")
        if note:
            advice.append(note)
        advice.append("In code: SO_REUSEADDR cannot pass a LISTEN socket (inet_bind_conflict); "
                      "to run two servers on one port at once, set SO_REUSEPORT on both "
                      "before bind(), under the same uid.")
    elif cause in ("time_wait", "fin_wait2"):
        minis = [x for x in blockers if x.minisock]
        left = max(x.expires_s or 0.0 for x in minis)
        what = "TIME_WAIT" if cause == "time_wait" else "orphaned FIN_WAIT2"
        head = describe(b) if len(minis) == 1 else (
            f"{len(minis)} {what} sockets on {b.local.port}; the last ends in {left:.1f} s")
        summary = head + (more if len(minis) == 1 else "")
        advice.append(f"Now: wait {left:.0f} s, or destroy it: {_ss_kill(b)} "
                      "(needs CONFIG_INET_DIAG_DESTROY; tcp_abort).")
        if cause == "time_wait":
            advice.append(f"TIME_WAIT lasts TCP_TIMEWAIT_LEN = {TCP_TIMEWAIT_LEN_S} s "
                          "(include/net/tcp.h, fixed at compile time; in-window segments "
                          "re-arm it); no sysctl shortens it.")
        else:
            fin = sysctls.get("net.ipv4.tcp_fin_timeout")
            advice.append("The peer never sent its FIN. An orphaned FIN_WAIT2 lives "
                          f"net.ipv4.tcp_fin_timeout = {fin or '?'} s in this namespace "
                          "(net/ipv4/tcp.c: tcp_close, tcp_fin_time): lowering it shortens this "
                          "case, and only this one.")
        advice.append("In code: set SO_REUSEADDR on the listening socket before bind() in both "
                      "the old and the new process: the minisock keeps the old socket's flag "
                      f"(net/ipv4/inet_timewait_sock.c: inet_twsk_alloc), and {_REUSEADDR_WHY}.")
        if cause == "time_wait":
            advice.append(_NOT_TW_REUSE + "; net.ipv4.tcp_fin_timeout bounds orphaned FIN_WAIT2 "
                          "only, not TIME_WAIT.")
        else:
            advice.append(_NOT_TW_REUSE + ".")
    elif cause == "connected_socket":
        summary = f"{describe(b)}{more}"
        if b.processes:
            advice.append(_kill_advice(b) + f" Or abort the connection: {_ss_kill(b)}.")
        else:
            advice.append(f"Now: no process holds it any more; it ends with the connection, or "
                          f"abort it: {_ss_kill(b)}.")
        advice.append("A connection accepted by the old server keeps the port after its "
                      "listener closed. In code: set SO_REUSEADDR on the listening socket before "
                      "bind() in both old and new server (accepted sockets inherit it); "
                      f"{_REUSEADDR_WHY}.")
        advice.append(_NOT_TW_REUSE + ".")
    elif cause == "bound_socket":
        summary = f"bound, not listening: {describe(b)}{more}"
        advice.append(_kill_advice(b) if b.processes else "Now: no process holds it.")
        if note:
            advice.append(note)
        advice.append("In code: a socket bound but never listened on still owns the port; "
                      "close it, or set SO_REUSEADDR on both sockets: " + _REUSEADDR_WHY + ".")
    else:  # udp_socket
        summary = f"{describe(b)}{more}"
        advice.append(_kill_advice(b) if b.processes else "Now: no process holds it.")
        if note:
            advice.append(note)
        advice.append("In code: UDP sockets share a port when both set SO_REUSEADDR, or both "
                      "SO_REUSEPORT under the same uid (net/ipv4/udp.c: udp_lib_lport_inuse).")
    return Verdict(cause=cause, summary=summary, advice=tuple(advice))


def _gone(req: Request, last_seen: StateChange | None, netns_source: str) -> Verdict:
    ep = Endpoint(req.addr, req.port)
    summary = f"nothing on port {req.port} overlaps {ep} any more: the blocker was gone by lookup"
    advice = ["Now: a retry may already succeed."]
    if last_seen is not None:
        who = f" ({last_seen.owner.comm}[{last_seen.owner.pid}])" if last_seen.owner else ""
        summary += (f"; last seen on the port: {last_seen.local} <-> {last_seen.remote} "
                    f"{last_seen.old} -> {last_seen.new}{who}")
    if netns_source == "tracer":
        advice.append("The failing process exited before its network namespace could be read; "
                      "portrace looked in its own. If that process ran in a container, its "
                      "blocker is in the container's namespace.")
    return Verdict(cause="unknown", summary=summary, advice=tuple(advice))


_ERRNO_ADVICE = {
    "EACCES": "Ports below net.ipv4.ip_unprivileged_port_start need CAP_NET_BIND_SERVICE "
              "(net/ipv4/af_inet.c: inet_bind_sk).",
    "EADDRNOTAVAIL": "The address is not assigned in this network namespace; IP_FREEBIND or "
                     "net.ipv4.ip_nonlocal_bind allow binding it anyway.",
    "EINVAL": "The socket is already bound, or the address length or family is wrong.",
}


def _not_a_conflict(attempt: BindAttempt, sysctls: Mapping[str, str]) -> Verdict:
    name = errno_name(attempt.errno)
    return Verdict(
        cause="not_a_conflict",
        summary=f"bind() failed with {name}, not a port conflict: nothing was looked up",
        advice=(_ERRNO_ADVICE.get(name, "See bind(2) for this errno."),),
    )
