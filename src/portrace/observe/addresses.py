"""Where a bind()'s address lives, for a bind() the kernel refused with
EADDRNOTAVAIL: assigned in the failing netns or not, on which interface and
whether that interface is up, its IPv6 duplicate address detection state
(tentative, dadfailed) and how long DAD takes on that interface, and the other
named namespaces (``ip netns``) that have it. Read through rtnetlink
(pyroute2) from inside each namespace (events.AddressState).

Kernel facts (net/ipv6/af_inet6.c: __inet6_bind; net/ipv6/addrconf.c:
ipv6_chk_addr, which bans IFA_F_TENTATIVE; net/ipv4/af_inet.c: __inet_bind,
inet_addr_valid_or_nonlocal):
- an IPv6 address counts as local only once DAD is done: while tentative, and
  for good once DAD failed (IFA_F_DADFAILED, still tentative), bind() gets
  EADDRNOTAVAIL;
- DAD sends ``dad_transmits`` probes ``retrans_time_ms`` apart
  (net/ipv6/addrconf.c: addrconf_dad_work), and starts only once the
  interface is up with a carrier (addrconf_dad_begin): until then the
  address stays tentative;
- an IPv4 address counts wherever it is assigned, its interface up or down
  (measured on 6.18: bind() succeeds on a down veth).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator

from portrace.events import AddressState
from portrace.kernel import namespaces

IFA_F_DADFAILED = 0x08  # include/uapi/linux/if_addr.h
IFA_F_TENTATIVE = 0x40
IFF_UP = 0x1  # include/uapi/linux/if.h


def _same(a: str | None, b: str) -> bool:
    try:
        return a is not None and ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def _interface_of(addr: str) -> tuple[str | None, bool | None, bool | None, int]:
    """In the calling thread's namespace: the interface that has ``addr``,
    whether it is up (IFF_UP) and has a carrier, and the address's flags
    (IFA_FLAGS: the 32-bit ones)."""
    from pyroute2 import IPRoute  # ~0.15 s, paid only by a refused address

    with IPRoute() as ip:
        for msg in ip.get_addr():
            if _same(msg.get_attr("IFA_LOCAL"), addr) or _same(msg.get_attr("IFA_ADDRESS"), addr):
                flags = msg.get_attr("IFA_FLAGS")
                links = ip.get_links(msg["index"])
                if not links:
                    return None, None, None, 0
                link = links[0]
                carrier = link.get_attr("IFLA_CARRIER")
                return (link.get_attr("IFLA_IFNAME"), bool(link["flags"] & IFF_UP),
                        None if carrier is None else bool(carrier),
                        msg["flags"] if flags is None else flags)
    return None, None, None, 0


def _dad_s(interface: str) -> float | None:
    values = namespaces.read_sysctls([f"net.ipv6.conf.{interface}.dad_transmits",
                                      f"net.ipv6.neigh.{interface}.retrans_time_ms"])
    try:
        return (int(values[f"net.ipv6.conf.{interface}.dad_transmits"])
                * int(values[f"net.ipv6.neigh.{interface}.retrans_time_ms"]) / 1000.0)
    except (KeyError, ValueError):
        return None


def _other_namespaces(own_inode: int) -> Iterator[tuple[str, int]]:
    """(name, fd) of each pinned namespace but ``own_inode``; the caller closes fd."""
    for path in namespaces.pinned():
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        if os.fstat(fd).st_ino == own_inode:
            os.close(fd)
            continue
        yield os.path.basename(path), fd


def address_state(addr: str, netns_fd: int | None, netns_inode: int) -> AddressState:
    """``addr`` as the namespace of ``netns_fd`` (None: ours) has it. Raises
    OSError if that namespace cannot be entered."""
    with namespaces.entered(netns_fd):
        interface, up, carrier, flags = _interface_of(addr)
        v6 = ipaddress.ip_address(addr).version == 6
        dad = _dad_s(interface) if v6 and interface else None
    elsewhere = []
    if interface is None:
        for name, fd in _other_namespaces(netns_inode):
            try:
                with namespaces.entered(fd):
                    if _interface_of(addr)[0] is not None:
                        elsewhere.append(name)
            except OSError:
                pass
            finally:
                os.close(fd)
    return AddressState(addr=addr, interface=interface, interface_up=up, carrier=carrier,
                        tentative=bool(flags & IFA_F_TENTATIVE),
                        dadfailed=bool(flags & IFA_F_DADFAILED), dad_s=dad,
                        elsewhere=tuple(elsewhere))
