"""Both engines side by side, with bcc's tcpstates (-L) as the anchor, in one
run, interleaved (figures, not pass/fail; root): `make bench`.

1. start-up to `ready` (median of RUNS) and peak RSS after one diagnosed
   failure, per engine; tcpstates: to its header line.
2. churn ratio, traced / untraced connections per second (bench/churn, a C
   client and server, in a throwaway netns), median of REPS interleaved
   pairs: (a) a watched port the churn does not use, (b) the churn's own port
   watched, (c) all ports; with the records lost. Beside it, the same ratio
   of host CPU time per connection (all CPUs' busy time, the tracer's
   included), which is less noisy on a 2-CPU VM than the rate, and each CO-RE
   program's own run time per connection (kernel.bpf_stats_enabled, which
   adds a little itself).
3. failure -> verdict (``verdict_ms``: kernel timestamp to the finished event,
   process facts included), median and p99 over FAILURES failures, with 0, 20k
   and 50k TCP sockets in the namespace, beside `ss -tanp 'sport = :P'` there.
4. the same for a bind() refused before any socket counts (EACCES by the port
   rule, EPERM by a cgroup bind4 program returning 0, EADDRNOTAVAIL for an
   address in DAD), beside an EADDRINUSE on the same run. (A seccomp
   filter's EPERM has no row: seccomp refuses before the sys_enter
   tracepoint, so no engine sees that bind().)

Issue 8's targets for the CO-RE engine are printed beside the figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from portrace.commands.stage import ScratchNetns, Staged, refusing_cgroup
from portrace.kernel.cgroups import cgroup2_mount

RUNS = 5
REPS = int(os.environ.get("BENCH_REPS", "3"))
CHURN_S = float(os.environ.get("BENCH_CHURN_S", "3"))
FAILURES = 50
WATCHED, CHURN_PORT, CROWD_PORT = 19490, 19491, 19492
ENGINES = ("core", "bcc")
TCPSTATES = shutil.which("tcpstates-bpfcc") or "/usr/share/bcc/tools/tcpstates"
CHURN = Path(__file__).resolve().parent / "churn"  # make bench/churn
# make test-objects: cgroup bind4 programs that refuse (tests/bpf/refuse_bind.bpf.c)
REFUSE_OBJ = Path(__file__).resolve().parent.parent / "tests" / "bpf" / "refuse_bind.bpf.o"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def p99(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(len(xs) * 0.99))] if xs else float("nan")


CORE_PROGRAMS = ("bind_enter", "bind_exit", "listen_enter", "listen_exit", "connect_enter",
                 "connect_exit", "set_state")


def core_bpf_ns() -> dict[str, int]:
    """Run time of each CO-RE program so far (kernel.bpf_stats_enabled), by name."""
    out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True)
    if out.returncode:
        return {}
    found: dict[str, int] = {}
    for p in json.loads(out.stdout):
        if p.get("name") in CORE_PROGRAMS:
            found[p["name"]] = found.get(p["name"], 0) + p.get("run_time_ns", 0)
    return found


def bpf_stats(on: bool) -> None:
    subprocess.run(["sysctl", "-qw", f"kernel.bpf_stats_enabled={int(on)}"], check=False)


def busy_s() -> float:
    """CPU seconds all CPUs spent not idle so far (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def vm_hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Portrace:
    """`portrace --json ...` as a child; JSON lines read in the background."""

    def __init__(self, engine: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "portrace", "--json", "--engine", engine, *args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, **(env or {})})
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self.wait(lambda e: e["type"] == "ready", 120)
        assert ready is not None, f"portrace --engine {engine} did not get ready"
        self.ready_s = time.monotonic() - self.t0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cond:
                self.events.append(json.loads(line))
                self.cond.notify_all()

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float,
             start: int = 0) -> dict[str, Any] | None:
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                found = next((e for e in self.events[start:] if pred(e)), None)
                if found or time.monotonic() > end:
                    return found
                self.cond.wait(0.1)

    def wait_count(self, kind: str, n: int, timeout: float) -> None:
        """Until ``n`` failures of ``kind`` are accounted for: each reported
        one, and each a ``repeats`` event counted (a failure that came while
        the last was being diagnosed is counted, not diagnosed again, even
        with --coalesce 0)."""
        end = time.monotonic() + timeout
        with self.cond:
            while self._accounted(kind) < n and time.monotonic() < end:
                self.cond.wait(0.1)

    def _accounted(self, kind: str) -> int:
        return sum(1 if e["type"] == kind else e["count"] if e["type"] == "repeats" else 0
                   for e in self.events)

    def lost(self) -> int:
        with self.cond:
            return sum(e["count"] for e in self.events if e["type"] == "lost")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class TcpStates:
    """bcc's tcpstates -L PORT, until its header line (it has attached)."""

    def __init__(self, port: int) -> None:
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([TCPSTATES, "-L", str(port)], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        self.proc.stdout.readline()
        self.ready_s = time.monotonic() - self.t0
        # Drain what it prints, as a terminal would.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def startup() -> None:
    print("1. start-up to ready (median of 5) and peak RSS after one diagnosed failure")
    ready: dict[str, list[float]] = {e: [] for e in (*ENGINES, "tcpstates")}
    rss: dict[str, list[float]] = {e: [] for e in (*ENGINES, "tcpstates")}
    for _ in range(RUNS):  # interleaved: core, bcc, tcpstates, core, ...
        for engine in ENGINES:
            p = Portrace(engine, str(WATCHED))
            holder = Staged("listen", "127.0.0.1", WATCHED, "--hold", name="holder")
            Staged("bind", "127.0.0.1", WATCHED, name="new-server").release()
            p.wait(lambda e: e["type"] == "bind_error", 30)
            holder.release()
            ready[engine].append(p.ready_s)
            rss[engine].append(vm_hwm_mib(p.proc.pid))
            p.stop()
        if os.path.exists(TCPSTATES):
            t = TcpStates(WATCHED)
            ready["tcpstates"].append(t.ready_s)
            rss["tcpstates"].append(vm_hwm_mib(t.proc.pid))
            t.stop()
    print(f"   {'':12} {'ready (s)':>10} {'peak RSS (MiB)':>15}   target (core)")
    for name in ready:
        target = "<= 0.3 s, <= 40 MiB" if name == "core" else ""
        print(f"   {name:12} {median(ready[name]):>10.2f} {median(rss[name]):>15.1f}   {target}")


def churn_ratios(ns: ScratchNetns) -> None:
    print(f"2. churn, traced / untraced connections per second (median of {REPS} "
          f"interleaved pairs, {CHURN_S:.0f} s each)")

    def run_churn() -> tuple[float, float]:
        """(connections per second, host CPU seconds per connection)."""
        busy0 = busy_s()
        r = subprocess.run(["ip", "netns", "exec", ns.name, str(CHURN),
                            str(CHURN_PORT), str(CHURN_S)], capture_output=True, text=True)
        rate = float(r.stdout.strip() or 0)
        return rate, (busy_s() - busy0) / max(1.0, rate * CHURN_S)

    cases: list[tuple[str, list[str], str]] = [
        ("(a) idle watched port", [str(WATCHED)], ">= 0.97x"),
        ("(b) churn's port watched", [str(CHURN_PORT)], ">= 0.90x"),
        ("(c) all ports", [], ">= 0.95x"),
    ]
    print("   rate ratio (CPU-per-connection ratio: host busy time, all CPUs)")
    bpf_ns: dict[str, list[float]] = {}
    print(f"   {'':26} {'core':>24} {'bcc':>24} {'tcpstates -L':>24}   target (core)")
    for title, args, target in cases:
        cells = []
        for tracer in (*ENGINES, "tcpstates"):
            if tracer == "tcpstates" and (not args or not os.path.exists(TCPSTATES)):
                cells.append(f"{'-':>24}")
                continue
            ratios, cpu, lost = [], [], 0
            for _ in range(REPS):
                base, base_cost = run_churn()
                if tracer == "tcpstates":
                    t: Any = TcpStates(int(args[0]))
                else:
                    t = Portrace(tracer, *args)
                if tracer == "core":
                    bpf_stats(True)  # only here: it costs every program run a little
                traced, traced_cost = run_churn()
                if tracer == "core":
                    bpf_stats(False)
                    for name, ns_run in core_bpf_ns().items():
                        bpf_ns.setdefault(name, []).append(ns_run / max(1.0, traced * CHURN_S))
                if tracer != "tcpstates":
                    lost += t.lost()
                t.stop()
                ratios.append(traced / base if base else 0.0)
                cpu.append(base_cost / traced_cost if traced_cost else 0.0)
            lost_txt = f" lost {lost}" if tracer != "tcpstates" else ""
            cells.append(f"{median(ratios):.2f}x ({median(cpu):.2f}x){lost_txt}".rjust(24))
        print(f"   {title:26} {' '.join(cells)}   {target}, 0 lost")
        own = ", ".join(f"{name} {median(v):.0f}" for name, v in sorted(bpf_ns.items())
                        if median(v) >= 1)
        total = sum(median(v) for v in bpf_ns.values())
        print(f"   {'':26} core's programs, ns of BPF per connection: {total:.0f} ({own})")
        bpf_ns.clear()


def fail_binds(ns: ScratchNetns, addr: str, n: int, setup: str = "",
               pass_fds: tuple[int, ...] = ()) -> None:
    """``n`` bind()s of addr:WATCHED in ``ns``, 50 ms apart, each expected to
    fail; ``setup``: Python run first in the same process, which inherits
    ``pass_fds``."""
    family = "socket.AF_INET6" if ":" in addr else "socket.AF_INET"
    loop = (f"import socket, time\n{setup}"
            f"for _ in range({n}):\n"
            f"    s = socket.socket({family})\n"
            f"    try: s.bind(('{addr}', {WATCHED}))\n"
            "    except OSError: pass\n"
            "    s.close(); time.sleep(0.05)\n")
    subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-c", loop],
                   pass_fds=pass_fds)


