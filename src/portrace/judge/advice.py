"""Verdicts: the cause, the exact blocker, and the fixes that work for it, in
order: what to do now, what to change in code, and which common fixes do not
apply and why. Every claim quotes a rule of portrace.judge.diagnose.RULES."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from portrace.events import (
    Blocker,
    Endpoint,
    Owner,
    PortUsage,
    SocketCall,
    StateChange,
    Verdict,
    errno_name,
)
from portrace.judge import phrases
from portrace.judge.diagnose import (
    EADDRINUSE,
    EADDRNOTAVAIL,
    RULES,
    TCP_TIMEWAIT_LEN_S,
    Request,
    cause_of,
)
from portrace.observe.ranges import parse_port_set


def cite(rule: str) -> str:
    return f"({RULES[rule].source})"


def _holders_phrase(b: Blocker) -> str:
    return ", ".join(phrases.task(p.comm, p.pid) for p in b.processes)


RUNTIME_CLI = {"docker": "docker", "podman": "podman"}


def _stop_owner(o: Owner) -> str | None:
    """How to stop what a holder belongs to, so that nothing restarts it:
    the advice after "Now: ", ending where the holders are named."""
    if o.activates is not None and o.activates.endswith(".socket"):
        return (f"`systemctl stop {o.activates}`; systemd itself listens for it (socket "
                "activation), so stopping the service alone leaves the port held")
    if o.forwards_to_container is not None:
        return (f"`docker stop {o.forwards_to_container}`, or publish another host port; "
                f"docker-proxy holds it for that container's {o.forwards_to}")
    if o.pod is not None:
        return _stop_pod(o)
    if o.runtime == "containerd" and o.container_id is not None:
        ns = o.runtime_namespace or "default"
        if o.container is not None:  # nerdctl named it
            return f"`nerdctl -n {ns} stop {o.container}`"
        return f"`ctr -n {ns} task kill {o.container_id}` (then `ctr -n {ns} task delete`)"
    if o.container is not None and o.runtime in RUNTIME_CLI:
        return f"`{RUNTIME_CLI[o.runtime]} stop {o.container}`"
    if o.unit is not None and o.unit.endswith(".service"):
        user = "--user " if o.user_unit else ""
        return f"`systemctl {user}stop {o.unit}`; a `kill` may be undone by its Restart="
    return None


KUBE_PROXY = ("kube-system", "kube-proxy")  # its DaemonSet's namespace and container


def _stop_pod(o: Owner) -> str:
    """A pod's holder: through the API server, never by its pid (the kubelet
    restarts a killed container; only the pod's owner decides where it runs)."""
    assert o.pod is not None
    p = o.pod
    if (p.namespace, p.container) == KUBE_PROXY:
        return ("kube-proxy holds it for a Service's NodePort (before 1.24 it held every "
                "NodePort open: kubernetes#108496); find the Service in "
                "`kubectl get svc -A -o wide` (PORT(S)) and give it, or what needs the port, "
                "another one; do not stop kube-proxy")
    if p.name is None:
        return (f"find pod uid {p.uid}: `kubectl get pods -A -o custom-columns="
                f"NS:.metadata.namespace,NAME:.metadata.name,UID:.metadata.uid | grep {p.uid}`; "
                "then delete it or scale down its owner; the kubelet restarts a killed container")
    pod = f"`kubectl -n {p.namespace} delete pod {p.name}`"
    what = "its sandbox (pause) container holds the pod's namespaces; " if o.sandbox else ""
    node = (f"; on the node, `crictl stop {o.container_id[:13]}` stops it until the kubelet "
            "restarts it") if o.container_id and not o.sandbox else ""
    return (f"{what}{pod} (its controller recreates it, perhaps on this node again), or "
            f"scale down the pod's owner (`kubectl -n {p.namespace} get pod {p.name} -o "
            f"jsonpath='{{.metadata.ownerReferences}}'`){node}; never kill its pid")


def _itself(b: Blocker, attempt: SocketCall) -> str | None:
    """The advice when the failing process holds the blocker itself (it binds
    one port twice): never to kill itself."""
    me = next((p for p in b.processes if p.pid == attempt.pid), None)
    if me is None:
        return None
    fds = ", ".join(str(fd) for fd in me.fds) or "?"
    return (f"Now: {phrases.task(attempt.comm, attempt.pid)} conflicts with itself: it "
            f"already holds {b.local} (fd {fds}). Look for the port twice in what it runs: "
            f"two servers in one process, a management port set equal to the main one, a "
            f"listen address listed twice.")


