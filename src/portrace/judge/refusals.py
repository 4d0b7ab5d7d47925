"""Verdicts for a bind() the kernel refused before comparing any socket: for
its address (EADDRNOTAVAIL: not local, tentative, dadfailed), its port
(EACCES: the privileged-port rule) or its socket (EINVAL: already bound, or
a link-local address without a scope). Each names the facts it was decided on
(events.AddressState, events.PortRule) and cites its rule in
portrace.judge.diagnose.RULES. None where the facts do not decide: the
caller then says what is not known."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from errno import EPERM
from typing import Any

from portrace.events import AddressState, Endpoint, Policy, PortRule, SocketCall, Verdict
from portrace.judge import phrases
from portrace.judge.advice import cite
from portrace.observe.owners import parse_cgroup


def _verdict(cause: str, summary: str, *advice: str) -> Verdict:
    return Verdict(cause=cause, summary=summary, advice=advice)


def _nonlocal_ways(family: str, addr: str, run_in: str) -> str:
    """The ways around the locality check, in the address's own family."""
    v6 = family == "inet6" and not addr.startswith("::ffff:")
    sysctl = "net.ipv6.ip_nonlocal_bind" if v6 else "net.ipv4.ip_nonlocal_bind"
    option = "IPV6_FREEBIND" if v6 else "IP_FREEBIND"
    return (f"set {option} on the socket before bind(), or `{run_in}sysctl -w {sysctl}=1` "
            f"for the whole netns {cite('v6_local' if v6 else 'v4_local')}")


def address(attempt: SocketCall, a: AddressState, run_in: str) -> Verdict:
    """EADDRNOTAVAIL on bind(), from where the address lives."""
    at = f"{a.addr} on {a.interface}"
    ways = _nonlocal_ways(attempt.family, a.addr, run_in)
    if a.dadfailed:
        return Verdict(
            cause="address_dadfailed",
            summary=(f"{at} failed duplicate address detection: another node on the link "
                     f"answered for it, so it never becomes usable {cite('dad')}"),
            advice=(f"Now: find the other node (the kernel logs `{a.interface}: IPv6 "
                    f"duplicate address {a.addr} used by <its MAC> detected!`, rate-limited: "
                    f"net/ipv6/addrconf.c: addrconf_dad_failure), change one of the two "
                    f"addresses, then remove and re-add this one.",
                    f"Binding anyway ({ways}) only hides the duplicate."))
    if a.tentative:
        wait = f"about {a.dad_s:g} s" if a.dad_s is not None else "a few seconds"
        if a.interface_up is False:
            why = f"{a.interface} is down, and DAD starts only once it is up"
            now = f"Now: `{run_in}ip link set {a.interface} up`; DAD then takes {wait}"
        elif a.carrier is False:
            why = (f"{a.interface} has no carrier (its link or peer is down), and DAD "
                   f"starts only once it has one")
            now = f"Now: bring the link up (cable, peer, switch port); DAD then takes {wait}"
        else:
            why = f"duplicate address detection is running and takes {wait}"
            now = f"Now: a retry succeeds once DAD ends ({wait}), if no other node claims it"
        return Verdict(
            cause="address_tentative",
            summary=(f"{at} is still tentative: {why}; until DAD ends the address does not "
                     f"count as assigned {cite('v6_tentative')}"),
            advice=(f"{now} (dad_transmits x retrans_time_ms) {cite('dad')}.",
                    f"In code: retry bind() on EADDRNOTAVAIL, or {ways}.",
                    f"Where no duplicate can exist (an address this host alone owns), add it "
                    f"with `nodad`, or set net.ipv6.conf.{a.interface}.accept_dad = 0."))
    if a.assigned:  # neither tentative nor dadfailed: the bind() named another interface
        return _verdict("address_not_local",
                        f"{at}, but the bind() named another interface (its scope id, or "
                        f"SO_BINDTODEVICE), where it is not assigned {cite('v6_local')}",
                        f"In code: bind it on {a.interface} (`{a.addr}%{a.interface}`, or "
                        f"SO_BINDTODEVICE {a.interface}), or assign it on the interface named.")
    where = (f"; it is assigned in netns {', '.join(a.elsewhere)}" if a.elsewhere
             else "; no named netns has it either")
    rule = "v6_local" if attempt.family == "inet6" else "v4_local"
    return Verdict(
        cause="address_not_local",
        summary=f"{a.addr} is not assigned in the failing socket's netns{where} {cite(rule)}",
        advice=((f"Now: bind it in netns {a.elsewhere[0]} (run the service there), or "
                 f"assign it here." if a.elsewhere else
                 "Now: assign the address, or wait for what assigns it (a VIP, DHCP)."),
                f"In code: {ways}."))


