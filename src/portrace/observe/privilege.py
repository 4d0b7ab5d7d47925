"""The privileged-port rule's facts for a bind() refused with EACCES: the
failing netns's own ``ip_unprivileged_port_start``, whether the process holds
CAP_NET_BIND_SERVICE, and where: its user namespace beside the one that owns
the netns (events.PortRule).

Kernel facts (net/ipv4/af_inet.c: __inet_bind and net/ipv6/af_inet6.c:
__inet6_bind; include/net/ip.h: inet_port_requires_bind_service;
kernel/capability.c: ns_capable; security/commoncap.c: cap_capable):
- a port below the netns's ``net.ipv4.ip_unprivileged_port_start`` (IPv6
  too) needs ``ns_capable(net->user_ns, CAP_NET_BIND_SERVICE)``;
- that holds when the process's user namespace owns the netns and the
  capability is in its effective set, or when its user namespace is an
  ancestor of the owner and it has the capability there; a capability held
  in a user namespace below the owner, or beside it, does not count.
"""

from __future__ import annotations

import fcntl
import os

from portrace.events import PortRule
from portrace.kernel import namespaces
from portrace.observe.policy import proc_status

CAP_NET_BIND_SERVICE = 10  # include/uapi/linux/capability.h
# include/uapi/linux/nsfs.h: _IO(0xb7, 1) and _IO(0xb7, 2)
NS_GET_USERNS, NS_GET_PARENT = 0xB701, 0xB702
MAX_USER_NS_DEPTH = 33  # kernel/user_namespace.c: 32 levels below the initial one


def _cap_effective(pid: int) -> bool | None:
    value = proc_status(pid).get("CapEff")
    try:
        return None if value is None else bool(int(value, 16) >> CAP_NET_BIND_SERVICE & 1)
    except ValueError:
        return None


def _relation(user_ns: int, owner_fd: int) -> str:
    """Whether the user namespace ``user_ns`` is the one of ``owner_fd``, one
    of its ancestors, or neither (NS_GET_PARENT up to the initial one)."""
    fd = os.dup(owner_fd)
    try:
        for depth in range(MAX_USER_NS_DEPTH):
            if os.fstat(fd).st_ino == user_ns:
                return "same" if depth == 0 else "ancestor"
            try:
                parent = fcntl.ioctl(fd, NS_GET_PARENT)
            except OSError:  # EPERM: the initial one, or above what we may see
                return "other"
            os.close(fd)
            fd = parent
        return "other"
    finally:
        os.close(fd)


def port_rule(pid: int, netns_fd: int | None) -> PortRule:
    """The rule's facts for process ``pid`` in the namespace of ``netns_fd``
    (None: portrace's own). Raises OSError if it cannot be entered."""
    with namespaces.entered(netns_fd):
        start = namespaces.read_sysctls(["net.ipv4.ip_unprivileged_port_start"]).get(
            "net.ipv4.ip_unprivileged_port_start")
    try:
        user_ns: int | None = os.stat(f"/proc/{pid}/ns/user").st_ino
    except OSError:
        user_ns = None
    own = None if netns_fd is not None else os.open("/proc/self/ns/net", os.O_RDONLY)
    net_fd = netns_fd if netns_fd is not None else own
    assert net_fd is not None
    owner_ns = relation = None
    try:
        owner_fd = fcntl.ioctl(net_fd, NS_GET_USERNS)
        try:
            owner_ns = os.fstat(owner_fd).st_ino
            relation = None if user_ns is None else _relation(user_ns, owner_fd)
        finally:
            os.close(owner_fd)
    except OSError:
        pass
    finally:
        if own is not None:
            os.close(own)
    return PortRule(port_start=int(start) if start and start.isdigit() else None,
                    cap_net_bind_service=_cap_effective(pid), user_ns=user_ns,
                    netns_user_ns=owner_ns, relation=relation)