def _kill_advice(b: Blocker, attempt: SocketCall) -> str:
    itself = _itself(b, attempt)
    if itself is not None:
        return itself
    if not b.processes and not b.holders_known:
        return f"Now: run as root to name what holds it ({phrases.HOLDERS_UNREADABLE})."
    if not b.processes:
        return "Now: no process holds it any more."
    stops = {_stop_owner(p.owner) if p.owner else None for p in b.processes}
    if None not in stops:  # each holder is stopped by what owns it: never by pid
        return f"Now: {'; and '.join(sorted(s for s in stops if s))} (held by " \
               f"{_holders_phrase(b)})."
    pids = " ".join(str(p.pid) for p in b.processes)
    text = f"Now: stop what holds it: `kill {pids}` ({_holders_phrase(b)})."
    if any(p.inherited for p in b.processes):
        text += (" It holds an fd it inherited (fork/exec) from the process that bound the "
                 "socket; open listeners with SOCK_CLOEXEC, or close them in the child.")
    return text


@dataclass(frozen=True)
class Destroying:
    """Whether the kernel destroys sockets on request (sockets.can_destroy:
    True/False, None when not known) and the prefix that runs a command in the
    blockers' namespace (``ip netns exec NAME ``; empty for portrace's own)."""

    supported: bool | None = None
    run_in: str = ""


def _ss_kill(b: Blocker | Sequence[Blocker], how: Destroying) -> str:
    """The ``ss -K`` command for one socket (its 4-tuple), or for every
    minisock of a port (their states, the port)."""
    if isinstance(b, Blocker):
        dst = f" dst {b.remote}" if b.remote else ""
        states = "state " + b.state.lower().replace("_", "-")
        match = f"src {b.local}{dst}"
    else:
        states = " ".join(f"state {s.lower().replace('_', '-')}"
                          for s in sorted({x.state for x in b}, reverse=True))
        match = f"sport = :{b[0].local.port}"
    return f"`{how.run_in}ss -K {states} {match}`"


def _destroy(b: Blocker | Sequence[Blocker], how: Destroying, verb: str) -> str | None:
    """``<verb>: <ss -K ...>`` where the kernel may destroy sockets on request
    (RULES destroy), None where it cannot."""
    if how.supported is False:
        return None
    maybe = "" if how.supported else " (if the kernel has CONFIG_INET_DIAG_DESTROY)"
    return f"{verb}{maybe}: {_ss_kill(b, how)} {cite('destroy')}"


CANNOT_DESTROY = ("this kernel cannot destroy sockets on request (built without "
                  "CONFIG_INET_DIAG_DESTROY: SOCK_DESTROY answers EOPNOTSUPP)")


def _onoff(v: bool | None) -> str:
    return "unknown" if v is None else ("set" if v else "not set")


def _old_name(b: Blocker) -> str:
    if b.closed_by is not None:
        return f"the old socket (closed by {phrases.task(b.closed_by.comm, b.closed_by.pid)})"
    if b.processes:
        return f"the old socket (held by {_holders_phrase(b)})"
    return "the old socket"


def _reuseaddr_why(req: Request, b: Blocker) -> str:
    """Why SO_REUSEADDR did not let the new socket past a non-LISTEN blocker."""
    new, old = req.opts.reuseaddr, b.opts.reuseaddr
    old_name = _old_name(b)
    keeps = ", and the minisock keeps that" if b.minisock else ""
    if new is False and old is False:
        return f"Neither {old_name} nor the new socket set SO_REUSEADDR."
    if new is False:
        return (f"The new socket did not set SO_REUSEADDR ({old_name}: "
                f"{_onoff(old)}).")
    if old is False:
        return (f"The new socket set SO_REUSEADDR, but {old_name} did not{keeps}: the new "
                "socket's flag alone does not pass it.")
    return ("SO_REUSEADDR on both would pass it; which socket lacks it is not known "
            f"(new: {_onoff(new)}, old: {_onoff(old)}).")


