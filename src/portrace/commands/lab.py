"""``portrace lab``: run a port failure with and without a sysctl change and
measure what moved, with the probes attached.

Every (scenario, variant) runs in a fresh network namespace (the sysctls
that matter are per namespace, so the host is never touched) unless --host
is given. The staged processes report the ground truth (attempts, failures
by errno, seconds until the restart got its port); portrace's own verdicts
for their failures are collected beside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portrace.commands.stage import ScratchNetns, Staged
from portrace.errors import ExitStatus, PortraceError, StagingFailed
from portrace.events import CallError, Event, Repeats, StateChange
from portrace.judge.advice import cite
from portrace.judge.diagnose import TCP_TIMEWAIT_LEN_S
from portrace.pipeline.tracer import Tracer

PORT = 9190
# --host runs share one namespace, where each run leaves its TIME_WAIT or
# FIN_WAIT2 behind for up to a minute: each run there takes the first of these
# ports nothing holds (a fresh namespace always has PORT free).
HOST_PORTS = range(PORT, PORT + 64)
CONNECT_RANGE = "42000 42063"  # 64 ephemeral ports: exhausted within a second
IMPROVED_MARGIN = 0.2  # "improved": at least 20 % fewer failures or less blocked time
IMPROVED_MIN_S = 1.0  # ... and for time, at least 1 s less
TIMEWAIT_ROOM = 16  # free TIME_WAIT table entries a --host run waits for
REUSE_VARIANTS = ("neither", "old", "new", "both")
ABSENT = "absent"


class LabError(PortraceError):
    exit_code = ExitStatus.USAGE


class ExpectationFailed(PortraceError):
    exit_code = ExitStatus.EXPECTATION_FAILED


class BadBaseline(PortraceError):
    exit_code = ExitStatus.USAGE


class Worse(PortraceError):
    """A scenario measured worse than its baseline (--baseline without --expect)."""

    exit_code = ExitStatus.WORSE


@dataclass
class Outcome:
    scenario: str
    variant: dict[str, str]  # the sysctls this run set
    attempts: int
    errnos: dict[str, int]
    recovered_s: float | None  # restart scenarios: seconds until the port was had
    within_s: float
    verdicts: dict[str, int]  # portrace's causes for the failures it diagnosed
    sysctls: dict[str, str]  # in force during the run
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def is_connect(self) -> bool:
        """A connect scenario (counts connections), not a restart (counts seconds)."""
        return self.scenario.startswith("connect")

    @property
    def failures(self) -> int:
        return sum(self.errnos.values())

    def blocked_s(self) -> float | None:
        """Seconds the restart was blocked (None: not a restart scenario);
        a restart that never got the port counts as the whole limit."""
        if self.is_connect:
            return None
        return self.within_s if self.recovered_s is None else self.recovered_s

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Outcome:
        """A run of an earlier ``lab --json``/``--save``. Raises KeyError,
        TypeError or ValueError for anything else."""
        known = {"scenario", "variant", "attempts", "failures", "errnos", "recovered_s",
                 "within_s", "verdicts", "sysctls"}
        out = cls(scenario=str(d["scenario"]), variant=dict(d["variant"]),
                  attempts=int(d["attempts"]), errnos={str(k): int(v) for k, v in
                                                       dict(d["errnos"]).items()},
                  recovered_s=None if d["recovered_s"] is None else float(d["recovered_s"]),
                  within_s=float(d["within_s"]), verdicts=dict(d["verdicts"]),
                  sysctls=dict(d["sysctls"]),
                  detail={k: v for k, v in d.items() if k not in known})
        if out.failures != int(d["failures"]):
            raise ValueError("failures does not add up")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "variant": self.variant, "attempts": self.attempts,
                "failures": self.failures, "errnos": self.errnos,
                "recovered_s": self.recovered_s, "within_s": self.within_s,
                "verdicts": self.verdicts, "sysctls": self.sysctls, **self.detail}


class Namespace:
    """Where a run happens: a fresh netns, or (--host) the current one with
    every sysctl it changes restored on exit, Ctrl-C included."""

    def __init__(self, host: bool, tag: str) -> None:
        self.host = host
        self.scratch = None if host else ScratchNetns(f"portrace-lab-{os.getpid()}-{tag}")
        self.saved: dict[str, str] = {}

    def __enter__(self) -> Namespace:
        if self.scratch is not None:
            self.scratch.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for key, value in self.saved.items():
            _sysctl_write(key, value)
        if self.scratch is not None:
            self.scratch.__exit__()

    def set(self, key: str, value: str) -> None:
        if self.scratch is not None:
            self.scratch.sysctl(key, value)
            return
        self.saved.setdefault(key, self.get(key))
        _sysctl_write(key, value)

    def proc_net(self, name: str) -> str:
        """/proc/net/NAME as this namespace sees it (sockstat, netstat)."""
        if self.scratch is None:
            return Path("/proc/net", name).read_text()
        out = subprocess.run(["ip", "netns", "exec", self.scratch.name, "cat",
                              f"/proc/net/{name}"], capture_output=True, text=True, check=False)
        if out.returncode:
            raise LabError(f"cannot read /proc/net/{name}: {out.stderr.strip()}")
        return out.stdout

    def timewait_table(self) -> tuple[int, int]:
        """(minisocks in the TIME_WAIT table, net.ipv4.tcp_max_tw_buckets). A
        FIN_WAIT2 orphan's minisock is counted there too
        (net/ipv4/tcp_minisocks.c: tcp_time_wait)."""
        tw = re.search(r"^TCP:.* tw (\d+)", self.proc_net("sockstat"), re.M)
        return int(tw.group(1)) if tw else 0, int(self.get("net.ipv4.tcp_max_tw_buckets"))

    def timewait_overflows(self) -> int:
        """TcpExt TCPTimeWaitOverflow so far: minisocks the kernel did not
        make because the table was full."""
        return tcpext(self.proc_net("netstat"), "TCPTimeWaitOverflow")

    def get(self, key: str) -> str:
        """The value in force, or "absent" where this kernel has no such sysctl
        (tcp_tw_reuse_delay: present on 6.18, absent on 6.1)."""
        argv = ["sysctl", "-n", key]
        if self.scratch is not None:
            argv = ["ip", "netns", "exec", self.scratch.name, *argv]
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        if out.returncode:
            if "cannot stat" in out.stderr or "No such file" in out.stderr:
                return ABSENT
            raise LabError(f"cannot read sysctl {key}: {out.stderr.strip()}")
        return " ".join(out.stdout.split())


def tcpext(netstat: str, name: str) -> int:
    """A TcpExt counter of /proc/net/netstat (header line, then values); 0
    where this kernel has no such counter."""
    rows = [line.split() for line in netstat.splitlines() if line.startswith("TcpExt:")]
    if len(rows) < 2 or name not in rows[0]:
        return 0
    return int(rows[1][rows[0].index(name)])


# A per-namespace sysctl's name: net. and dot-separated words, nothing that
# sysctl(8) or a path could read as another tree ("/", "..", empty parts).
SYSCTL_KEY = re.compile(r"net(\.[A-Za-z0-9_-]+)+")


def check_settings(settings: list[tuple[str, str]]) -> None:
    """Write every KEY=VALUE once in a throwaway netns before the first run,
    so a bad name or value fails at once with one line, never mid-run.
    Raises LabError."""
    for key, _ in settings:
        if not SYSCTL_KEY.fullmatch(key):
            raise LabError(f"{key!r} is not a net.* sysctl name (want e.g. "
                           "net.ipv4.tcp_fin_timeout)")
    if not settings:
        return
    with Namespace(host=False, tag="check") as ns:
        for key, value in settings:
            if ns.get(key) == ABSENT:
                raise LabError(f"{key}: no such per-namespace sysctl on this kernel")
            try:
                ns.set(key, value)
            except StagingFailed as exc:
                raise LabError(f"{key}={value}: the kernel refused it ({exc})") from None


def _sysctl_write(key: str, value: str) -> None:
    out = subprocess.run(["sysctl", "-qw", f"{key}={value}"], capture_output=True, text=True)
    if out.returncode:
        raise LabError(f"cannot set {key}={value}: {out.stderr.strip()}")


# -- scenarios: each stages a failure and reports the truth --------------------

def _restart(ns: Namespace, port: int, *roles: tuple[str, ...], new_args: tuple[str, ...],
             within: float) -> tuple[dict[str, Any], list[int]]:
    netns = ns.scratch
    pids = []
    held = []
    for role in roles:
        st = Staged(role[0], "127.0.0.1", port, *role[1:], name="old-server", netns=netns)
        held.append(st)
    try:
        new = Staged("restart", "127.0.0.1", port, *new_args, "--within", str(within),
                     name="new-server", netns=netns, timeout=within + 30)
        pids.append(new.pid)
        new.release()
    finally:
        for st in held:
            st.release()
    return json.loads(new.info), pids


def restart_timewait(ns: Namespace, port: int, within: float, reuse: str = "neither"
                     ) -> tuple[dict[str, Any], list[int]]:
    """The old server served a client, closed first and exited (TIME_WAIT on
    its side); the new one retries bind(). reuse: who set SO_REUSEADDR."""
    old = ("timewait", *(["--reuseaddr"] if reuse in ("old", "both") else []))
    new = tuple(["--reuseaddr"] if reuse in ("new", "both") else [])
    return _restart(ns, port, old, new_args=new, within=within)


def restart_finwait2(ns: Namespace, port: int, within: float, reuse: str = "neither"
                     ) -> tuple[dict[str, Any], list[int]]:
    """The old server closed while its peer never answered (orphaned FIN_WAIT2)."""
    return _restart(ns, port, ("finwait2", "--hold"), new_args=(), within=within)


def listener_held(ns: Namespace, port: int, within: float, reuse: str = "neither"
                  ) -> tuple[dict[str, Any], list[int]]:
    """The old server exited, but a child it forked keeps the listening fd."""
    old = Staged("listen-fork-child", "0.0.0.0", port, "--child-seconds", str(int(within) + 30),
                 name="old-server", netns=ns.scratch)
    child = int(old.info)
    old.release()
    try:
        return _restart(ns, port, new_args=(), within=within)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, 15)


def connect_exhaustion(ns: Namespace, port: int, within: float, reuse: str = "neither"
                       ) -> tuple[dict[str, Any], list[int]]:
    """A client opens and closes connections to one server as fast as it can
    through a narrow ip_local_port_range ({CONNECT_RANGE})."""
    if not ns.host:
        ns.set("net.ipv4.ip_local_port_range", CONNECT_RANGE)
    srv = Staged("serve", "127.0.0.1", port, name="server", netns=ns.scratch)
    try:
        cli = Staged("connect-loop", "127.0.0.1", port, "--within", str(within), name="client",
                     netns=ns.scratch, timeout=within + 30)
        cli.release()
    finally:
        srv.release()
    return json.loads(cli.info), [cli.pid]


SCENARIOS: dict[str, Callable[..., tuple[dict[str, Any], list[int]]]] = {
    "restart-timewait": restart_timewait,
    "restart-finwait2": restart_finwait2,
    "listener-held": listener_held,
    "connect-exhaustion": connect_exhaustion,
}
SHOWN_SYSCTLS = ("net.ipv4.tcp_tw_reuse", "net.ipv4.tcp_tw_reuse_delay",
                 "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_timestamps",
                 "net.ipv4.ip_local_port_range", "net.ipv4.tcp_max_tw_buckets")


def parse_scenario(text: str) -> tuple[str, str]:
    name, _, reuse = text.partition(":")
    if name not in SCENARIOS:
        raise LabError(f"unknown scenario {name!r}: one of {', '.join(SCENARIOS)}")
    reuse = reuse or "neither"
    if reuse not in REUSE_VARIANTS or (reuse != "neither" and name != "restart-timewait"):
        raise LabError(f"{text!r}: only restart-timewait takes :{'|'.join(REUSE_VARIANTS)} "
                       "(who set SO_REUSEADDR)")
    return name, reuse


def scenario_name(name: str, reuse: str) -> str:
    """How a run names its scenario: parse_scenario's inverse."""
    return name + (f":{reuse}" if reuse != "neither" else "")


