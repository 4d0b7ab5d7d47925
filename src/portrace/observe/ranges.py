"""Port ranges: how much of the ephemeral range the kernel searched is taken,
and ``ip_local_reserved_ports``' syntax."""

from __future__ import annotations

from collections.abc import Iterable

from portrace.events import Endpoint, PortUsage
from portrace.kernel.engine import SocketEntry


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