def _reuseport_note(req: Request, b: Blocker) -> str | None:
    if req.opts.reuseport and b.opts.reuseport and not b.minisock:
        if req.uid is None:
            return (f"SO_REUSEPORT is set on both; it passes only if both sockets have the "
                    f"same owner {cite('reuseport')}, and this engine cannot read the new "
                    "socket's (--engine core can).")
        if req.uid != b.uid:
            return (f"SO_REUSEPORT is set on both, but refused: the old socket belongs to uid "
                    f"{b.uid} and the new one to uid {req.uid} (its creator's fsuid at "
                    f"socket()) {cite('reuseport')}.")
    if req.opts.reuseport and b.opts.reuseport is False:
        return "The new socket set SO_REUSEPORT, but the old one did not: both need it."
    return None


def _overlap_note(req: Request, b: Blocker) -> str | None:
    """Why two sockets of different families meet (RULES overlap)."""
    if req.family == "inet" and b.family == "inet6":
        mapped = ipaddress.IPv6Address(b.local.addr).ipv4_mapped
        if mapped is not None:
            return (f"{b.local} is a v4-mapped IPv6 address: to the kernel it is the IPv4 "
                    f"address {mapped}.")
        return (f"{b.local} covers IPv4 because that socket is not IPV6_V6ONLY: set "
                "IPV6_V6ONLY on it, or serve both families from one dual-stack socket.")
    if req.family == "inet6" and b.family == "inet":
        mapped = ipaddress.IPv6Address(req.addr).ipv4_mapped
        if mapped is not None:
            return (f"The v4-mapped address {req.addr} is the IPv4 address {mapped} to the "
                    f"kernel, which {b.local} covers.")
        return (f"A [::] socket without IPV6_V6ONLY also claims IPv4, which {b.local} holds: "
                "set IPV6_V6ONLY on the new socket if it should serve IPv6 only.")
    return None


def _source_port_note(port: int, sysctls: Mapping[str, str]) -> str | None:
    """A connected socket on a port of the ephemeral range may be an outgoing
    connection's source port: the fix is reserving the port."""
    try:
        low, high = map(int, sysctls["net.ipv4.ip_local_port_range"].split())
        reserved = parse_port_set(sysctls.get("net.ipv4.ip_local_reserved_ports", ""))
    except (KeyError, ValueError):
        return None
    if not low <= port <= high or port in reserved:
        return None
    return (f"{port} lies inside net.ipv4.ip_local_port_range {low}-{high}, where connect() "
            f"picks source ports {cite('connect_port')}: an outgoing connection may hold it. "
            f"In config: reserve it for the server, add {port} to "
            f"net.ipv4.ip_local_reserved_ports: connect() skips those {cite('connect_port')}.")


NOT_TW_REUSE = ("Does not apply: net.ipv4.tcp_tw_reuse is read only on the connect() path "
                f"{cite('tw_reuse')}, never by bind() or listen()")


def verdict(req: Request, attempt: SocketCall, blockers: Sequence[Blocker],
            sysctls: Mapping[str, str], last_seen: StateChange | None,
            netns_source: str, usage: PortUsage | None = None,
            destroying: Destroying = Destroying()) -> Verdict:
    """The verdict for one failure (causes: portrace.judge.diagnose.CAUSES)."""
    if attempt.call == "connect":
        return _connect_exhausted(attempt, usage, sysctls)
    if attempt.errno != EADDRINUSE:
        return _not_a_conflict(attempt)
    if req.port == 0:
        return _autobind_exhausted(attempt, usage, sysctls)
    if not blockers:
        return _gone(req, attempt, last_seen, netns_source)
    b = blockers[0]
    others = len(blockers) - 1
    c = _Conflict(req=req, attempt=attempt, blockers=blockers, b=b, sysctls=sysctls,
                  destroying=destroying, note=_overlap_note(req, b),
                  reuseport=_reuseport_note(req, b),
                  more=f" (+{others} more socket{'s' if others > 1 else ''} on the port)"
                  if others else "")
    cause = cause_of(b)
    summary, advice = _BY_CAUSE[cause](c, cause)
    return Verdict(cause=cause, summary=summary, advice=tuple(advice))


