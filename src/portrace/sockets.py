"""Who holds a port right now: sock_diag (via pyroute2) in a given network
namespace, and every process whose fd table holds each socket's inode.

Kernel facts used here (checked against the source and on 6.18):
- TIME_WAIT / FIN_WAIT2 minisocks come back from an inet_diag dump with
  ``idiag_expires`` in ms, uid 0 and inode 0 (net/ipv4/inet_diag.c:
  inet_twsk_diag_fill).
- Bound-only TCP sockets are dumped only when the request's state mask has bit
  13 (TCP_BOUND_INACTIVE, 6.5+) and are reported in state CLOSE; that part of the
  dump ignores ``idiag_sport``, so ports are filtered here too.
- A dump is per network namespace: the netlink socket's namespace.
- Socket inodes are unique machine-wide, so one /proc scan serves every netns.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import shlex
import socket
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil

from portrace.events import FAMILIES, Endpoint, Netns, PortUsage, SockOpts, tcp_state_name

ALL_STATES = (1 << 14) - 1  # every TCP state plus bit 13, TCP_BOUND_INACTIVE
MINISOCK_STATES = ("TIME_WAIT", "FIN_WAIT2")

# sock_diag reports an unconnected UDP socket in TCP_CLOSE; ss calls it UNCONN.
UDP_STATE = {7: "UNCONN", 1: "ESTABLISHED"}


@dataclass(frozen=True)
class SocketEntry:
    """One socket from a sock_diag dump. ``expires_ms`` is set for minisocks."""

    protocol: str  # tcp | udp
    family: str  # inet | inet6
    state: str
    local: Endpoint
    remote: Endpoint | None  # None when unconnected
    inode: int
    uid: int
    cookie: int
    expires_ms: int | None
    v6only: bool | None  # inet6 only (INET_DIAG_SKV6ONLY)
    bound_dev_if: int
    # Read from the socket itself (CO-RE engine), minisocks included; None
    # when the snapshot came from sock_diag, which does not report them.
    opts: SockOpts | None = None
    skaddr: int = 0  # the struct sock, 0 when not known (sock_diag)

    @property
    def minisock(self) -> bool:
        return is_minisock(self.protocol, self.inode, self.state)

# What the verdicts quote, read in the failing process's namespace.
VERDICT_SYSCTLS = (
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_max_tw_buckets",
    "net.ipv6.bindv6only",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.ip_autobind_reuse",
    "net.ipv4.tcp_tw_reuse",
    "net.ipv4.tcp_tw_reuse_delay",
    "net.ipv4.tcp_timestamps",
)


def is_minisock(protocol: str, inode: int, state: str) -> bool:
    """A TIME_WAIT/FIN_WAIT2 timewait socket: no inode, so no owner process."""
    return protocol == "tcp" and inode == 0 and state in MINISOCK_STATES


@dataclass(frozen=True)
class Holder:
    pid: int
    ppid: int
    comm: str
    fds: tuple[int, ...]


@dataclass
class Snapshot:
    sockets: list[SocketEntry]
    holders: dict[int, list[Holder]] = field(default_factory=dict)  # inode -> holders
    sysctls: dict[str, str] = field(default_factory=dict)  # as the namespace sees them
    # False when some process's fds could not be read (not root): then a
    # socket listed with no holder may still have one.
    holders_complete: bool = True


NETNS_NAMES = "/run/netns"  # where `ip netns add` pins named namespaces


def _pinned() -> Iterator[str]:
    """The paths of the namespaces pinned under /run/netns (``ip netns add``)."""
    try:
        with os.scandir(NETNS_NAMES) as it:
            yield from (e.path for e in it)
    except OSError:
        return


def netns_name(inode: int) -> str | None:
    """The ``ip netns`` name of a namespace, if it has one."""
    for path in _pinned():
        try:
            if os.stat(path).st_ino == inode:
                return os.path.basename(path)
        except OSError:
            continue
    return None


def _thread_netns(pid: int, tid: int) -> tuple[str, str]:
    """The failing thread's namespace, then its process's."""
    return f"/proc/{pid}/task/{tid}/ns/net", f"/proc/{pid}/ns/net"


def open_netns(pid: int, tid: int) -> tuple[int | None, Netns]:
    """An fd on the failing thread's network namespace, or None and portrace's
    own namespace when the thread is already gone (the caller closes the fd)."""
    for path in _thread_netns(pid, tid):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        inode = os.fstat(fd).st_ino
        return fd, Netns(inode=inode, source="process", name=netns_name(inode))
    inode = os.stat("/proc/self/ns/net").st_ino
    return None, Netns(inode=inode, source="tracer", name=netns_name(inode))


def open_netns_inode(inode: int, pid: int, tid: int) -> tuple[int | None, Netns]:
    """An fd on the network namespace whose inode the kernel reported for a
    failing thread (CO-RE engine). Tried in order: the thread itself, a name
    under /run/netns, any process in it. ``source`` says which: ``process``,
    ``pinned`` or ``member``; ``gone`` (and no fd) when nothing holds the
    namespace any more, so its sockets cannot be looked up (the caller closes
    the fd)."""
    for source, paths in (("process", _thread_netns(pid, tid)), ("pinned", _pinned()),
                          ("member", _members())):
        for path in paths:
            try:
                if os.stat(path).st_ino != inode:
                    continue
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            if os.fstat(fd).st_ino == inode:
                return fd, Netns(inode=inode, source=source, name=netns_name(inode))
            os.close(fd)
    return None, Netns(inode=inode, source="gone", name=None)


def _members() -> Iterator[str]:
    for pid in psutil.pids():
        yield f"/proc/{pid}/ns/net"


CLONE_NEWNET = 0x40000000  # include/uapi/linux/sched.h


def _setns(fd: int) -> None:
    """setns(2) for the calling thread only (os.setns is Python 3.12+)."""
    if hasattr(os, "setns"):
        os.setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(netns_fd: int | None) -> Iterator[None]:
    """Run the body with this thread in ``netns_fd`` (None: stay where we are).
    Raises OSError if the namespace cannot be entered."""
    if netns_fd is None:
        yield
        return
    home = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        _setns(netns_fd)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def socket_protocol(pid: int, fd: int) -> str | None:
    """``tcp``/``udp`` for a live process's socket fd, from sockfs's
    ``system.sockprotoname`` xattr (net/socket.c: sockfs_xattr_get); None if gone."""
    try:
        name = os.getxattr(f"/proc/{pid}/fd/{fd}", "system.sockprotoname").rstrip(b"\0")
    except OSError:
        return None
    return {b"TCP": "tcp", b"TCPv6": "tcp", b"UDP": "udp", b"UDPv6": "udp"}.get(name)


def _entry(protocol: str, msg: dict) -> SocketEntry:
    attrs = dict(msg.get("attrs", []))
    family = FAMILIES[msg["idiag_family"]]
    raw_state = msg["idiag_state"]
    if protocol == "tcp":
        state = tcp_state_name(raw_state)
    else:
        state = UDP_STATE.get(raw_state, str(raw_state))
    # Listening, bound-only and unconnected UDP sockets have no peer (port 0).
    remote = Endpoint(msg["idiag_dst"], msg["idiag_dport"]) if msg["idiag_dport"] else None
    minisock = is_minisock(protocol, msg["idiag_inode"], state)
    v6 = attrs.get("INET_DIAG_SKV6ONLY")
    return SocketEntry(
        protocol=protocol,
        family=family,
        state=state,
        local=Endpoint(msg["idiag_src"], msg["idiag_sport"]),
        remote=remote,
        inode=msg["idiag_inode"],
        uid=msg["idiag_uid"],
        cookie=msg["idiag_cookie"],
        expires_ms=msg["idiag_expires"] if minisock else None,
        v6only=None if v6 is None else bool(v6),
        bound_dev_if=msg["idiag_if"],
    )


def _dump(ds: Any, port: int, protocols: Iterable[str]) -> list[SocketEntry]:
    """Every socket with local port ``port`` (0: every port) in ``ds``'s
    namespace, both families."""
    out: list[SocketEntry] = []
    for protocol in protocols:
        proto = socket.IPPROTO_TCP if protocol == "tcp" else socket.IPPROTO_UDP
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ds.get_sock_stats(family=family, protocol=proto, states=ALL_STATES,
                                         sport=port):
                if not port or msg["idiag_sport"] == port:
                    out.append(_entry(protocol, msg))
    return out


def parse_port_set(text: str) -> set[int]:
    """``ip_local_reserved_ports`` syntax: ``8080,9000-9010``."""
    ports: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        ports.update(range(int(lo), int(hi or lo) + 1))
    return ports


def effective_range(netns_range: tuple[int, int], socket_range: tuple[int, int] | None
                    ) -> tuple[int, int]:
    """The range the kernel searches for a socket: the namespace's
    ip_local_port_range, narrowed by the socket's own IP_LOCAL_PORT_RANGE where
    each end of it falls inside (net/ipv4/inet_connection_sock.c:
    inet_sk_get_local_port_range)."""
    lo, hi = netns_range
    if socket_range is not None:
        sk_lo, sk_hi = socket_range
        if lo <= sk_lo <= hi:
            lo = sk_lo
        if lo <= sk_hi <= hi:
            hi = sk_hi
    return lo, hi


def port_usage(socks: Iterable[SocketEntry], port_range: str, reserved: str,
               destination: Endpoint | None = None,
               socket_range: tuple[int, int] | None = None) -> PortUsage:
    """How much of the ephemeral range the kernel searched takes: the
    namespace's ``port_range`` (``"LOW HIGH"``) narrowed by the socket's own
    ``socket_range``; with ``destination``, how many of the sockets are
    TIME_WAIT, and FIN_WAIT2 minisocks, toward it."""
    netns_lo, netns_hi = (int(x) for x in port_range.split())
    low, high = effective_range((netns_lo, netns_hi), socket_range)
    taken = parse_port_set(reserved) & set(range(low, high + 1))
    in_range = [s for s in socks if low <= s.local.port <= high]
    by_state: dict[str, int] = {}
    for s in in_range:
        by_state[s.state] = by_state.get(s.state, 0) + 1
    tw = fw2 = None
    if destination is not None:
        toward = [s for s in socks if s.minisock and s.remote == destination]
        tw = sum(1 for s in toward if s.state == "TIME_WAIT")
        fw2 = len(toward) - tw
    return PortUsage(low=low, high=high, reserved=len(taken),
                     in_use=len({s.local.port for s in in_range}), by_state=by_state,
                     time_wait_to_destination=tw, fin_wait2_to_destination=fw2,
                     netns_range=(netns_lo, netns_hi),
                     socket_range=socket_range)


def holders_of(inodes: Iterable[int], denied: set[int] | None = None
               ) -> dict[int, list[Holder]]:
    """inode -> every process with an fd on it (an inherited fd counts: it is the
    same open file). One pass over /proc/*/fd, as ``ss -p`` does. The pids
    whose fds may not be read (another user's, without root) go to ``denied``."""
    wanted = {f"socket:[{i}]": i for i in inodes if i}
    found: dict[int, list[Holder]] = {}
    if not wanted:
        return found
    for proc in psutil.process_iter(["pid", "ppid", "name"]):
        pid = proc.info["pid"]
        fds: dict[int, list[int]] = {}
        try:
            with os.scandir(f"/proc/{pid}/fd") as it:
                for entry in it:
                    try:
                        target = os.readlink(entry.path)
                    except OSError:
                        continue
                    inode = wanted.get(target)
                    if inode is not None:
                        fds.setdefault(inode, []).append(int(entry.name))
        except PermissionError:
            if denied is not None:
                denied.add(pid)
            continue
        except OSError:
            continue  # exited, or a kernel thread
        for inode, nums in fds.items():
            found.setdefault(inode, []).append(
                Holder(pid=pid, ppid=proc.info["ppid"] or 0, comm=proc.info["name"] or "?",
                       fds=tuple(sorted(nums)))
            )
    return found


def fd_inode(pid: int, fd: int) -> int | None:
    """The socket inode behind a live process's fd. Failure time only: the
    readlink pins the file for microseconds (proc_fd_link takes a reference),
    so calling this on every successful bind could itself cause EADDRINUSE."""
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    return int(target[8:-1]) if target.startswith("socket:[") else None


def _read_sysctl(name: str) -> str | None:
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return f.read().strip()
    except OSError:
        return None


def read_sysctls(names: Iterable[str]) -> dict[str, str]:
    """The named sysctls as the calling thread's namespace sees them (the
    ``net.*`` ones are per netns), those that exist."""
    return {name: v for name in names if (v := _read_sysctl(name)) is not None}


def snapshot(port: int, protocols: Iterable[str], netns_fd: int | None,
             sysctls: Iterable[str] = (), holders: bool = True) -> Snapshot:
    """The sockets on ``port`` (0: every port) in the namespace of ``netns_fd``
    (None: ours), who holds them, and the named sysctls as that namespace sees
    them (``net.*`` ones are per netns). Raises OSError if the namespace cannot
    be entered."""
    from pyroute2 import DiagSocket  # only this engine's path pays for importing it

    with entered(netns_fd):
        ds = DiagSocket()  # the netlink socket keeps the namespace it was made in
        values = read_sysctls(sysctls)
    try:
        ds.bind()
        socks = _dump(ds, port, protocols)
    finally:
        ds.close()
    denied: set[int] = set()
    held = holders_of((s.inode for s in socks), denied) if holders else {}
    return Snapshot(sockets=socks, holders=held, sysctls=values, holders_complete=not denied)


NETLINK_SOCK_DIAG = 4  # include/uapi/linux/netlink.h
NLMSG_ERROR, NLM_F_REQUEST, NLM_F_ACK = 2, 0x1, 0x4
SOCK_DESTROY = 21  # include/uapi/linux/sock_diag.h
INET_DIAG_NOCOOKIE = 0xFFFFFFFF


@functools.cache
def can_destroy(protocol: str = "tcp") -> bool | None:
    """Whether this kernel destroys sockets on request (``ss -K``;
    CONFIG_INET_DIAG_DESTROY), asked without touching any socket: a
    SOCK_DESTROY for the 4-tuple of all zeros, which no socket has.
    net/ipv4/inet_diag.c: inet_diag_cmd_exact answers EOPNOTSUPP when the
    protocol's handler has no ``destroy``, else the handler's lookup answers
    ENOENT. True/False, None when the kernel's answer says neither."""
    req = struct.pack("=BBBxI", socket.AF_INET,
                      socket.IPPROTO_TCP if protocol == "tcp" else socket.IPPROTO_UDP, 0,
                      ALL_STATES)
    # struct inet_diag_sockid: ports (be16), src[4], dst[4] (be32), if, cookie[2]
    req += bytes(4 + 32) + struct.pack("=III", 0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    header = struct.pack("=IHHII", 16 + len(req), SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, 1, 0)
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(2.0)
            nl.sendto(header + req, (0, 0))
            reply = nl.recv(4096)
    except OSError:
        return None
    if len(reply) < 20 or struct.unpack_from("=H", reply, 4)[0] != NLMSG_ERROR:
        return None
    err = -struct.unpack_from("=i", reply, 16)[0]
    return {errno.ENOENT: True, errno.EOPNOTSUPP: False}.get(err)


def run_in(netns: Netns, pid: int | None) -> str:
    """The command prefix that runs a command in ``netns``: nothing for
    portrace's own namespace, ``ip netns exec NAME`` for a named one, else
    ``nsenter`` through a process in it."""
    if netns.inode == os.stat("/proc/self/ns/net").st_ino:
        return ""
    if netns.name:
        return f"ip netns exec {shlex.quote(netns.name)} "
    return f"nsenter --net=/proc/{pid}/ns/net " if pid else ""
