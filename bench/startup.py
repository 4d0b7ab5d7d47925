"""Benchmarks (figures, not pass/fail): run as root with `make bench`.

1. `portrace --json 9090`, 5 runs: seconds from exec to the `ready` line, and
   peak RSS (VmHWM) after one diagnosed failure; medians reported.
2. Lost records: a bind() flood on a watched port against the default ring
   buffer with a normally polling consumer; delivered vs lost.
3. Lookup latency: kernel failure -> sock_diag snapshot (lookup_ms), median.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

from portrace.events import Lost, SocketCall
from portrace.stage import Staged
from portrace.tracer import Tracer

RUNS = 5
PORT = 19290


def vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def startup_and_rss() -> None:
    ready_s, rss_mib, lookup_ms = [], [], []
    for _ in range(RUNS):
        t0 = time.monotonic()
        p = subprocess.Popen([sys.executable, "-m", "portrace", "--json", str(PORT)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert p.stdout is not None
        first = json.loads(p.stdout.readline())
        assert first["type"] == "ready", first
        ready_s.append(time.monotonic() - t0)
        holder = Staged("listen", "127.0.0.1", PORT, "--hold", name="holder")
        Staged("bind", "127.0.0.1", PORT, name="new-server").release()
        ev = json.loads(p.stdout.readline())
        holder.release()
        lookup_ms.append(ev["lookup_ms"])
        rss_mib.append(vm_hwm_kib(p.pid) / 1024)
        p.terminate()
        p.wait(30)
    print(f"start-up to ready: median {statistics.median(ready_s):.2f} s "
          f"(runs: {', '.join(f'{x:.2f}' for x in ready_s)})")
    print(f"peak RSS (VmHWM) after one diagnosed failure: median "
          f"{statistics.median(rss_mib):.1f} MiB (runs: {', '.join(f'{x:.1f}' for x in rss_mib)})")
    print(f"failure -> snapshot (lookup_ms): median {statistics.median(lookup_ms):.1f} ms "
          f"(runs: {', '.join(f'{x:.1f}' for x in lookup_ms)})")


def flood(binds: int, workers: int) -> None:
    seen: list[object] = []
    tracer = Tracer([PORT], seen.append)  # default ring buffer, 64 pages
    tracer.start()
    stop = threading.Event()
    poller = threading.Thread(target=tracer.run, args=(stop,))
    poller.start()
    per = binds // workers
    t0 = time.monotonic()
    pids = []
    for w in range(workers):
        pid = os.fork()
        if pid == 0:  # one loopback address each, or the workers would conflict
            for _ in range(per):
                with socket.socket() as s:
                    s.bind((f"127.0.0.{w + 1}", PORT))
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    elapsed = time.monotonic() - t0
    time.sleep(0.5)
    stop.set()
    poller.join()
    tracer.close()
    delivered = sum(1 for e in seen if isinstance(e, SocketCall))
    lost = sum(e.count for e in seen if isinstance(e, Lost))
    print(f"flood: {per * workers} binds from {workers} processes in {elapsed:.2f} s "
          f"({per * workers / elapsed:,.0f}/s): delivered {delivered}, lost {lost}, "
          f"accounted {delivered + lost}")


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench: run as root (make bench)")
    startup_and_rss()
    flood(20000, 1)
    flood(100000, 2)
