"""How portrace says things, written once: a process, a blocker, a moment,
and the escaping each medium needs. The terminal, the verdict text, the
Markdown and HTML postmortems and ``check`` all phrase through here.

Names come from the processes themselves (comm, argv[0], container labels)
and may carry escape sequences or markup: every medium's ``for_*`` makes a
finished line safe for it."""

from __future__ import annotations

import html
from datetime import datetime, timezone

from portrace.events import Blocker, ProcessRef, SnapshotSource, printable

HOLDERS_UNREADABLE = "other users' fds are readable by root only"


def task(comm: str, pid: int) -> str:
    """``node[4242]``."""
    return f"{comm}[{pid}]"


def process(p: ProcessRef) -> str:
    """``node[4242] (checkout.service)``, ``nginx[77] (inherited fd; container web-1)``."""
    notes = [n for n in ("inherited fd" if p.inherited else "",
                         p.owner.label() if p.owner else "") if n]
    return task(p.comm, p.pid) + (f" ({'; '.join(notes)})" if notes else "")


def blocker(b: Blocker) -> str:
    """One line: state, 4-tuple, timer, closer, options, holders."""
    if b.remote is None:
        where = str(b.local)
    elif b.state in ("TIME_WAIT", "FIN_WAIT2") and b.minisock:
        where = f"{b.local} <- {b.remote}"
    else:
        where = f"{b.local} <-> {b.remote}"
    parts = [f"{b.protocol.upper() + ' ' if b.protocol == 'udp' else ''}{b.state} {where}"]
    if b.expires_s is not None:
        parts.append(f"{b.expires_s:.1f} s left")
    if b.closed_by is not None:
        parts.append(f"closed by {task(b.closed_by.comm, b.closed_by.pid)}")
    if b.opts.reuseaddr is not None:
        parts.append(f"SO_REUSEADDR {'on' if b.opts.reuseaddr else 'off'}"
                     + (", SO_REUSEPORT on" if b.opts.reuseport else ""))
    if b.processes:
        parts.append("held by " + ", ".join(process(p) for p in b.processes))
    elif not b.minisock:
        parts.append("held by no process (orphaned)" if b.holders_known else
                     f"holders not named ({HOLDERS_UNREADABLE})")
    return ", ".join(parts)


# SnapshotSource's values, as a reader of the kernel source names them.
SOCKETS_FROM = {"bind_hash": "the port's bind-hash bucket", "udp_hash": "the port's udp_table slot",
                "iterators": "every socket of the netns", "sock_diag": "sock_diag"}
HOLDERS_FROM = {"binder": "the binders' fds", "cgroup": "the fds of the sockets' cgroups",
                "host": "every fd of the host",
                "proc": "/proc/PID/fd", "none": ""}


def lookup_path(src: SnapshotSource) -> str:
    """``sockets from the port's bind-hash bucket, holders from the binders' fds``,
    with per-protocol sources when they differ, and why a cheaper path was left."""
    kinds = sorted(set(src.sockets.values()))
    where = " and ".join(
        SOCKETS_FROM.get(k, k) + ("" if len(kinds) == 1 else
                                  f" ({'/'.join(p for p, v in src.sockets.items() if v == k)})")
        for k in kinds)
    text = f"sockets from {where}"
    if HOLDERS_FROM.get(src.holders):
        text += f", holders from {HOLDERS_FROM[src.holders]}"
    return text + (f" ({src.fallback})" if src.fallback else "")


def moment(ts: datetime) -> str:
    """A postmortem's time: ``2026-11-30 12:00:01.123 UTC``."""
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def clock(ts: datetime) -> str:
    """A live line's time, the terminal's local clock: ``12:00:01``."""
    return ts.astimezone().strftime("%H:%M:%S")


def for_terminal(text: str) -> str:
    return printable(text)


def for_markdown(text: str) -> str:
    """Printable, and no markup a renderer would act on."""
    return html.escape(printable(text), quote=False)


def for_html(text: str) -> str:
    return html.escape(printable(text))