@dataclass(frozen=True)
class _Conflict:
    """What every EADDRINUSE cause's advice reads: the request, the first
    blocker ``b`` and the facts drawn from it once."""

    req: Request
    attempt: SocketCall
    blockers: Sequence[Blocker]
    b: Blocker
    sysctls: Mapping[str, str]
    destroying: Destroying
    note: str | None  # the addresses' overlap, where it is not plain
    reuseport: str | None  # why SO_REUSEPORT does or does not pass b
    more: str  # " (+N more sockets on the port)", or ""


def _listener(c: _Conflict, _cause: str) -> tuple[str, list[str]]:
    b = c.b
    summary = phrases.blocker(b) + c.more
    if c.attempt.call == "listen":
        summary = f"listen() found {b.local} already listening: {summary}"
    advice = [_kill_advice(b, c.attempt) if b.processes or not b.holders_known else
              "Now: the listener has no process left; it goes away when its last "
              "accepted connection closes."]
    advice += [x for x in (c.note, c.reuseport) if x]
    if c.attempt.call == "listen":
        advice.append("Two SO_REUSEADDR sockets may bind the same address, but only one "
                      f"may listen: listen() checks the port again {cite('listen_recheck')}.")
    elif c.req.opts.reuseaddr:
        advice.append("The new socket's SO_REUSEADDR does not help: it never passes a "
                      f"LISTEN socket {cite('reuseaddr')}.")
    advice.append("In code: to run two listeners on one port at once, set SO_REUSEPORT on "
                  f"both before bind(), under the same uid {cite('reuseport')}; SO_REUSEADDR "
                  "cannot pass a LISTEN socket.")
    return summary, advice


def _minisocks(c: _Conflict, cause: str) -> tuple[str, list[str]]:
    """TIME_WAIT or orphaned FIN_WAIT2: every minisock on the port counts."""
    b = c.b
    minis = [x for x in c.blockers if x.minisock]
    left = max(x.expires_s or 0.0 for x in minis)
    what = "TIME_WAIT" if cause == "time_wait" else "orphaned FIN_WAIT2"
    summary = (phrases.blocker(b) + c.more if len(minis) == 1 else
               f"{len(minis)} {what} sockets on {b.local.port}; the last ends in {left:.1f} s")
    target: Blocker | Sequence[Blocker] = b if len(minis) == 1 else minis
    clause = _destroy(target, c.destroying, "destroy it" if len(minis) == 1 else "destroy them")
    advice = [f"Now: wait {left:.0f} s" + (f", or {clause}." if clause else
                                           f"; {CANNOT_DESTROY}."),
              _reuseaddr_why(c.req, b)]
    if c.reuseport:
        advice.append(c.reuseport)
    if cause == "time_wait":
        advice.append(f"TIME_WAIT lasts TCP_TIMEWAIT_LEN = {TCP_TIMEWAIT_LEN_S} s "
                      f"{cite('timewait_len')}; no sysctl shortens it.")
    else:
        fin = c.sysctls.get("net.ipv4.tcp_fin_timeout")
        advice.append("The peer never sent its FIN. An orphaned FIN_WAIT2 lives "
                      f"net.ipv4.tcp_fin_timeout = {fin or '?'} s in this namespace "
                      f"{cite('fin_timeout')}: lowering it shortens this case, and only "
                      "this one.")
    advice.append("In code: set SO_REUSEADDR on the listening socket before bind() in both "
                  "the old and the new process: the minisock keeps the old socket's flag "
                  f"{cite('minisock_keeps_flags')}, and two SO_REUSEADDR sockets conflict "
                  f"only when the old one is LISTEN {cite('reuseaddr')}.")
    advice.append(NOT_TW_REUSE + ("; net.ipv4.tcp_fin_timeout bounds orphaned FIN_WAIT2 "
                                  "only, not TIME_WAIT." if cause == "time_wait" else "."))
    return summary, advice