def variants(sysctls: list[tuple[str, str]], compare: tuple[str, list[str]] | None
             ) -> list[dict[str, str]]:
    base = dict(sysctls)
    if compare is None:
        return [base]
    key, values = compare
    return [{**base, key: v} for v in values]


class Lab:
    """One tracer for the whole lab, and the runs."""

    def __init__(self, host: bool, within: float, evidence: Callable[[Event], None] | None = None,
                 engine_name: str = "auto") -> None:
        self.host = host
        self.within = within
        self.evidence = evidence
        self.errors: queue.Queue[CallError | Repeats] = queue.Queue()
        self.tracer = Tracer(list(HOST_PORTS) if host else [PORT], self._sink,
                             engine_name=engine_name, states=False)
        self.stop = threading.Event()

    def _sink(self, ev: Event) -> None:
        if self.evidence is not None and not isinstance(ev, StateChange):
            self.evidence(ev)
        if isinstance(ev, (CallError, Repeats)):
            self.errors.put(ev)

    @contextlib.contextmanager
    def attached(self) -> Iterator[Lab]:
        self.tracer.start()
        poller = threading.Thread(target=self.tracer.run, args=(self.stop,), daemon=True)
        poller.start()
        try:
            yield self
        finally:
            self.stop.set()
            poller.join(timeout=10)
            self.tracer.close()

    def run(self, scenario: str, reuse: str, variant: dict[str, str], tag: str) -> Outcome:
        with Namespace(self.host, tag) as ns:
            for key, value in variant.items():
                ns.set(key, value)
            port = free_port(HOST_PORTS) if self.host else PORT
            waited = wait_for_timewait_room(ns) if self.host else 0.0
            overflows = ns.timewait_overflows()
            truth, pids = SCENARIOS[scenario](ns, port, self.within, reuse)
            overflows = ns.timewait_overflows() - overflows
            in_force = {k: ns.get(k) for k in SHOWN_SYSCTLS}
        time.sleep(0.3 + self.tracer.coalesce_s)  # the last failures and their repeats
        causes: Counter[str] = Counter()
        last_cause: dict[int, str] = {}
        while not self.errors.empty():
            ev = self.errors.get()
            if isinstance(ev, Repeats):  # coalesced: the cause of what they repeat
                if ev.pid in pids:
                    causes[last_cause.get(ev.pid, "unknown")] += ev.count
            elif ev.attempt.pid in pids:
                causes[ev.verdict.cause] += 1
                last_cause[ev.attempt.pid] = ev.verdict.cause
        return Outcome(scenario=scenario_name(scenario, reuse), variant=variant,
                       attempts=truth["attempts"],
                       errnos=truth["errnos"], recovered_s=truth.get("recovered_s"),
                       within_s=self.within, verdicts=dict(causes), sysctls=in_force,
                       detail={**({"connected": truth["ok"]} if "ok" in truth else {}),
                               "tw_overflows": overflows, "waited_s": round(waited, 1)})


