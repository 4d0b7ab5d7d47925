"""Postmortem from evidence: per port, each *blocked window* (from the first
failed bind()/listen() to the next successful one on that port), with its
attempts, causes, blockers, who closed them, the processes involved (with
build-ids) and the settings in force. Works on the typed events
(evidence.read) and phrases them through portrace.judge.phrases; renders terminal
text, Markdown, JSON, or one self-contained HTML file with a timeline."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from portrace.events import (
    Blocker,
    CallError,
    Event,
    ProcessRef,
    Ready,
    Repeats,
    SocketCall,
    iso,
    write,
)
from portrace.events import to_json as event_json
from portrace.judge import phrases

FAILURES = ("bind", "listen")  # calls whose failures open a window; connect's are listed


@dataclass(frozen=True)
class Involved:
    """A process in a window: the one that failed, or one holding a blocker."""

    role: str  # failed | held
    process: ProcessRef

    def line(self) -> str:
        facts = self.process.facts or {}
        exe = facts.get("exe") or "?"
        bid = facts.get("build_id") or "no build-id"
        return f"{phrases.process(self.process)} ({self.role}) {exe} build-id {bid}"


@dataclass
class Window:
    port: int
    failures: list[CallError] = field(default_factory=list)
    recovered_by: SocketCall | None = None
    repeats: list[Repeats] = field(default_factory=list)  # coalesced failures, counted

    @property
    def start(self) -> datetime:
        return self.failures[0].ts

    @property
    def end(self) -> datetime | None:
        return None if self.recovered_by is None else self.recovered_by.ts

    def seconds(self, until: datetime) -> float:
        return ((self.end or until) - self.start).total_seconds()

    @property
    def attempts(self) -> int:
        """Failed attempts, the coalesced repeats included."""
        return len(self.failures) + sum(r.count for r in self.repeats)

    def causes(self) -> Counter[str]:
        """Causes by attempt: a repeat has the cause of the report it repeats."""
        out = Counter(f.verdict.cause for f in self.failures)
        for r in self.repeats:
            of = next((f for f in reversed(self.failures)
                       if f.attempt.pid == r.pid and f.ts <= r.since), None)
            out[of.verdict.cause if of else "unknown"] += r.count
        return out

    def blockers(self) -> list[tuple[Blocker, CallError]]:
        """Distinct blockers (by state and 4-tuple), each with the failure
        that first showed it."""
        seen: dict[tuple[Any, ...], tuple[Blocker, CallError]] = {}
        for f in self.failures:
            for b in f.blockers:
                seen.setdefault((b.state, b.local, b.remote), (b, f))
        return list(seen.values())

    def processes(self) -> list[Involved]:
        """Failing and holding processes, distinct by pid and build-id."""
        out: dict[tuple[int, Any], Involved] = {}
        for f in self.failures:
            a = f.attempt
            p = ProcessRef(pid=a.pid, comm=a.comm, facts=f.process)
            out.setdefault((a.pid, (f.process or {}).get("build_id")), Involved("failed", p))
            for b in f.blockers:
                for h in b.processes:
                    out.setdefault((h.pid, (h.facts or {}).get("build_id")), Involved("held", h))
        return list(out.values())


@dataclass
class Postmortem:
    files: list[str]
    first: datetime | None
    last: datetime | None
    hosts: list[Ready]
    windows: dict[int, list[Window]]
    settings: dict[str, str]
    connect_errors: list[CallError]
    successes: list[SocketCall]
    warnings: list[str]


def analyze(events: Iterable[Event], files: list[str], warnings: list[str],
            since: datetime | None = None, until: datetime | None = None) -> Postmortem:
    evs = sorted((e for e in events if (since is None or e.ts >= since)
                  and (until is None or e.ts <= until)), key=lambda e: e.ts)
    windows: dict[int, list[Window]] = {}
    open_: dict[int, Window] = {}
    settings: dict[str, str] = {}
    hosts: list[Ready] = []
    connects: list[CallError] = []
    successes: list[SocketCall] = []
    for e in evs:
        if isinstance(e, Ready):
            hosts.append(e)
        elif isinstance(e, CallError) and e.attempt.call in FAILURES:
            settings.update(e.sysctls)
            port = e.attempt.port
            w = open_.get(port)
            if w is None:
                w = open_[port] = Window(port)
                windows.setdefault(port, []).append(w)
            w.failures.append(e)
        elif isinstance(e, CallError):
            settings.update(e.sysctls)
            connects.append(e)
        elif isinstance(e, Repeats) and e.call != "connect" and e.port in open_:
            open_[e.port].repeats.append(e)
        elif isinstance(e, SocketCall) and e.ok and e.call in FAILURES:
            successes.append(e)
            if e.port in open_:
                open_.pop(e.port).recovered_by = e
    return Postmortem(files=files, first=evs[0].ts if evs else None,
                      last=evs[-1].ts if evs else None, hosts=hosts, windows=windows,
                      settings=settings, connect_errors=connects, successes=successes,
                      warnings=warnings)


def _window_head(w: Window, last: datetime) -> str:
    r = w.recovered_by
    if r is not None:
        end = (f"{phrases.moment(r.ts)} ({w.seconds(last):.1f} s blocked), recovered by "
               f"{phrases.task(r.comm, r.pid)} {r.call}")
    else:
        end = f"still blocked at the end of the evidence ({w.seconds(last):.1f} s)"
    n = w.attempts
    return f"{phrases.moment(w.start)} -> {end}; {n} failed attempt{'s' * (n != 1)}"


def _causes(w: Window, times: str) -> str:
    return ", ".join(f"{c} {times}{n}" for c, n in w.causes().most_common())


def _host(pm: Postmortem) -> str | None:
    for h in pm.hosts[:1]:
        return f"host {h.host.get('hostname', '?')}, kernel {h.kernel}"
    return None


# -- renderers ------------------------------------------------------------------

def to_text(pm: Postmortem, markdown: bool = False) -> str:
    h1, h2, li = ("# ", "## ", "- ") if markdown else ("", "", "  ")
    out = []
    span = (f"{phrases.moment(pm.first)} .. {phrases.moment(pm.last)}"
            if pm.first and pm.last else "no events")
    out.append(f"{h1}portrace postmortem: {span}")
    host = _host(pm)
    if host:
        out.append(f"{li}{host}")
    out.append(f"{li}evidence: {len(pm.files)} file(s)")
    for warning in pm.warnings:
        out.append(f"{li}warning: {warning}")
    last = pm.last or datetime.min
    if not pm.windows and not pm.connect_errors:
        out.append("\nNo failed bind()/listen()/connect() in this evidence.")
    for port, windows in sorted(pm.windows.items()):
        label = "ephemeral port (bind 0 / autobind)" if port == 0 else f"port {port}"
        out.append(f"\n{h2}{label}: {len(windows)} blocked window(s)")
        for w in windows:
            out.append(f"\n{li}{_window_head(w, last)}" if not markdown
                       else f"\n### {_window_head(w, last)}\n")
            out.append(f"{li}  cause: {_causes(w, 'x')}")
            for b, _f in w.blockers():
                out.append(f"{li}  blocker: {phrases.blocker(b)}")
            advice = w.failures[-1].verdict.advice
            if advice:
                out.append(f"{li}  advice: {advice[0]}")
            for p in w.processes():
                out.append(f"{li}  process: {p.line()}")
    if pm.connect_errors:
        out.append(f"\n{h2}connect() failures: {len(pm.connect_errors)}")
        for e in pm.connect_errors[:20]:
            out.append(f"{li}{phrases.moment(e.ts)} {phrases.task(e.attempt.comm, e.attempt.pid)}"
                       f": {e.verdict.summary}")
    if pm.settings:
        out.append(f"\n{h2}settings in force (the failing processes' namespaces)")
        for k, v in sorted(pm.settings.items()):
            out.append(f"{li}{'`' if markdown else ''}{k} = {v}{'`' if markdown else ''}")
    safe = phrases.for_markdown if markdown else phrases.for_terminal
    return "\n".join(_lines_kept(line, safe) for line in out) + "\n"


def _lines_kept(line: str, safe: Callable[[str], str]) -> str:
    """A report line made safe for its medium; the newlines the report itself
    puts around it are kept."""
    body = line.strip("\n")
    lead, tail = line[:len(line) - len(line.lstrip("\n"))], line[len(line.rstrip("\n")):]
    return lead + safe(body) + tail


def to_json(pm: Postmortem) -> dict[str, Any]:
    last = pm.last or datetime.min
    return {
        "files": pm.files,
        "first": pm.first.isoformat() if pm.first else None,
        "last": pm.last.isoformat() if pm.last else None,
        "hosts": [{"ts": iso(h.ts), "kernel": h.kernel, **h.host, "options": h.options}
                  for h in pm.hosts],
        "warnings": pm.warnings,
        "ports": {
            str(port): [
                {
                    "start": w.start.isoformat(),
                    "end": w.end.isoformat() if w.end else None,
                    "blocked_s": round(w.seconds(last), 6),
                    "recovered": w.recovered_by is not None,
                    "attempts": w.attempts,
                    "causes": dict(w.causes()),
                    "blockers": [write(b) for b, _ in w.blockers()],
                    "processes": [{**(p.process.facts or {}), "pid": p.process.pid,
                                   "comm": p.process.comm, "role": p.role}
                                  for p in w.processes()],
                    "recovered_by": event_json(w.recovered_by) if w.recovered_by else None,
                }
                for w in windows
            ]
            for port, windows in sorted(pm.windows.items())
        },
        "connect_errors": [event_json(e) for e in pm.connect_errors],
        "settings": pm.settings,
    }


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;
text-align:left;vertical-align:top}code{font-size:.92em}
.window{fill:#d33;fill-opacity:.12;stroke:#d33;stroke-opacity:.4}
.failure{fill:#d33}.success{fill:#2a2}.expiry{stroke:#e90;stroke-width:6}
.axis{stroke:#999}.lbl{font-size:11px;fill:#555}
"""
e = phrases.for_html