def _held_socket(c: _Conflict, cause: str) -> tuple[str, list[str]]:
    """A connected or a bound-only socket that a process still holds."""
    b = c.b
    connected = cause == "connected_socket"
    summary = ("" if connected else "bound, not listening: ") + phrases.blocker(b) + c.more
    now = _kill_advice(b, c.attempt)
    if connected:
        clause = _destroy(b, c.destroying, "abort the connection")
        now += f" Or {clause}." if clause else ""
    advice = [now]
    advice += [x for x in (c.note, _reuseaddr_why(c.req, b), c.reuseport) if x]
    source = _source_port_note(c.req.port, c.sysctls) if connected else None
    if source:
        advice.append(source)
    if connected:
        accepted = ("Or, if the old server accepted it: a connection keeps the port after "
                    "its listener closed." if source else
                    "A connection accepted by the old server keeps the port after its "
                    "listener closed.")
        advice.append(accepted + " In code: set SO_REUSEADDR on the listening socket "
                      "before bind() in both old and new server; accepted sockets inherit it "
                      f"{cite('accept_keeps_flags')}, and two SO_REUSEADDR sockets conflict "
                      f"only when the old one is LISTEN {cite('reuseaddr')}.")
    else:
        advice.append("In code: a socket bound but never listened on still owns the port; "
                      "close it, or set SO_REUSEADDR on both sockets "
                      f"{cite('reuseaddr')}.")
    advice.append(NOT_TW_REUSE + ".")
    return summary, advice


def _udp_socket(c: _Conflict, _cause: str) -> tuple[str, list[str]]:
    b = c.b
    advice = [_kill_advice(b, c.attempt)]
    advice += [x for x in (c.note, c.reuseport) if x]
    advice.append(f"In code: {RULES['udp_reuse'].says} {cite('udp_reuse')}; here the new "
                  f"socket's SO_REUSEADDR is {_onoff(c.req.opts.reuseaddr)}, the old one's "
                  f"{_onoff(b.opts.reuseaddr)}.")
    return phrases.blocker(b) + c.more, advice


# One function per EADDRINUSE cause (diagnose.cause_of), each given the cause.
_BY_CAUSE = {"listener": _listener, "time_wait": _minisocks, "fin_wait2": _minisocks,
             "connected_socket": _held_socket, "bound_socket": _held_socket,
             "udp_socket": _udp_socket}


def _range_phrase(u: PortUsage) -> str:
    size = u.high - u.low + 1
    states = ", ".join(f"{n} {st}" for st, n in sorted(u.by_state.items(), key=lambda x: -x[1]))
    if u.socket_range is not None and u.netns_range is not None:
        where = (f"the socket's IP_LOCAL_PORT_RANGE {u.low}-{u.high} (within "
                 f"ip_local_port_range {u.netns_range[0]}-{u.netns_range[1]})")
    else:
        where = f"ip_local_port_range {u.low}-{u.high}"
    return (f"{where} ({size} ports, {u.reserved} reserved): "
            f"{u.in_use} in use" + (f" ({states})" if states else ""))


def _range_unknown(attempt: SocketCall, u: PortUsage | None) -> list[str]:
    """When the engine cannot read IP_LOCAL_PORT_RANGE and the range is not
    full by our count, the socket's own range may be what ran out."""
    if attempt.opts_source == "kernel" or u is None:
        return []
    if u.in_use + u.reserved >= u.high - u.low + 1:
        return []
    return ["The range is not full by this count: the socket's own IP_LOCAL_PORT_RANGE "
            f"(6.8+) may narrow it {cite('local_port_range')}, which this engine cannot read "
            "(--engine core can)."]


def _widen(u: PortUsage | None) -> str:
    """What to widen: the sysctl, or, when the socket narrows it, the option."""
    if u is not None and u.socket_range is not None:
        return ("widen or drop the socket's own IP_LOCAL_PORT_RANGE: it narrows the search "
                f"{cite('local_port_range')}, so widening net.ipv4.ip_local_port_range alone "
                "does not help")
    return ("widen it: `sysctl -w net.ipv4.ip_local_port_range=\"LOW HIGH\"` (per network "
            "namespace)")