def port(attempt: SocketCall, rule: PortRule, process: Mapping[str, Any] | None,
         run_in: str) -> Verdict | None:
    """EACCES on bind() from the privileged-port rule; None when the rule
    lets this process bind the port, or its facts are not known."""
    if rule.allows(attempt.port) is not False or rule.port_start is None:
        return None
    who = phrases.task(attempt.comm, attempt.pid)
    head = (f"port {attempt.port} is below this netns's net.ipv4.ip_unprivileged_port_start "
            f"({rule.port_start})")
    lower = (f"Or lower the rule for this netns: `{run_in}sysctl -w "
             f"net.ipv4.ip_unprivileged_port_start={attempt.port}` {cite('port_rule')}.")
    if rule.relation == "other" and rule.cap_net_bind_service:
        return Verdict(
            cause="privileged_port",
            summary=(f"{head}, and {who} holds CAP_NET_BIND_SERVICE in user namespace "
                     f"{rule.user_ns}, but the netns belongs to user namespace "
                     f"{rule.netns_user_ns} {cite('ns_capable')}"),
            advice=("Now: bind in a netns that your user namespace owns (one it created), "
                    "or have a process of the owning user namespace bind it and pass the "
                    "socket (systemd socket activation, SCM_RIGHTS).", lower))
    owner = (process or {}).get("owner") or {}
    unit, exe = owner.get("unit"), (process or {}).get("exe")
    fixes = []
    if unit:
        fixes.append(f"Now: add `AmbientCapabilities=CAP_NET_BIND_SERVICE` to {unit} "
                     f"(`systemctl edit {unit}`), then restart it.")
    if exe:
        fixes.append(f"{'Or' if fixes else 'Now'}: `setcap cap_net_bind_service=+ep {exe}` "
                     f"(file capabilities; lost when the binary is replaced).")
    fixes.append(lower)
    return Verdict(
        cause="privileged_port",
        summary=f"{head}, and {who} does not hold CAP_NET_BIND_SERVICE {cite('port_rule')}",
        advice=tuple(fixes))


def invalid(attempt: SocketCall, bound: Endpoint | None) -> Verdict | None:
    """EINVAL on bind(): the socket already had an address (``bound``, read
    through its fd), or an IPv6 link-local address came without a scope."""
    if bound is not None and bound.port:
        return Verdict(
            cause="already_bound",
            summary=(f"the socket is already bound, to {bound}: a socket is bound once "
                     f"{cite('bound_once')}"),
            advice=(f"In code: bind() each socket once; to move it to another address, close "
                    f"it and bind a new one (fd {attempt.fd} of "
                    f"{phrases.task(attempt.comm, attempt.pid)} is the one bound twice).",))
    try:
        link_local = attempt.family == "inet6" and ipaddress.ip_address(attempt.addr).is_link_local
    except ValueError:
        link_local = False
    if link_local:
        return _verdict("link_local_scope",
                        f"{attempt.addr} is link-local, and the bind() named no interface "
                        f"{cite('v6_scope')}",
                        f"In code: give the interface: sin6_scope_id (`{attempt.addr}%IFNAME` "
                        f"where the address is text), or SO_BINDTODEVICE before bind().")
    return None


# The LSMs that can refuse a bind() (security_socket_bind), and whether each
# can for UDP: Landlock's net rules cover TCP only (LANDLOCK_ACCESS_NET_BIND_TCP).
BIND_LSMS = {"selinux": True, "apparmor": True, "smack": True, "tomoyo": True,
             "landlock": False}