def _dot(kind: str, x: float, y: int, r: int, title: str) -> str:
    return (f'<circle class="mark {kind}" cx="{x:.1f}" cy="{y}" r="{r}">'
            f'<title>{e(title)}</title></circle>')


def _svg_timeline(port: int, windows: list[Window], successes: list[SocketCall],
                  t0: datetime, t1: datetime) -> str:
    width, height, pad = 1000, 120, 40
    span = max((t1 - t0).total_seconds(), 1e-3)

    def x(ts: datetime) -> float:
        return pad + (width - 2 * pad) * (ts - t0).total_seconds() / span

    marks = [f'<line class="axis" x1="{pad}" y1="95" x2="{width - pad}" y2="95"/>',
             f'<text class="lbl" x="{pad}" y="112">{e(phrases.moment(t0))}</text>',
             f'<text class="lbl" x="{width - pad}" y="112" text-anchor="end">'
             f'{e(phrases.moment(t1))}</text>']
    for w in windows:
        end = w.end or t1
        marks.append(f'<rect class="mark window" x="{x(w.start):.1f}" y="10" '
                     f'width="{max(2.0, x(end) - x(w.start)):.1f}" height="80">'
                     f'<title>blocked {w.seconds(t1):.1f} s, {w.attempts} attempts'
                     f'</title></rect>')
        for f in w.failures:
            a = f.attempt
            marks.append(_dot("failure", x(f.ts), 30, 5, f"{phrases.moment(f.ts)} "
                              f"{phrases.task(a.comm, a.pid)} {f.type} {f.verdict.cause}"))
            for b in f.blockers:
                if b.expires_s:
                    # Drawn until its timer ends, or until the port was taken
                    # (it may have been destroyed, e.g. by ss -K, before).
                    gone = f.ts + timedelta(seconds=b.expires_s)
                    stop = min(gone, w.end or t1, t1)
                    marks.append(f'<line class="mark expiry" x1="{x(f.ts):.1f}" y1="60" '
                                 f'x2="{x(stop):.1f}" y2="60"><title>'
                                 f'{e(b.state)}, timer until {e(phrases.moment(gone))}'
                                 f'</title></line>')
        for r in w.repeats:
            marks.append(_dot("failure", x(r.ts), 30, 4, f"{phrases.moment(r.ts)} "
                              f"{phrases.task(r.comm, r.pid)} x{r.count} more, same failure"))
    for s in successes:
        marks.append(_dot("success", x(s.ts), 80, 5, f"{phrases.moment(s.ts)} "
                          f"{phrases.task(s.comm, s.pid)} {s.call} ok"))
    return (f'<svg class="timeline" data-port="{port}" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="timeline of port {port}">'
            + "".join(marks) + "</svg>")


