"""Postmortem from evidence: per port, each *blocked window* (from the first
failed bind()/listen() to the next successful one on that port), with its
attempts, causes, blockers, who closed them, the processes involved (with
build-ids) and the settings in force. Renders terminal text, Markdown, JSON,
or one self-contained HTML file with a timeline."""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from portrace.events import printable

FAILURES = ("bind_error", "listen_error")
SUCCESSES = ("bind", "listen")

Ev = dict[str, Any]


def parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass
class Window:
    port: int
    failures: list[Ev] = field(default_factory=list)
    recovered_by: Ev | None = None
    repeats: list[Ev] = field(default_factory=list)  # coalesced failures, counted

    @property
    def start(self) -> datetime:
        return parse_ts(self.failures[0]["ts"])

    @property
    def end(self) -> datetime | None:
        return None if self.recovered_by is None else parse_ts(self.recovered_by["ts"])

    def seconds(self, until: datetime) -> float:
        return ((self.end or until) - self.start).total_seconds()

    @property
    def attempts(self) -> int:
        """Failed attempts, the coalesced repeats included."""
        return len(self.failures) + sum(r["count"] for r in self.repeats)

    def causes(self) -> Counter[str]:
        """Causes by attempt: a repeat has the cause of the report it repeats."""
        out = Counter(f["verdict"]["cause"] for f in self.failures)
        for r in self.repeats:
            of = next((f for f in reversed(self.failures)
                       if f["pid"] == r["pid"] and f["ts"] <= r["since"]), None)
            out[of["verdict"]["cause"] if of else "unknown"] += r["count"]
        return out

    def blockers(self) -> list[tuple[Ev, Ev]]:
        """Distinct blockers (by state and 4-tuple), each with the failure
        that first showed it."""
        seen: dict[tuple, tuple[Ev, Ev]] = {}
        for f in self.failures:
            for b in f["blockers"]:
                key = (b["state"], json.dumps(b["local"]), json.dumps(b["remote"]))
                seen.setdefault(key, (b, f))
        return list(seen.values())

    def processes(self) -> list[Ev]:
        """Failing and holding processes, distinct by pid and build-id."""
        out: dict[tuple, Ev] = {}
        for f in self.failures:
            p = f.get("process") or {"pid": f["pid"], "comm": f["comm"]}
            out.setdefault((p["pid"], p.get("build_id")), {**p, "role": "failed"})
            for b in f["blockers"]:
                for h in b["processes"]:
                    out.setdefault((h["pid"], h.get("build_id")), {**h, "role": "held"})
        return list(out.values())


@dataclass
class Postmortem:
    files: list[str]
    first: datetime | None
    last: datetime | None
    hosts: list[Ev]
    windows: dict[int, list[Window]]
    settings: dict[str, str]
    connect_errors: list[Ev]
    warnings: list[str]


def analyze(events: Iterable[Ev], files: list[str], warnings: list[str],
            since: datetime | None = None, until: datetime | None = None) -> Postmortem:
    evs = sorted((e for e in events if (since is None or parse_ts(e["ts"]) >= since)
                  and (until is None or parse_ts(e["ts"]) <= until)),
                 key=lambda e: e["ts"])
    windows: dict[int, list[Window]] = {}
    open_: dict[int, Window] = {}
    settings: dict[str, str] = {}
    hosts: list[Ev] = []
    connects: list[Ev] = []
    for e in evs:
        t = e["type"]
        if t == "ready":
            hosts.append({"ts": e["ts"], "kernel": e.get("kernel"), **(e.get("host") or {}),
                          "options": e.get("options")})
        elif t in FAILURES:
            settings.update(e.get("sysctls") or {})
            w = open_.get(e["port"])
            if w is None:
                w = open_[e["port"]] = Window(e["port"])
                windows.setdefault(e["port"], []).append(w)
            w.failures.append(e)
        elif t == "repeats" and e["call"] != "connect" and e["port"] in open_:
            open_[e["port"]].repeats.append(e)
        elif t in SUCCESSES and e["port"] in open_:
            open_.pop(e["port"]).recovered_by = e
        elif t == "connect_error":
            settings.update(e.get("sysctls") or {})
            connects.append(e)
    return Postmortem(files=files, first=parse_ts(evs[0]["ts"]) if evs else None,
                      last=parse_ts(evs[-1]["ts"]) if evs else None, hosts=hosts,
                      windows=windows, settings=settings, connect_errors=connects,
                      warnings=warnings)


# -- shared phrasing ------------------------------------------------------------

