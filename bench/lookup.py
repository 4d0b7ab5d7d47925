"""Issue 19: failure -> verdict on the CO-RE engine, the iterators' path
(PORTRACE_LOOKUP=iterators, the anchor) beside the port's own bucket and the
binders' fds (the default), interleaved cell by cell in one run (root):
`make bench`.

The port holds one listener (SO_REUSEADDR) and one TIME_WAIT; a process
binds it without SO_REUSEADDR FAILURES times. The grid: TCP sockets in the
namespace (0, 50k: `crowd` processes on other ports) by fds open on the host
(~1k: this machine's own; 500k: HOGS processes holding /dev/null FDS_EACH
times, under the 20000 per-process limit). Then, at 50k sockets and 500k fds:
8k sockets on the port itself; a listener forked into two workers, in a cgroup
of its own (the holders not all the binder's); and a listener that was there
before portrace started (no binder known), in a cgroup of its own.

Each system service or container runs in a cgroup of its own on a systemd or
Kubernetes host; here everything shares the root cgroup, so the hogs and the
staged services are put in cgroups of their own (CGROUPS), as there.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from engines import CROWD_PORT, WATCHED, Portrace, fail_binds, median, p99

from portrace.commands.stage import ScratchNetns, Staged
from portrace.kernel.cgroups import cgroup2_mount

FAILURES = 20
HOGS, FDS_EACH = 26, 19300  # 501,800 fds
PATHS = {"iterators": {"PORTRACE_LOOKUP": "iterators"}, "walk": {"PORTRACE_LOOKUP": "walk"}}
CGROUPS = f"portrace-bench-{os.getpid()}"


@contextlib.contextmanager
def cgroup(name: str) -> Iterator[str]:
    """A v2 cgroup under CGROUPS; yields its cgroup.procs path."""
    mount = cgroup2_mount()
    assert mount is not None, "no cgroup2 mount"
    path = f"{mount}/{CGROUPS}-{name}"
    os.makedirs(path, exist_ok=True)
    try:
        yield f"{path}/cgroup.procs"
    finally:
        for _ in range(100):
            with contextlib.suppress(FileNotFoundError):
                try:
                    os.rmdir(path)
                except OSError:
                    time.sleep(0.1)
                    continue
            break


def join(procs: str, pid: int) -> None:
    with open(procs, "w") as f:
        f.write(str(pid))


@contextlib.contextmanager
def hogs(n: int) -> Iterator[None]:
    """``n`` processes, each holding FDS_EACH fds of /dev/null, in a cgroup of their own."""
    hold = ("import os, sys\n"
            "fd = os.open('/dev/null', os.O_RDONLY)\n"
            f"for i in range(3, {FDS_EACH} + 3):\n"
            "    if i != fd: os.dup2(fd, i)\n"
            "print('ready', flush=True); sys.stdin.readline()\n")
    with cgroup("hogs") as procs:
        ps = [subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True) for _ in range(n)]
        try:
            for p in ps:
                join(procs, p.pid)
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            yield
        finally:
            for p in ps:
                p.kill()
                p.wait()


def host_fds() -> int:
    with open("/proc/sys/fs/file-nr") as f:  # allocated file handles, not fd slots
        handles = int(f.read().split()[0])
    slots = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            slots += len(os.listdir(f"/proc/{pid}/fd"))
    return max(handles, slots)


@contextlib.contextmanager
def crowd(ns: ScratchNetns, sockets: int) -> Iterator[None]:
    crowds = [Staged("crowd", "127.0.0.1", CROWD_PORT + i, "--count", "12500", "--hold",
                     name="crowd", netns=ns, timeout=300) for i in range(sockets // 25000)]
    try:
        yield
    finally:
        for c in crowds:
            c.release(timeout=60)


def blocker(ns: ScratchNetns, kind: str) -> Staged:
    """What holds WATCHED: one TIME_WAIT plus a listener (``listener``), 8k
    connections accepted on it (``crowd``), or a listener forked into two
    workers (``forks``), each in a cgroup of its own when it has a name."""
    if kind == "crowd":
        return Staged("crowd", "127.0.0.1", WATCHED, "--count", "8000", "--reuseaddr",
                      "--hold", name="crowd", netns=ns, timeout=300)
    Staged("timewait", "127.0.0.1", WATCHED, "--reuseaddr", name="old-server",
           netns=ns).release()
    role, args = ("listen-forks", ("--count", "2")) if kind == "forks" else ("listen", ())
    p = Staged(role, "127.0.0.1", WATCHED, "--reuseaddr", *args, "--hold", "--pause",
               name="server", netns=ns, first="paused")
    with open(f"{cgroup2_mount()}/{CGROUPS}-svc/cgroup.procs", "w") as f:
        f.write(str(p.pid))
    p.go()
    return p


def run(ns: ScratchNetns, path: str, kind: str, before: bool = False
        ) -> tuple[list[float], set[str]]:
    """FAILURES failures against ``kind``; their verdict_ms and holder paths."""
    b = blocker(ns, kind) if before else None
    p = Portrace("core", "--coalesce", "0", str(WATCHED), env=PATHS[path])
    try:
        if b is None:
            b = blocker(ns, kind)
        fail_binds(ns, "127.0.0.1", FAILURES)
        p.wait_count("bind_error", FAILURES, 120)
        evs: list[dict[str, Any]] = [e for e in p.events if e["type"] == "bind_error"]
    finally:
        p.stop()
        if b is not None:
            b.release(timeout=60)
    return ([e["verdict_ms"] for e in evs],
            {(e.get("snapshot_source") or {}).get("holders", "?") for e in evs})


def cell(ns: ScratchNetns, label: str, kind: str = "listener", before: bool = False) -> None:
    out = []
    for path in PATHS:  # interleaved: the anchor, then the new path, on the same host
        ms, held = run(ns, path, kind, before)
        out.append(f"{median(ms):>7.1f} / {p99(ms):>6.1f}")
        if path == "walk":
            out.append(",".join(sorted(held)))
    print(f"   {label:34} {out[0]:>16} {out[1]:>16}  {out[2]}")


def main() -> None:
    print(f"5. failure -> verdict (verdict_ms), core, median / p99 of {FAILURES} failures, "
          "by path")
    print(f"   {'sockets in netns, fds on host':34} {'iterators':>16} {'walk':>16}  "
          "holders (walk)   target (walk): median <= 10 ms, p99 <= 20 ms at 50k/500k,")
    print(f"   {'':34} {'':>16} {'':>16}  {'':16} flat within 2 ms across the grid")
    with cgroup("svc"):
        for sockets in (0, 50000):
            with ScratchNetns(f"portrace-bench-lk-{os.getpid()}") as ns, crowd(ns, sockets):
                for fds in ("~1k", "500k"):
                    with contextlib.ExitStack() as stack:
                        if fds == "500k":
                            stack.enter_context(hogs(HOGS))
                        cell(ns, f"{sockets // 1000}k, {fds} (host: {host_fds():,})")
                        if sockets and fds == "500k":
                            cell(ns, "  + forked workers, own cgroup", "forks")
                            cell(ns, "  + listener before portrace", before=True)
                            # Last: its 8k connections leave 8k TIME_WAITs on the
                            # port for 60 s, which a row after it would list too.
                            cell(ns, "  + 8k sockets on the port", "crowd")


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench: run as root (make bench)")
    main()
