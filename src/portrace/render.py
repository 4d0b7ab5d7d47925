"""Human output: one compact block per failure, for a person at a terminal."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import click

from portrace.diagnose import describe
from portrace.events import (
    CallError,
    Event,
    Lost,
    Ready,
    Repeats,
    SocketCall,
    StateChange,
    errno_name,
    format_endpoint,
)

MAX_BLOCKERS_SHOWN = 5


def _clock(ev: Event) -> str:
    return _clock_of(ev.ts)


def _clock_of(ts: datetime) -> str:
    return ts.astimezone().strftime("%H:%M:%S")


# How the namespace was reached when not through the failing thread itself
# (events.Netns.source).
NETNS_NOTES = {
    "tracer": " (not known: the process had exited; nothing looked up)",
    "pinned": " (the process had exited; entered by its ip netns name)",
    "member": " (the process had exited; entered through another process in it)",
    "gone": " (gone by lookup: nothing left in it to enter)",
}


def format_failure(ev: CallError) -> list[str]:
    a = ev.attempt
    target = format_endpoint(a.addr, a.port)
    if a.call == "connect":
        target = "-> " + target
    elif a.port == 0:
        target = "(ephemeral port)" if a.call == "listen" else target
    head = f"{_clock(ev)} {a.comm}[{a.pid}] {a.call} {target} {errno_name(a.errno)}"
    ns = f"netns {ev.netns.name or ev.netns.inode}" + NETNS_NOTES.get(ev.netns.source, "")
    lines = [click.style(head, bold=True) + click.style(f"  {a.protocol}, {ns}", dim=True)]
    for b in ev.blockers[:MAX_BLOCKERS_SHOWN]:
        lines.append("  " + click.style(describe(b), fg="yellow"))
    if len(ev.blockers) > MAX_BLOCKERS_SHOWN:
        lines.append(f"  ... and {len(ev.blockers) - MAX_BLOCKERS_SHOWN} more (see --json)")
    if not ev.blockers:  # exhaustion, gone, or another errno: the summary says it
        lines.append("  " + click.style(ev.verdict.summary, fg="yellow"))
    lines.append(f"  cause: {click.style(ev.verdict.cause, bold=True)}"
                 + click.style(f"  (looked up {ev.lookup_ms:.1f} ms after the failure)", dim=True))
    lines.extend(f"  - {line}" for line in ev.verdict.advice)
    return lines


def format_event(ev: Event, states: bool) -> list[str]:
    """Lines for one event; transitions and successful binds only with ``states``."""
    if isinstance(ev, CallError):
        return format_failure(ev)
    if isinstance(ev, Ready):
        where = ", ".join(map(str, ev.ports)) if ev.ports else "every port (failures only)"
        return [click.style(f"portrace: watching bind() on {where} "
                            f"(engine {ev.engine}, kernel {ev.kernel}); Ctrl-C to stop", dim=True)]
    if isinstance(ev, Lost):
        return [click.style(f"portrace: ring buffer full, {ev.count} records lost", fg="red")]
    if isinstance(ev, Repeats):
        return [click.style(f"{_clock(ev)} {ev.comm}[{ev.pid}] {ev.call} "
                            f"{format_endpoint(ev.addr, ev.port)} {errno_name(ev.errno)} "
                            f"x{ev.count} more since {_clock_of(ev.since)} (the same failure, "
                            "not diagnosed again)", dim=True)]
    if not states:
        return []
    if isinstance(ev, StateChange):
        who = f" {ev.owner.comm}[{ev.owner.pid}]" if ev.owner else ""
        return [click.style(f"{_clock(ev)} {ev.local} <-> {ev.remote} {ev.old} -> {ev.new}{who}",
                            dim=True)]
    if isinstance(ev, SocketCall):
        return [click.style(f"{_clock(ev)} {ev.comm}[{ev.pid}] {ev.call} "
                            f"{format_endpoint(ev.addr, ev.port)} ok", dim=True)]
    return []


def terminal_sink(states: bool,
                  echo: Callable[[str], None] = click.echo) -> Callable[[Event], None]:
    def sink(ev: Event) -> None:
        for line in format_event(ev, states):
            echo(line)
    return sink