def latency() -> None:
    print(f"3. failure -> verdict (verdict_ms), median / p99 of {FAILURES} failures, "
          "by TCP sockets in the namespace")
    print(f"   {'sockets':>8} {'core':>18} {'bcc':>18} {'ss -tanp sport':>16}   target (core)")
    for n in (0, 20000, 50000):
        with ScratchNetns(f"portrace-bench-{os.getpid()}-{n}") as ns:
            crowds = [Staged("crowd", "127.0.0.1", CROWD_PORT + i, "--count", "12500", "--hold",
                             name="crowd", netns=ns, timeout=300)
                      for i in range(n // 25000)]
            if n == 20000:
                crowds.append(Staged("crowd", "127.0.0.1", CROWD_PORT, "--count", "10000",
                                     "--hold", name="crowd", netns=ns, timeout=300))
            holder = Staged("listen", "127.0.0.1", WATCHED, "--hold", name="holder", netns=ns)
            cells = []
            for engine in ENGINES:
                p = Portrace(engine, "--coalesce", "0", str(WATCHED))
                fail_binds(ns, "127.0.0.1", FAILURES)
                p.wait_count("bind_error", FAILURES, 120)
                ms = [e["verdict_ms"] for e in p.events if e["type"] == "bind_error"]
                p.stop()
                cells.append(f"{median(ms):>8.1f} / {p99(ms):>6.1f}")
            ss = []
            for _ in range(5):
                t0 = time.monotonic()
                subprocess.run(["ip", "netns", "exec", ns.name, "ss", "-tanp",
                                f"sport = :{WATCHED}"], capture_output=True)
                ss.append((time.monotonic() - t0) * 1000)
            holder.release()
            for c in crowds:
                c.release(timeout=60)
            target = "median <= 15 ms, p99 <= 50 ms" if n == 50000 else ""
            print(f"   {n:>8} {cells[0]:>18} {cells[1]:>18} {median(ss):>13.1f} ms   {target}")


REFUSALS = 20  # failures per cause in part 4


def refusals() -> None:
    """Issue 18's causes beside a conflict, on one run: each engine, each cause
    staged in a throwaway netns and failed REFUSALS times."""
    print(f"4. failure -> verdict (verdict_ms) by cause, median / p99 of {REFUSALS} failures")
    print(f"   {'cause':>20} {'core':>18} {'bcc':>18}   {'target (core)':17} "
          "verdict.cause seen (core, bcc)")
    # setup: Python run by the failing process before its first socket.
    setups = {
        "EADDRINUSE": ("", "127.0.0.1"),
        "EACCES": ("import os; os.setgroups([]); os.setgid(65534); os.setuid(65534)\n",
                   "127.0.0.1"),
        # Into the refusing cgroup through an fd the bench opened: `ip netns
        # exec` mounts a sysfs of the netns's own, without the cgroup2 mount.
        "EPERM": ("import os; os.write(int(os.environ['CGROUP_PROCS_FD']), b'%d' % os.getpid())\n",
                  "127.0.0.1"),
        "EADDRNOTAVAIL (DAD)": ("", "2001:db8::9"),
    }
    for cause, (setup, addr) in setups.items():
        with contextlib.ExitStack() as stack:
            ns = stack.enter_context(ScratchNetns(f"portrace-bench-refuse-{os.getpid()}"))
            inherit: tuple[int, ...] = ()
            if cause == "EADDRINUSE":
                holder = Staged("listen", "127.0.0.1", WATCHED, "--hold", name="holder",
                                netns=ns)
                stack.callback(holder.release)
            if cause == "EACCES":
                ns.sysctl("net.ipv4.ip_unprivileged_port_start", str(WATCHED + 1))
            if cause == "EPERM":
                cgroup = stack.enter_context(refusing_cgroup(
                    REFUSE_OBJ, "refuse_eperm", f"portrace-bench-{os.getpid()}"))
                procs = os.open(f"{cgroup2_mount()}{cgroup}/cgroup.procs", os.O_WRONLY)
                stack.callback(os.close, procs)
                os.environ["CGROUP_PROCS_FD"], inherit = str(procs), (procs,)
            if cause.startswith("EADDRNOTAVAIL"):
                ns.ip("link", "add", "va", "type", "veth", "peer", "name", "vb")
                ns.ip("link", "set", "vb", "up")
                ns.sysctl("net.ipv6.conf.va.dad_transmits", "100")  # tentative for 100 s
                ns.ip("link", "set", "va", "up")
                ns.ip("-6", "addr", "add", f"{addr}/64", "dev", "va")
            cells, seen = [], []
            for engine in ENGINES:
                p = Portrace(engine, "--coalesce", "0", str(WATCHED))
                fail_binds(ns, addr, REFUSALS, setup, inherit)
                p.wait_count("bind_error", REFUSALS, 120)
                errors = [e for e in p.events if e["type"] == "bind_error"]
                p.stop()
                ms = [e["verdict_ms"] for e in errors]
                cells.append(f"{median(ms):>8.1f} / {p99(ms):>6.1f}" if ms else f"{'-':>17}")
                seen.append("+".join(sorted({e["verdict"]["cause"] for e in errors})) or "-")
            target = "median <= 10 ms" if cause != "EADDRINUSE" else "(the anchor)"
            print(f"   {cause:>20} {cells[0]:>18} {cells[1]:>18}   {target:17} {', '.join(seen)}")

if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench: run as root (make bench)")
    print(f"portrace bench, kernel {os.uname().release}, {os.cpu_count()} CPUs\n")
    startup()
    with ScratchNetns(f"portrace-churn-{os.getpid()}") as churn_ns:
        churn_ratios(churn_ns)
    latency()
    refusals()