def _whose(cgroup: str | None) -> str:
    """The unit, container or pod a cgroup path names, as ", unit X"."""
    if not cgroup:
        return ""
    n = parse_cgroup(cgroup)
    if n.container_id:
        return f", container {n.container_id[:12]}"
    if n.pod_uid:
        return f", pod uid {n.pod_uid}"
    return f", {'user unit' if n.user else 'unit'} {n.unit}" if n.unit else ""


def _programs_phrase(progs: tuple[Any, ...]) -> str:
    return ", ".join(f"{p.name} (id {p.id}, {p.hook}, attached at {p.cgroup or '?'}"
                     f"{_whose(p.cgroup)})" for p in progs)


def _cgroup_bpf(attempt: SocketCall, progs: tuple[Any, ...], how: str) -> Verdict:
    systemd = [p for p in progs if p.name.startswith("sd_bind")]
    advice = []
    for p in systemd:
        unit = parse_cgroup(p.cgroup or "").unit
        if unit:
            advice.append(f"Now: systemd's SocketBindAllow=/SocketBindDeny= of {unit} decide: "
                          f"`systemctl show -p SocketBindAllow -p SocketBindDeny {unit}`; allow "
                          f"port {attempt.port} there (`systemctl edit {unit}`).")
            break
    for p in progs:
        if p not in systemd:
            advice.append(f"{'Or' if advice else 'Now'}: `bpftool prog show id {p.id}` and "
                          f"`bpftool cgroup tree`: what attached {p.name} at {p.cgroup or '?'} "
                          f"(a container runtime, a CNI such as Cilium, an agent) decides; "
                          f"change its policy rather than detach a program you do not own.")
            break
    return Verdict(
        cause="cgroup_bpf",
        summary=(f"a cgroup BPF program refused the bind() {how}: "
                 f"{_programs_phrase(progs)} {cite('cgroup_bind')}"),
        advice=tuple(advice))


def policy(attempt: SocketCall, pol: Policy, process: Mapping[str, Any] | None
           ) -> Verdict | None:
    """EPERM on bind(), or EACCES the port rule does not explain: a cgroup
    program or an LSM, where the facts leave one; where both remain, a verdict
    that names them and why they cannot be told apart."""
    progs = pol.cgroup_programs
    name = "EPERM" if attempt.errno == EPERM else "EACCES"
    if attempt.errno == EPERM:
        # Not seccomp: a call its filter refuses never reaches the tracepoints
        # that saw this one (RULES seccomp_first).
        if progs:
            return _cgroup_bpf(attempt, progs, "(a program that returns 0 gives EPERM)")
        return None
    tcp = attempt.protocol != "udp"
    lsms = [x for x in pol.lsms if x in BIND_LSMS and (tcp or BIND_LSMS[x])]
    if progs and not lsms:
        return _cgroup_bpf(attempt, progs, "(it set EACCES with bpf_set_retval)")
    if lsms and progs == ():
        label = f"; the process's label: {pol.lsm_label}" if pol.lsm_label else ""
        return Verdict(
            cause="lsm",
            summary=(f"the port rule allows this bind() and no cgroup program runs on it: "
                     f"an LSM refused it ({', '.join(lsms)} active{label}) "
                     f"{cite('lsm_bind')}"),
            advice=("Now: read the denial the LSM recorded: SELinux an AVC in the audit log "
                    "(`ausearch -m AVC -ts recent`: name_bind); AppArmor `apparmor=\"DENIED\"` "
                    "in the kernel log; Landlock the process's own ruleset "
                    "(landlock_restrict_self: LANDLOCK_ACCESS_NET_BIND_TCP).",))
    remain = ([f"a cgroup program ({_programs_phrase(progs)})"] if progs else []) + \
        [f"the {x} LSM" for x in lsms]
    if not remain:
        return None
    return _undecided(name, remain, "a program may set EACCES (bpf_set_retval), and an LSM "
                      "leaves no trace on the socket")


def _undecided(name: str, remain: list[str], why: str) -> Verdict:
    return Verdict(
        cause="not_a_conflict",
        summary=(f"bind() failed with {name}, not a port conflict: {' or '.join(remain)} "
                 f"refused it; which, portrace cannot tell: {why}"),
        advice=("Now: ask each in turn: `bpftool cgroup tree` for the programs, the audit "
                "and kernel logs for an LSM's denial.",))