def _t(ts: datetime | str) -> str:
    d = parse_ts(ts) if isinstance(ts, str) else ts
    return d.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _blocker_line(b: Ev) -> str:
    remote = b.get("remote")
    where = f"{_ep(b['local'])}" + (f" <- {_ep(remote)}" if remote else "")
    parts = [f"{b['state']} {where}"]
    if b.get("expires_s") is not None:
        parts.append(f"{b['expires_s']:.1f} s left then")
    if b.get("closed_by"):
        c = b["closed_by"]
        parts.append(f"closed by {c['comm']}[{c['pid']}] at {_t(c['ts'])}")
    if b.get("processes"):
        parts.append("held by " + ", ".join(f"{p['comm']}[{p['pid']}]" for p in b["processes"]))
    return ", ".join(parts)


def _ep(ep: Ev) -> str:
    a = ep["addr"]
    return f"[{a}]:{ep['port']}" if ":" in a else f"{a}:{ep['port']}"


def _proc_line(p: Ev) -> str:
    exe = p.get("exe") or "?"
    bid = p.get("build_id") or "no build-id"
    return f"{p['comm']}[{p['pid']}] ({p['role']}) {exe} build-id {bid}"


def _window_head(w: Window, last: datetime) -> str:
    if w.recovered_by is not None:
        r = w.recovered_by
        end = (f"{_t(w.end)} ({w.seconds(last):.1f} s blocked), recovered by "  # type: ignore[arg-type]
               f"{r['comm']}[{r['pid']}] {r['type']}")
    else:
        end = f"still blocked at the end of the evidence ({w.seconds(last):.1f} s)"
    n = w.attempts
    return f"{_t(w.start)} -> {end}; {n} failed attempt{'s' * (n != 1)}"


# -- renderers ------------------------------------------------------------------

def to_text(pm: Postmortem, markdown: bool = False) -> str:
    h1, h2, li = ("# ", "## ", "- ") if markdown else ("", "", "  ")
    out = []
    span = f"{_t(pm.first)} .. {_t(pm.last)}" if pm.first and pm.last else "no events"
    out.append(f"{h1}portrace postmortem: {span}")
    for h in pm.hosts[:1]:
        out.append(f"{li}host {h.get('hostname', '?')}, kernel {h.get('kernel', '?')}")
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
            causes = ", ".join(f"{c} x{n}" for c, n in w.causes().most_common())
            out.append(f"{li}  cause: {causes}")
            for b, _f in w.blockers():
                out.append(f"{li}  blocker: {_blocker_line(b)}")
            advice = w.failures[-1]["verdict"]["advice"]
            if advice:
                out.append(f"{li}  advice: {advice[0]}")
            for p in w.processes():
                out.append(f"{li}  process: {_proc_line(p)}")
    if pm.connect_errors:
        out.append(f"\n{h2}connect() failures: {len(pm.connect_errors)}")
        for e in pm.connect_errors[:20]:
            out.append(f"{li}{_t(e['ts'])} {e['comm']}[{e['pid']}]: {e['verdict']['summary']}")
    if pm.settings:
        out.append(f"\n{h2}settings in force (the failing processes' namespaces)")
        for k, v in sorted(pm.settings.items()):
            out.append(f"{li}{'`' if markdown else ''}{k} = {v}{'`' if markdown else ''}")
    return "\n".join(_safe_line(line, markdown) for line in out) + "\n"


def _safe_line(line: str, markdown: bool) -> str:
    """A report line with every name in it made printable; the newlines the
    report itself puts around it are kept. Markdown also gets <, > and &
    escaped, so a name cannot become markup in a rendered page."""
    body = line.strip("\n")
    lead, tail = line[:len(line) - len(line.lstrip("\n"))], line[len(line.rstrip("\n")):]
    body = printable(body)
    if markdown:
        body = html.escape(body, quote=False)
    return lead + body + tail


def to_json(pm: Postmortem) -> dict[str, Any]:
    last = pm.last or datetime.min
    return {
        "files": pm.files,
        "first": pm.first.isoformat() if pm.first else None,
        "last": pm.last.isoformat() if pm.last else None,
        "hosts": pm.hosts,
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
                    "blockers": [b for b, _ in w.blockers()],
                    "processes": w.processes(),
                    "recovered_by": w.recovered_by,
                }
                for w in windows
            ]
            for port, windows in sorted(pm.windows.items())
        },
        "connect_errors": pm.connect_errors,
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


def _dot(kind: str, x: float, y: int, r: int, title: str) -> str:
    return (f'<circle class="mark {kind}" cx="{x:.1f}" cy="{y}" r="{r}">'
            f'<title>{_e(title)}</title></circle>')


