"""Who holds a port right now, read from userspace: sock_diag (via pyroute2)
in a given network namespace, and every process whose fd table holds each
socket's inode. The bcc engine's snapshot; the CO-RE engine reads the same
from the kernel with iterators.

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

import errno
import functools
import os
import socket
import struct
from collections.abc import Iterable
from typing import Any

import psutil

from portrace.events import FAMILIES, Endpoint, SnapshotSource, tcp_state_name
from portrace.kernel.engine import UDP_STATE, Holder, Snapshot, SocketEntry, is_minisock
from portrace.kernel.namespaces import entered, read_sysctls

ALL_STATES = (1 << 14) - 1  # every TCP state plus bit 13, TCP_BOUND_INACTIVE


def socket_protocol(pid: int, fd: int) -> str | None:
    """``tcp``/``udp`` for a live process's socket fd, from sockfs's
    ``system.sockprotoname`` xattr (net/socket.c: sockfs_xattr_get); None if gone."""
    try:
        name = os.getxattr(f"/proc/{pid}/fd/{fd}", "system.sockprotoname").rstrip(b"\0")
    except OSError:
        return None
    return {b"TCP": "tcp", b"TCPv6": "tcp", b"UDP": "udp", b"UDPv6": "udp"}.get(name)


def _entry(protocol: str, msg: dict[str, Any]) -> SocketEntry:
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
    source = SnapshotSource(sockets={p: "sock_diag" for p in protocols},
                            holders="proc" if holders else "none")
    return Snapshot(sockets=socks, holders=held, sysctls=values, holders_complete=not denied,
                    source=source)


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
