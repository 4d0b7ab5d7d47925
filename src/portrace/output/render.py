"""Human output: one compact block per failure, for a person at a terminal.

Every line is made printable (events.printable) before it is styled: names
come from the processes themselves and may carry escape sequences."""

from __future__ import annotations

from collections.abc import Callable

import click

from portrace.events import (
    CallError,
    Check,
    ErrorRecord,
    Event,
    Lost,
    Owner,
    Ready,
    Repeats,
    SocketCall,
    StateChange,
    errno_name,
    format_endpoint,
    read,
)
from portrace.judge import phrases
from portrace.kernel.engine import RATE_MAX, RATE_WINDOW_MS


def _styled(text: str, **style: object) -> str:
    return click.style(phrases.for_terminal(text), **style)  # type: ignore[arg-type]

MAX_BLOCKERS_SHOWN = 5
LOST_WHERE = {"kernel": "a ring buffer was full",
              "limit": f"over the port's rate of {RATE_MAX} failures per {RATE_WINDOW_MS} ms",
              "queue": "portrace's backlog of failures to diagnose was full"}


# How the namespace was reached when not through the failing thread itself
# (events.Netns.source).
NETNS_NOTES = {
    "tracer": " (not known: the process had exited; nothing looked up)",
    "pinned": " (the process had exited; entered by its ip netns name)",
    "member": " (the process had exited; entered through another process in it)",
    "gone": " (gone by lookup: nothing left in it to enter)",
    "closed": " (not entered: CAP_SYS_ADMIN is not held)",
}


def _blocker_lines(ev: CallError | Check) -> list[str]:
    """The first blockers, then how many more there are, by state."""
    lines = ["  " + _styled(phrases.blocker(b), fg="yellow")
             for b in ev.blockers[:MAX_BLOCKERS_SHOWN]]
    total = ev.blockers_total or len(ev.blockers)
    if total > MAX_BLOCKERS_SHOWN:
        by_state = ", ".join(f"{n} {state}" for state, n in
                             sorted((ev.blockers_by_state or {}).items(), key=lambda kv: -kv[1]))
        lines.append(f"  ... and {total - MAX_BLOCKERS_SHOWN} more"
                     + (f" ({total} in all: {by_state})" if by_state else " (see --json)"))
    return lines


def format_check(ev: Check) -> list[str]:
    """``portrace check``'s answer for one socket."""
    target = f"{ev.protocol} {format_endpoint(ev.addr, ev.port)}"
    where = f"netns {ev.netns.name or ev.netns.inode}, engine {ev.engine}"
    programs = ev.policy.cgroup_programs if ev.policy is not None else None
    note = ([_styled("  but cgroup BPF programs decide when the bind() runs, which portrace "
                     "cannot: " + ", ".join(f"{p.name} (id {p.id}, {p.hook}, at {p.cgroup})"
                                             for p in programs), fg="yellow")]
            if programs else [])
    if ev.free:
        waited = ""
        if ev.waited_for:
            waited = f" after {ev.waited_s:.1f} s; waited for: " + "; ".join(ev.waited_for)
        return [_styled(f"{target}: free{waited}", fg="green", bold=True)
                + _styled(f"  ({where})", dim=True)] + note
    waited = f" after waiting {ev.waited_s:.1f} s" if ev.waited_s is not None else ""
    lines = [_styled(f"{target}: blocked{waited}", fg="red", bold=True)
             + _styled(f"  ({where})", dim=True)]
    lines += _blocker_lines(ev)
    if ev.verdict is not None and not ev.blockers:  # refused: the summary says by what
        lines.append("  " + _styled(ev.verdict.summary, fg="yellow"))
    if ev.verdict is not None:
        lines.append(f"  cause: {_styled(ev.verdict.cause, bold=True)}")
        lines.extend(f"  - {phrases.for_terminal(line)}" for line in ev.verdict.advice)
    return lines