def _autobind_exhausted(attempt: SocketCall, usage: PortUsage | None,
                        sysctls: Mapping[str, str]) -> Verdict:
    how = "bind() to port 0" if attempt.call == "bind" else "listen() on an unbound socket"
    summary = f"{how} found no free ephemeral port"
    if usage is not None:
        summary += ": " + _range_phrase(usage)
    advice = [
        f"Now: close sockets that hold ports of the range, or {_widen(usage)} "
        f"{cite('autobind')}.",
        *_range_unknown(attempt, usage),
        "In code: bind servers to a fixed port; for outgoing connections let connect() pick "
        "the port (it can share a local port across destinations; bind(0) cannot) "
        f"{cite('connect_port')}.",
        "net.ipv4.ip_autobind_reuse = 1 lets bind(0) share a port with sockets that are not "
        "listening when both set SO_REUSEADDR (now "
        f"{sysctls.get('net.ipv4.ip_autobind_reuse', '?')}) {cite('autobind')}.",
        NOT_TW_REUSE + ".",
    ]
    return Verdict(cause="ephemeral_exhausted", summary=summary, advice=tuple(advice))


def _is_loopback(addr: str) -> bool:
    a = ipaddress.ip_address(addr)
    mapped = getattr(a, "ipv4_mapped", None)
    return a.is_loopback or bool(mapped and mapped.is_loopback)


def _connect_exhausted(attempt: SocketCall, usage: PortUsage | None,
                       sysctls: Mapping[str, str]) -> Verdict:
    dest = Endpoint(attempt.addr, attempt.port)
    name = errno_name(attempt.errno)
    if attempt.errno not in (EADDRNOTAVAIL, EADDRINUSE):
        return _not_a_conflict(attempt)
    summary = f"connect() to {dest} found no free local port ({name})"
    if usage is not None:
        summary += ": " + _range_phrase(usage)
        if usage.time_wait_to_destination is not None:
            summary += f"; {usage.time_wait_to_destination} in TIME_WAIT toward {dest}"
        if usage.fin_wait2_to_destination:
            summary += f", {usage.fin_wait2_to_destination} orphaned FIN_WAIT2"
    reuse = sysctls.get("net.ipv4.tcp_tw_reuse")
    # Kernels without tcp_tw_reuse_delay (6.1 has none; 6.18 has it) wait a fixed second.
    delay = (f"tcp_tw_reuse_delay = {sysctls['net.ipv4.tcp_tw_reuse_delay']} ms"
             if "net.ipv4.tcp_tw_reuse_delay" in sysctls
             else "1 s (fixed: this kernel has no tcp_tw_reuse_delay)")
    stamps = sysctls.get("net.ipv4.tcp_timestamps")
    tw = usage.time_wait_to_destination if usage else None
    fw2 = usage.fin_wait2_to_destination if usage else None
    widen = (_widen(usage) if usage is not None and usage.socket_range is not None
             else "widen net.ipv4.ip_local_port_range (per network namespace)")
    advice = [f"Now: fewer concurrent connections to it, or {widen} {cite('connect_port')}."]
    src = cite("tw_reuse")
    if fw2:
        fin = sysctls.get("net.ipv4.tcp_fin_timeout", "?")
        advice.append(f"{fw2} ports are held by orphaned FIN_WAIT2 minisocks: {dest} never "
                      "closed its side. tcp_tw_reuse never reuses those; they last "
                      f"net.ipv4.tcp_fin_timeout = {fin} s here {cite('fin_timeout')}, so "
                      "lowering it does help this case; better, make the server close.")
    if tw == 0:
        advice.append("No TIME_WAIT toward this destination, so net.ipv4.tcp_tw_reuse cannot "
                      "help: other sockets hold the ports.")
    elif stamps == "0":
        advice.append("net.ipv4.tcp_tw_reuse cannot help while net.ipv4.tcp_timestamps = 0: "
                      f"reuse needs a timestamp seen on the old connection {src}.")
    elif reuse == "0":
        advice.append("net.ipv4.tcp_tw_reuse = 0: set it to 1 (or 2 when the destination is "
                      "loopback) so connect() can take over TIME_WAIT 4-tuples older than "
                      f"{delay} {src}.")
    elif reuse == "2" and not _is_loopback(attempt.addr):
        advice.append(f"net.ipv4.tcp_tw_reuse = 2 applies to loopback only, and {dest.addr} is "
                      f"not loopback: 1 would apply here {src}.")
    elif reuse is not None:
        advice.append(f"net.ipv4.tcp_tw_reuse = {reuse} already applies: a TIME_WAIT 4-tuple is "
                      f"taken over only after {delay}, so connections faster than that still "
                      f"run out {src}.")
    advice.append("In code: reuse connections (keep-alive, pooling) instead of one per request, "
                  "or spread over more source addresses (IP_BIND_ADDRESS_NO_PORT before bind()).")
    advice.append("Does not apply: net.ipv4.tcp_fin_timeout does not shorten TIME_WAIT "
                  f"{cite('timewait_len')}; SO_REUSEADDR on the client socket adds no ports to "
                  "connect().")
    return Verdict(cause="ephemeral_exhausted", summary=summary, advice=tuple(advice))