def to_html(pm: Postmortem) -> str:
    body = [f"<h1>portrace postmortem</h1><p>{e(phrases.moment(pm.first)) if pm.first else ''}"
            f" .. {e(phrases.moment(pm.last)) if pm.last else ''}; {len(pm.files)} evidence "
            "file(s)</p>"]
    host = _host(pm)
    if host:
        body.append(f"<p>{e(host)}</p>")
    for warning in pm.warnings:
        body.append(f"<p>warning: {e(warning)}</p>")
    legend = ("<p class='lbl'>red band: blocked window; red dot: failed attempt; orange: a "
              "TIME_WAIT/FIN_WAIT2 blocker, until its timer ends or the port is taken; green: "
              "successful bind/listen</p>")
    for port, windows in sorted(pm.windows.items()):
        port_ok = [s for s in pm.successes if s.port == port]
        times = [w.start for w in windows] + [s.ts for s in port_ok]
        times += [w.end or pm.last for w in windows if pm.last]
        t0, t1 = min(times), max(times)
        t0 -= timedelta(seconds=max(0.5, (t1 - t0).total_seconds() * 0.05))
        t1 += timedelta(seconds=max(0.5, (t1 - t0).total_seconds() * 0.05))
        body.append(f"<h2>port {port}: {len(windows)} blocked window(s)</h2>")
        body.append(_svg_timeline(port, windows, port_ok, t0, t1) + legend)
        rows = []
        last = pm.last or t1
        for w in windows:
            blockers = "<br>".join(e(phrases.blocker(b)) for b, _ in w.blockers())
            procs = "<br>".join(e(p.line()) for p in w.processes())
            rows.append(f"<tr><td>{e(_window_head(w, last))}</td><td>{e(_causes(w, '×'))}</td>"
                        f"<td>{blockers}</td><td>{procs}</td></tr>")
        body.append("<table><tr><th>window</th><th>cause</th><th>blockers</th>"
                    "<th>processes (build-id)</th></tr>" + "".join(rows) + "</table>")
    if pm.settings:
        body.append("<h2>settings in force</h2><table>" + "".join(
            f"<tr><td><code>{e(k)}</code></td><td>{e(v)}</td></tr>"
            for k, v in sorted(pm.settings.items())) + "</table>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>portrace postmortem"
            f"</title><style>{CSS}</style></head><body>" + "".join(body) + "</body></html>\n")


def dumps(pm: Postmortem) -> str:
    return json.dumps(to_json(pm), indent=2) + "\n"