def format_failure(ev: CallError) -> list[str]:
    a = ev.attempt
    target = format_endpoint(a.addr, a.port)
    if a.call == "connect":
        target = "-> " + target
    elif a.port == 0:
        target = "(ephemeral port)" if a.call == "listen" else target
    owner = (ev.process or {}).get("owner")
    named = read(Owner, owner) if owner else ev.exited_owner
    label = f" ({named.label()})" if named else ""
    head = (f"{phrases.clock(ev.ts)} {phrases.task(a.comm, a.pid)}{label} {a.call} {target} "
            f"{errno_name(a.errno)}")
    ns = f"netns {ev.netns.name or ev.netns.inode}" + NETNS_NOTES.get(ev.netns.source, "")
    lines = [_styled(head, bold=True) + _styled(f"  {a.protocol}, {ns}", dim=True)]
    lines += _blocker_lines(ev)
    if not ev.blockers:  # exhaustion, gone, or another errno: the summary says it
        lines.append("  " + _styled(ev.verdict.summary, fg="yellow"))
    how = f"; {phrases.lookup_path(ev.snapshot_source)}" if ev.snapshot_source else ""
    lines.append(f"  cause: {_styled(ev.verdict.cause, bold=True)}"
                 + _styled(f"  (looked up {ev.lookup_ms:.1f} ms after the failure{how})",
                           dim=True))
    lines.extend(f"  - {phrases.for_terminal(line)}" for line in ev.verdict.advice)
    return lines


def format_event(ev: Event, states: bool) -> list[str]:
    """Lines for one event; transitions and successful binds only with ``states``."""
    if isinstance(ev, CallError):
        return format_failure(ev)
    if isinstance(ev, Check):
        return format_check(ev)
    if isinstance(ev, Ready):
        where = ", ".join(map(str, ev.ports)) if ev.ports else "every port (failures only)"
        return [_styled(f"portrace: watching bind() on {where} "
                        f"(engine {ev.engine}, kernel {ev.kernel}); Ctrl-C to stop", dim=True)
                ] + [_styled(f"portrace: without {name}: {lost}", fg="yellow")
                     for name, lost in ev.left_out.items() if name.startswith("CAP_")]
    if isinstance(ev, Lost):
        where = LOST_WHERE.get(ev.source, ev.source)
        return [_styled(f"portrace: {ev.count} records lost ({where})", fg="red")]
    if isinstance(ev, ErrorRecord):
        about = ""
        if ev.failure:
            f = ev.failure
            about = (f", about {f['comm']}[{f['pid']}] {f['call']} "
                     f"{format_endpoint(f['addr'], f['port'])} {f['errno']}")
        return [_styled(f"portrace: error in the {ev.where} ({ev.count} so far){about}: "
                        f"{ev.message}", fg="red")]
    if isinstance(ev, Repeats):
        return [_styled(f"{phrases.clock(ev.ts)} {phrases.task(ev.comm, ev.pid)} {ev.call} "
                            f"{format_endpoint(ev.addr, ev.port)} {errno_name(ev.errno)} "
                            f"x{ev.count} more since {phrases.clock(ev.since)} (the same failure, "
                            "not diagnosed again)", dim=True)]
    if not states:
        return []
    if isinstance(ev, StateChange):
        who = f" {phrases.task(ev.owner.comm, ev.owner.pid)}" if ev.owner else ""
        return [_styled(f"{phrases.clock(ev.ts)} {ev.local} <-> {ev.remote} {ev.old} -> "
                        f"{ev.new}{who}", dim=True)]
    if isinstance(ev, SocketCall):
        return [_styled(f"{phrases.clock(ev.ts)} {phrases.task(ev.comm, ev.pid)} {ev.call} "
                        f"{format_endpoint(ev.addr, ev.port)} ok", dim=True)]
    return []


def terminal_sink(states: bool,
                  echo: Callable[[str], None] = click.echo) -> Callable[[Event], None]:
    def sink(ev: Event) -> None:
        for line in format_event(ev, states):
            echo(line)
    return sink