def wait_for_timewait_room(ns: Namespace, limit_s: float = TCP_TIMEWAIT_LEN_S + 5) -> float:
    """Seconds waited until this namespace's TIME_WAIT table has room for the
    minisocks a run stages. --host runs share one namespace, and a run that
    churns connections (connect-exhaustion) can fill the table for a minute:
    a full table drops each new TIME_WAIT and FIN_WAIT2 minisock, so the next
    restart would find its port free, a "fix" that is only the previous run's
    doing (net/ipv4/inet_timewait_sock.c: inet_twsk_alloc). Gives up after
    limit_s (every entry will have expired by then) and returns."""
    t0 = time.monotonic()
    said = False
    while time.monotonic() - t0 < limit_s:
        used, limit = ns.timewait_table()
        if used == 0 or used < limit - TIMEWAIT_ROOM:
            break
        if not said:
            print(f"portrace lab: waiting for room in the TIME_WAIT table: {used} of "
                  f"net.ipv4.tcp_max_tw_buckets = {limit} in use (earlier runs' minisocks, "
                  f"gone within {TCP_TIMEWAIT_LEN_S} s)", file=sys.stderr, flush=True)
            said = True
        time.sleep(1)
    return time.monotonic() - t0 if said else 0.0


def judge(first: Outcome, last: Outcome) -> str:
    """fixed: the first failed and the last did not; improved: by
    IMPROVED_MARGIN, fewer failures, or less blocked time (and IMPROVED_MIN_S
    less), or (connect, where the first ran out of ports) more connections
    made in the same time; worse: the same rules the other way round;
    unchanged: none of these."""
    better = _better(first, last)
    if better == "unchanged" and _better(last, first) != "unchanged":
        return "worse"
    return better