# Namespaces nothing was looked up in (events.Netns.source): why, and what to do.
NOT_LOOKED_UP = {
    "gone": ("the failing socket's network namespace was gone by lookup, so nothing could be "
             "looked up for {ep}",
             "Now: a retry in that namespace (container) shows what blocks it; no process is "
             "named here, since the only namespace left to look in is another one."),
    "tracer": ("the failing process exited before its network namespace could be read, so "
               "nothing was looked up for {ep}",
               "Now: retry it; this engine (bcc) cannot read a gone process's namespace, and "
               "naming a socket of another namespace could blame the wrong process. "
               "--engine core reads the namespace in the kernel at the failure."),
    "closed": ("the failure was in another network namespace, which portrace may not enter "
               "without CAP_SYS_ADMIN (kernel/nsproxy.c: setns), so nothing was looked up for "
               "{ep}",
               "Now: `portrace check --pid {pid} {port}` as root names its blockers; or grant "
               "CAP_SYS_ADMIN to look in every namespace (README, \"Least privilege\")."),
}


def _gone(req: Request, attempt: SocketCall, last_seen: StateChange | None,
          netns_source: str) -> Verdict:
    ep = Endpoint(req.addr, req.port)
    if netns_source in NOT_LOOKED_UP:
        why, now = NOT_LOOKED_UP[netns_source]
        return Verdict(cause="unknown", summary=why.format(ep=ep),
                       advice=(now.format(pid=attempt.pid, port=attempt.port),))
    summary = (f"nothing on port {req.port} blocks {ep} any more: the blocker was gone by "
               "lookup")
    if last_seen is not None:
        who = (f", by {phrases.task(last_seen.owner.comm, last_seen.owner.pid)}"
               if last_seen.owner else "")
        age = (attempt.ts - last_seen.ts).total_seconds()
        peer = f" <-> {last_seen.remote}" if last_seen.remote.port else ""
        summary += (f"; last socket seen on the port: {last_seen.local}{peer} entering "
                    f"{last_seen.new}{who}, {age:.3f} s before the failure")
    return Verdict(cause="unknown", summary=summary, advice=("Now: a retry may already succeed.",))


_ERRNO_ADVICE = {
    "EACCES": (f"Ports below the netns's net.ipv4.ip_unprivileged_port_start need "
               f"CAP_NET_BIND_SERVICE in the user namespace that owns the netns "
               f"({RULES['port_rule'].source}); where that holds, a cgroup BPF bind program, "
               f"an LSM or seccomp refused the call."),
    "EINVAL": "The socket is already bound, or the address length or family is wrong.",
}


def _not_local_hint(attempt: SocketCall) -> str:
    """bind()'s EADDRNOTAVAIL when the address's state could not be read."""
    v6 = attempt.family == "inet6" and not attempt.addr.startswith("::ffff:")
    ways = ("IPV6_FREEBIND or net.ipv6.ip_nonlocal_bind" if v6
            else "IP_FREEBIND or net.ipv4.ip_nonlocal_bind")
    return (f"The address is not usable in the failing socket's netns (not assigned, "
            f"tentative, or on a down interface); {ways} allow binding it anyway "
            f"({RULES['v6_local' if v6 else 'v4_local'].source}).")


def _not_a_conflict(attempt: SocketCall) -> Verdict:
    name = errno_name(attempt.errno)
    return Verdict(
        cause="not_a_conflict",
        summary=f"{attempt.call}() failed with {name}, not a port conflict: nothing was looked up",
        advice=(_not_local_hint(attempt) if name == "EADDRNOTAVAIL" else
                _ERRNO_ADVICE.get(name, f"See {attempt.call}(2) for this errno."),),
    )
