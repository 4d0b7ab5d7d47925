"""One failure's observation: all that judging it needs, read at the failure
and nothing read after. The kernel's lookup (portrace.kernel.lookup), the
failing process's facts, who each holder is (unit, container, pod) with its
process facts, how much of the ephemeral range is taken, and whether and how
a socket there can be destroyed (``ss -K``).

``observe`` is the traced failure's; ``described`` is ``portrace check``'s,
a socket described rather than traced. Both feed portrace.judge.judgement.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from portrace.events import (
    AddressState,
    Endpoint,
    Netns,
    Owner,
    Policy,
    PortRule,
    PortUsage,
    SocketCall,
    StateChange,
)
from portrace.kernel import cgroups, lookup, namespaces, sockdiag
from portrace.kernel.engine import Engine, Snapshot
from portrace.observe import addresses, bound, context, owners, policy, privilege, ranges

# The recent successful bind()s seen per (family, addr, port): the tracer's memory.
Binders = Mapping[tuple[str, str, int], Sequence[SocketCall]]


@dataclass(frozen=True)
class Refusal:
    """A bind() refused before any socket was compared: the facts that may
    decide it (each None where not read): the address's state
    (EADDRNOTAVAIL), the port rule's (EACCES), the address its socket already
    had (EINVAL), and what else may refuse a bind (EPERM, EACCES)."""

    address: AddressState | None = None
    port_rule: PortRule | None = None
    already_bound: Endpoint | None = None
    policy: Policy | None = None


@dataclass(frozen=True)
class Observation:
    """See the module. ``binders``: recent binds by address (empty for a
    check); ``belongs``: (socket inode, pid) -> the holder's Owner;
    ``holder_facts``: pid -> process facts of the holders a verdict may list;
    ``process``: the failing process's facts (None: gone, or a check);
    ``usage``: for connect() and autobind, the ephemeral range searched and
    its use (None elsewhere, or when the namespace's range was not read);
    ``can_destroy``: the kernel destroys sockets on request (None: not
    known); ``run_in``: the command prefix that reaches the namespace;
    ``refusal``: for a bind() refused before any socket was compared, the
    facts that may decide it; ``exited_owner``: when the failing process was
    gone before its facts were read, its owner as the cgroup it failed in
    names it."""

    found: lookup.Lookup
    belongs: Mapping[tuple[int, int], Owner]
    holder_facts: Mapping[int, dict[str, Any] | None]
    process: dict[str, Any] | None
    usage: PortUsage | None
    can_destroy: bool | None
    run_in: str
    binders: Binders = field(default_factory=dict)
    refusal: Refusal = field(default_factory=Refusal)
    exited_owner: Owner | None = None

    @property
    def attempt(self) -> SocketCall:
        return self.found.attempt

    @property
    def snapshot(self) -> Snapshot:
        return self.found.snapshot


def _usage(attempt: SocketCall, snap: Snapshot) -> PortUsage | None:
    """Ephemeral exhaustion's facts, for a call that searched the range."""
    sysctls = snap.sysctls
    if not (attempt.call == "connect" or attempt.port == 0) \
            or "net.ipv4.ip_local_port_range" not in sysctls:
        return None
    dest = Endpoint(attempt.addr, attempt.port) if attempt.call == "connect" else None
    return ranges.port_usage(snap.sockets, sysctls["net.ipv4.ip_local_port_range"],
                             sysctls.get("net.ipv4.ip_local_reserved_ports", ""), dest,
                             socket_range=attempt.port_range)


def _refusal(place: lookup.Place) -> Refusal:
    """A refused bind()'s own facts, read while the process most likely lives:
    in its netns (the address, the port rule), through its fd (its socket's
    address), in /proc and from the kernel (cgroup programs, LSMs, seccomp)."""
    a = place.attempt
    if a.call != "bind":
        return Refusal()
    if a.errno == errno.EINVAL:  # port 0: not bound (bind() sets a port, even an ephemeral one)
        mine = bound.bound_address(a.pid, a.fd)
        return Refusal(already_bound=mine if mine is not None and mine.port else None)
    if a.errno == errno.EPERM:
        return Refusal(policy=policy.policy(a.pid, a.family))
    if not place.netns.searchable:
        return Refusal()
    try:
        if a.errno == errno.EADDRNOTAVAIL and a.addr not in ("0.0.0.0", "::"):
            return Refusal(address=addresses.address_state(a.addr, place.netns_fd,
                                                           place.netns.inode))
        if a.errno == errno.EACCES:
            return Refusal(port_rule=privilege.port_rule(a.pid, place.netns_fd),
                           policy=policy.policy(a.pid, a.family))
    except OSError:
        pass  # the namespace went away: nothing is named
    return Refusal()


def _complete(found: lookup.Lookup, process: dict[str, Any] | None, binders: Binders,
              pid: int | None, refusal: Refusal = Refusal(),
              exited_owner: Owner | None = None) -> Observation:
    """The rest of an observation around the kernel's lookup; ``pid``: a
    process in the namespace, for ``run_in`` when it has no name."""
    snap, attempt = found.snapshot, found.attempt
    belongs = owners.of_holders(snap.sockets, snap.holders)
    return Observation(
        found=found, belongs=belongs, holder_facts=context.holder_facts(snap.holders, belongs),
        process=process, usage=_usage(attempt, snap),
        can_destroy=sockdiag.can_destroy("udp" if attempt.protocol == "udp" else "tcp"),
        run_in=namespaces.run_in(found.netns, pid), binders=binders, refusal=refusal,
        exited_owner=exited_owner)


def observe(engine: Engine, attempt: SocketCall, binders: Binders,
            history: Mapping[int, Sequence[StateChange]]) -> Observation:
    """A traced failure's observation, read in its own namespace. The failing
    process's facts are read first, while it most likely still lives."""
    with lookup.failing_place(attempt) as place:
        process = context.process_facts(place.attempt.pid)
        # A process that failed and exited at once (a container's entrypoint)
        # is named by the cgroup the kernel saw it fail in, while that lives.
        gone = None
        if process is None and (path := cgroups.path(attempt.cgroup_id)) is not None:
            gone = owners.owner_of_cgroup(path)
        refusal = _refusal(place)
        found = lookup.look_up(engine, place, history)
    return _complete(found, process, binders, attempt.pid, refusal, gone)


def described(attempt: SocketCall, snap: Snapshot, netns: Netns, netns_fd: int | None,
              pid: int | None) -> Observation:
    """``portrace check``'s observation: ``attempt`` describes the socket, the
    port's ``snap`` was read in ``netns`` (``netns_fd``; reached through
    ``pid``, if any). Checked in the kernel's order (net/ipv4/af_inet.c:
    __inet_bind): a specific address must be usable there, then, for
    ``pid``'s socket, the port rule must allow it; either refusal becomes the
    attempt's errno, as the bind() would get it. The cgroup programs that
    would run on ``pid``'s bind() are named: what they answer is known only
    when they run."""
    refusal = Refusal()
    if attempt.addr not in ("0.0.0.0", "::"):
        state = addresses.address_state(attempt.addr, netns_fd, netns.inode)
        if not state.assigned or state.tentative or state.dadfailed:
            refusal = Refusal(address=state)
            attempt = dataclasses.replace(attempt, errno=errno.EADDRNOTAVAIL)
    if pid is not None and not refusal.address:
        rule = privilege.port_rule(pid, netns_fd)
        if rule.allows(attempt.port) is False:
            refusal = Refusal(port_rule=rule)
            attempt = dataclasses.replace(attempt, errno=errno.EACCES)
        else:  # a cgroup program may still refuse: it decides only when run
            pol = policy.policy(pid, attempt.family)
            if pol.cgroup_programs:
                refusal = Refusal(policy=pol)
    found = lookup.Lookup(attempt=attempt, netns=netns, own_inode=None, snapshot=snap,
                          closers={}, fd_opts={}, binder_pids={}, recent=())
    return _complete(found, None, {}, pid, refusal)