def _better(first: Outcome, last: Outcome) -> str:
    if first.failures and not last.failures:
        return "fixed"
    fewer = first.failures > 0 and last.failures <= first.failures * (1 - IMPROVED_MARGIN)
    b0, b1 = first.blocked_s(), last.blocked_s()
    shorter = (b0 is not None and b1 is not None and b1 <= b0 * (1 - IMPROVED_MARGIN)
               and b0 - b1 >= IMPROVED_MIN_S)
    c0, c1 = first.detail.get("connected"), last.detail.get("connected")
    # Only a run that ran out of ports was held back by the kernel; between two
    # that did not, the count measures the machine's speed, not the setting.
    more = (first.failures > 0 and c0 is not None and c1 is not None
            and c1 >= c0 * (1 + IMPROVED_MARGIN) and c1 > c0)
    return "improved" if fewer or shorter or more else "unchanged"


def table(outcomes: list[Outcome], compare_key: str | None) -> str:
    """A comparison table: variant columns, outcome rows."""
    def col(o: Outcome) -> str:
        if compare_key:
            return f"{compare_key.split('.')[-1]}={o.variant.get(compare_key)}"
        return ",".join(f"{k.split('.')[-1]}={v}" for k, v in o.variant.items()) or "as is"

    def restart(o: Outcome) -> str:
        if o.is_connect:
            return f"{o.detail.get('connected', 0)} connected"
        return f"after {o.recovered_s:.1f} s" if o.recovered_s is not None else \
            f"not within {o.within_s:g} s"

    def fails(o: Outcome) -> str:
        return ", ".join(f"{e} x{n}" for e, n in sorted(o.errnos.items())) or "none"

    def verdicts(o: Outcome) -> str:
        return ", ".join(f"{c} x{n}" for c, n in sorted(o.verdicts.items())) or "-"

    def sysctl(key: str) -> Callable[[Outcome], str]:
        return lambda o: o.sysctls.get(key, "?")

    rows: list[tuple[str, Callable[[Outcome], str]]] = [
        ("attempts", lambda o: str(o.attempts)), ("failures", fails),
        ("outcome", restart), ("portrace verdicts", verdicts),
        ("minisocks dropped", lambda o: str(o.detail.get("tw_overflows", "?")))]
    rows += [(k, sysctl(k)) for k in SHOWN_SYSCTLS]
    header = ["", *map(col, outcomes)]
    body = [[name, *(fn(o) for o in outcomes)] for name, fn in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    out = [f"== {outcomes[0].scenario}", line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in body]
    if len(outcomes) > 1:
        out.append(f"-> {judge(outcomes[0], outcomes[-1])} (last variant against the first; "
                   f"improved = {IMPROVED_MARGIN:.0%} fewer failures, {IMPROVED_MARGIN:.0%} and "
                   f"{IMPROVED_MIN_S:g} s less blocked time, or {IMPROVED_MARGIN:.0%} more "
                   "connections made where the first ran out of ports)")
        out += [f"   because {why}" for why in explain(outcomes[0], outcomes[-1])]
    return "\n".join(out)


def load_baseline(path: Path) -> dict[str, Outcome]:
    """Scenario -> the run to judge against: the last run of each scenario in
    an earlier ``lab --json``/``--save`` file. Raises BadBaseline."""
    try:
        runs = json.loads(path.read_text())["runs"]
        outcomes = [Outcome.from_json(r) for r in runs]
    except OSError as exc:
        raise BadBaseline(f"--baseline {path}: {exc.strerror or exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BadBaseline(f"--baseline {path}: not the JSON of portrace lab ({exc})") from None
    return {o.scenario: o for o in outcomes}


def changed_settings(before: Outcome, after: Outcome) -> str:
    """``tcp_fin_timeout=15``: the sysctls in force that differ, short names."""
    keys = sorted(k for k in set(before.sysctls) | set(after.sysctls)
                  if before.sysctls.get(k) != after.sysctls.get(k))
    return ", ".join(f"{k.split('.')[-1]}={after.sysctls.get(k, ABSENT)}" for k in keys) \
        or "no setting changed"


TW_REUSE, FIN_TIMEOUT = "net.ipv4.tcp_tw_reuse", "net.ipv4.tcp_fin_timeout"


def _changed(key: str) -> Callable[[Outcome, Outcome], bool]:
    return lambda b, a: b.sysctls.get(key) != a.sysctls.get(key)


@dataclass(frozen=True)
class Reason:
    """A fact that explains a verdict between two runs of one scenario."""

    rule: str | None  # portrace.judge.diagnose.RULES: its kernel source; None: the lab's own rule
    applies: Callable[[Outcome, Outcome], bool]  # (before, after)
    says: str  # may name {dropped} (minisocks dropped) and {limit} (tcp_max_tw_buckets)


REASONS: tuple[Reason, ...] = (
    Reason("tw_reuse", lambda b, a: not a.is_connect and _changed(TW_REUSE)(b, a),
           "bind() and listen() never read net.ipv4.tcp_tw_reuse; only connect() does"),
    Reason("tw_reuse", lambda b, a: a.is_connect
           and {b.sysctls.get(TW_REUSE), a.sysctls.get(TW_REUSE)} == {"1", "2"},
           "the lab connects over loopback, where tcp_tw_reuse = 2 already lets connect() "
           "take over a TIME_WAIT 4-tuple; 1 adds only other addresses"),
    Reason("timewait_len", lambda b, a: a.scenario.startswith("restart-timewait")
           and _changed(FIN_TIMEOUT)(b, a),
           f"TIME_WAIT lasts {TCP_TIMEWAIT_LEN_S} s whatever net.ipv4.tcp_fin_timeout says"),
    Reason("fin_timeout", lambda b, a: a.scenario == "restart-finwait2"
           and _changed(FIN_TIMEOUT)(b, a),
           "an orphaned FIN_WAIT2 lives net.ipv4.tcp_fin_timeout seconds"),
    Reason("timewait_table", lambda b, a: bool(a.detail.get("tw_overflows")),
           "the TIME_WAIT table was full: the kernel dropped {dropped} TIME_WAIT/FIN_WAIT2 "
           "minisocks (net.ipv4.tcp_max_tw_buckets = {limit})"),
    Reason(None, lambda b, a: a.is_connect and not b.failures and not a.failures,
           "neither run ran out of ephemeral ports, so the connections made measure the "
           "machine's speed, not the setting"),
)


def explain(before: Outcome, after: Outcome) -> list[str]:
    """The REASONS that hold for ``after`` judged against ``before``, each
    with its kernel source."""
    out = []
    for r in REASONS:
        if r.applies(before, after):
            text = r.says.format(dropped=after.detail.get("tw_overflows"),
                                 limit=after.sysctls.get("net.ipv4.tcp_max_tw_buckets", "?"))
            out.append(f"{text} {cite(r.rule)}" if r.rule else text)
    return out


@dataclass
class Judged:
    """A ``portrace lab`` session: its runs, and each scenario judged (fixed,
    improved, unchanged, worse) with the facts behind it, last run against
    first (``--compare``) or against its baseline run (``--baseline``)."""

    runs: list[Outcome] = field(default_factory=list)
    verdicts: dict[str, str] = field(default_factory=dict)
    why: dict[str, list[str]] = field(default_factory=dict)
    changed: str = "no setting changed"  # against a baseline: the settings that differ

    def document(self) -> str:
        """What ``--json`` prints and ``--save`` writes."""
        return json.dumps({"runs": [o.to_json() for o in self.runs], "judged": self.verdicts,
                           "why": self.why}, indent=2)


def run_scenarios(laboratory: Lab, scenarios: list[tuple[str, str]],
                  runs: list[dict[str, str]], baseline: dict[str, Outcome],
                  show: Callable[[list[Outcome]], None] | None = None) -> Judged:
    """Each scenario (name, reuse) once per run's settings, judged; ``show``
    gets each scenario's outcomes as they come."""
    judged = Judged()
    with laboratory.attached():
        for name, reuse in scenarios:
            outcomes = [laboratory.run(name, reuse, v, f"{i}") for i, v in enumerate(runs)]
            judged.runs.extend(outcomes)
            first, last = outcomes[0], outcomes[-1]
            if len(outcomes) > 1:
                judged.verdicts[first.scenario] = judge(first, last)
                judged.why[first.scenario] = explain(first, last)
            if last.scenario in baseline:
                judged.verdicts[last.scenario] = judge(baseline[last.scenario], last)
                judged.why[last.scenario] = explain(baseline[last.scenario], last)
                judged.changed = changed_settings(baseline[last.scenario], last)
            if show is not None:
                show(outcomes)
    return judged


def against_baseline(judged: Judged, path: Path, scenarios: list[tuple[str, str]],
                     baseline: dict[str, Outcome]) -> list[str]:
    """The lines a ``--baseline`` judgement prints: the verdicts, then one
    line per fact behind each."""
    missing = [n for n in (scenario_name(*p) for p in scenarios) if n not in baseline]
    said = ", ".join(f"{s} {v}" for s, v in judged.verdicts.items())
    lines = [f"portrace lab: against {path}: {judged.changed}: {said}"
             + (f"; not in the baseline: {', '.join(missing)}" if missing else "")]
    lines += [f"  {scenario} {judged.verdicts[scenario]}: {fact}"
              for scenario, facts in judged.why.items() for fact in facts]
    return lines


def require(judged: Judged, expect: str | None, baseline: bool) -> None:
    """Raises ExpectationFailed when a verdict is not ``expect``; without
    ``expect``, Worse when a scenario measured worse than its baseline."""
    if expect:
        wrong = {s: v for s, v in judged.verdicts.items() if v != expect}
        if wrong:
            raise ExpectationFailed(
                f"expected {expect}, measured " + ", ".join(f"{s}: {v}" for s, v in wrong.items()))
    elif baseline and "worse" in judged.verdicts.values():
        raise Worse("measured worse than the baseline: " + ", ".join(
            s for s, v in judged.verdicts.items() if v == "worse"))


def free_port(ports: range) -> int:
    """The first port of ``ports`` a plain bind() to 0.0.0.0 gets in this
    namespace: no socket of any state, minisocks included, holds it. Raises
    StagingFailed when none is free."""
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise StagingFailed(f"no free port in {ports.start}-{ports.stop - 1} for a --host run")