def _svg_timeline(port: int, windows: list[Window], successes: list[Ev],
                  t0: datetime, t1: datetime) -> str:
    width, height, pad = 1000, 120, 40
    span = max((t1 - t0).total_seconds(), 1e-3)

    def x(ts: datetime) -> float:
        return pad + (width - 2 * pad) * (ts - t0).total_seconds() / span

    marks = [f'<line class="axis" x1="{pad}" y1="95" x2="{width - pad}" y2="95"/>',
             f'<text class="lbl" x="{pad}" y="112">{html.escape(_t(t0))}</text>',
             f'<text class="lbl" x="{width - pad}" y="112" text-anchor="end">'
             f'{html.escape(_t(t1))}</text>']
    for w in windows:
        end = w.end or t1
        marks.append(f'<rect class="mark window" x="{x(w.start):.1f}" y="10" '
                     f'width="{max(2.0, x(end) - x(w.start)):.1f}" height="80">'
                     f'<title>blocked {w.seconds(t1):.1f} s, {w.attempts} attempts'
                     f'</title></rect>')
        for f in w.failures:
            ts = parse_ts(f["ts"])
            marks.append(_dot("failure", x(ts), 30, 5, f"{_t(ts)} {f['comm']}[{f['pid']}] "
                              f"{f['type']} {f['verdict']['cause']}"))
            for b in f["blockers"]:
                if b.get("expires_s"):
                    # Drawn until its timer ends, or until the port was taken
                    # (it may have been destroyed, e.g. by ss -K, before).
                    gone = ts + timedelta(seconds=b["expires_s"])
                    stop = min(gone, w.end or t1, t1)
                    marks.append(f'<line class="mark expiry" x1="{x(ts):.1f}" y1="60" '
                                 f'x2="{x(stop):.1f}" y2="60"><title>'
                                 f'{_e(b["state"])}, timer until {_e(_t(gone))}'
                                 f'</title></line>')
        for r in w.repeats:
            ts = parse_ts(r["ts"])
            marks.append(_dot("failure", x(ts), 30, 4, f"{_t(ts)} {r['comm']}[{r['pid']}] "
                              f"x{r['count']} more, same failure"))
    for s in successes:
        ts = parse_ts(s["ts"])
        marks.append(_dot("success", x(ts), 80, 5,
                          f"{_t(ts)} {s['comm']}[{s['pid']}] {s['type']} ok"))
    return (f'<svg class="timeline" data-port="{port}" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="timeline of port {port}">'
            + "".join(marks) + "</svg>")


def _e(value: object) -> str:
    return html.escape(printable(str(value)))


def to_html(pm: Postmortem, successes: list[Ev]) -> str:
    e = _e
    body = [f"<h1>portrace postmortem</h1><p>{e(_t(pm.first)) if pm.first else ''} .. "
            f"{e(_t(pm.last)) if pm.last else ''}; {len(pm.files)} evidence file(s)</p>"]
    for h in pm.hosts[:1]:
        body.append(f"<p>host <b>{e(str(h.get('hostname')))}</b>, kernel "
                    f"<code>{e(str(h.get('kernel')))}</code></p>")
    for warning in pm.warnings:
        body.append(f"<p>warning: {e(warning)}</p>")
    legend = ("<p class='lbl'>red band: blocked window; red dot: failed attempt; orange: a "
              "TIME_WAIT/FIN_WAIT2 blocker, until its timer ends or the port is taken; green: "
              "successful bind/listen</p>")
    for port, windows in sorted(pm.windows.items()):
        port_ok = [s for s in successes if s["port"] == port]
        times = [w.start for w in windows] + [parse_ts(s["ts"]) for s in port_ok]
        times += [w.end or pm.last for w in windows if pm.last]
        t0, t1 = min(times), max(times)
        t0 -= timedelta(seconds=max(0.5, (t1 - t0).total_seconds() * 0.05))
        t1 += timedelta(seconds=max(0.5, (t1 - t0).total_seconds() * 0.05))
        body.append(f"<h2>port {port}: {len(windows)} blocked window(s)</h2>")
        body.append(_svg_timeline(port, windows, port_ok, t0, t1) + legend)
        rows = []
        last = pm.last or t1
        for w in windows:
            causes = ", ".join(f"{c} ×{n}" for c, n in w.causes().most_common())
            blockers = "<br>".join(e(_blocker_line(b)) for b, _ in w.blockers())
            procs = "<br>".join(e(_proc_line(p)) for p in w.processes())
            rows.append(f"<tr><td>{e(_window_head(w, last))}</td><td>{e(causes)}</td>"
                        f"<td>{blockers}</td><td>{procs}</td></tr>")
        body.append("<table><tr><th>window</th><th>cause</th><th>blockers</th>"
                    "<th>processes (build-id)</th></tr>" + "".join(rows) + "</table>")
    if pm.settings:
        body.append("<h2>settings in force</h2><table>" + "".join(
            f"<tr><td><code>{e(k)}</code></td><td>{e(v)}</td></tr>"
            for k, v in sorted(pm.settings.items())) + "</table>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>portrace postmortem"
            f"</title><style>{CSS}</style></head><body>" + "".join(body) + "</body></html>\n")
