"""Issue 9's figures, side by side with its anchor (main at 1dcb64a, the bcc
engine then), interleaved in one run (figures, not pass/fail; root; part of
`make bench`):

1. A 60 s flood of distinct EADDRINUSE failures on one watched port from
   another uid (nobody): how late a real conflict on a second watched port is
   reported during the flood and after it, and how long SIGTERM takes to end
   portrace during a flood. Latency is measured outside portrace, from the
   failed bind() returning to its event being read, so every version is
   measured the same way.
2. One failure on a port with 10k and 19k established connections (the fd
   limit here is 20000 per process): time to the event and its size.

The anchor runs from a git worktree of 1dcb64a, made here and removed after.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from portrace.commands.stage import Staged

ANCHOR = "1dcb64a"
ROOT = Path(__file__).resolve().parent.parent
NOISY, QUIET, BUSY = 19590, 19591, 19592
FLOOD_S = float(os.environ.get("BENCH_FLOOD_S", "60"))
CROWDS = (10000, 19000)


class Portrace:
    """One `portrace --json` of some version; a thread reads its stdout all
    along, as a terminal or a log shipper would."""

    def __init__(self, src: Path, engine: str | None, ports: list[int]) -> None:
        argv = [sys.executable, "-m", "portrace", "--json", *map(str, ports)]
        if engine:
            argv[3:3] = ["--engine", engine]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONPATH": str(src)})
        self.lines: list[bytes] = []
        self.seen = 0
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.next_event(lambda e: e["type"] == "ready", 180) is not None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()

    def next_event(self, pred: Any, timeout: float) -> tuple[dict[str, Any], int] | None:
        """The first event after the last one returned that matches ``pred``,
        and its size in bytes."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                while self.seen < len(self.lines):
                    line = self.lines[self.seen]
                    self.seen += 1
                    ev = json.loads(line)
                    if pred(ev):
                        return ev, len(line) - 1
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def stop(self) -> float:
        """Seconds from SIGTERM to exit (killed after 120 s)."""
        t0 = time.monotonic()
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return time.monotonic() - t0


def conflict_latency(pt: Portrace, port: int, timeout: float = 120) -> tuple[float, int]:
    """Seconds from a failed bind() to its event, and the event's size."""
    binder = Staged("bind", "127.0.0.1", port, "--hold", name="new-server")
    t0 = time.monotonic()
    got = pt.next_event(lambda e: e["type"] == "bind_error" and e["pid"] == binder.pid, timeout)
    binder.release()
    return (time.monotonic() - t0, got[1]) if got else (float("inf"), 0)


def flood(seconds: float, port: int) -> Staged:
    """Distinct EADDRINUSE failures from uid nobody (portrace.commands.stage's flood role)."""
    return Staged("flood", "127.0.0.1", port, "--uid", "65534", "--within", str(seconds),
                  name="flooder")


def flooded(src: Path, engine: str | None) -> dict[str, float]:
    holders = [Staged("listen", "0.0.0.0", p, "--hold", name="old-server")
               for p in (NOISY, QUIET)]
    try:
        pt = Portrace(src, engine, [NOISY, QUIET])
        noise = flood(FLOOD_S, NOISY)
        time.sleep(FLOOD_S / 2)
        during, _ = conflict_latency(pt, QUIET)
        noise.proc.wait()
        after, _ = conflict_latency(pt, QUIET)
        pt.stop()
        pt = Portrace(src, engine, [NOISY, QUIET])
        noise = flood(30, NOISY)
        time.sleep(10)
        sigterm = pt.stop()
        noise.release()
    finally:
        for h in holders:
            h.release()
    return {"during": during, "after": after, "sigterm": sigterm}


def busy(src: Path, engine: str | None, count: int, port: int) -> tuple[float, int]:
    crowd = Staged("crowd", "127.0.0.1", port, "--count", str(count), name="busy-server",
                   timeout=300)
    try:
        pt = Portrace(src, engine, [port])
        result = conflict_latency(pt, port, timeout=300)
        pt.stop()
    finally:
        crowd.release()
    return result


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="portrace-anchor-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tmp),
                    ANCHOR], check=True)
    versions = [(f"anchor {ANCHOR} (bcc)", tmp / "src", None),
                ("now, core", ROOT / "src", "core"), ("now, bcc", ROOT / "src", "bcc")]
    try:
        print(f"1. a {FLOOD_S:.0f} s flood of distinct EADDRINUSE on one watched port, "
              "from uid nobody")
        print(f"   {'':24} {'conflict during':>16} {'after':>8} {'SIGTERM in a flood':>19}")
        for label, src, engine in versions:
            f = flooded(src, engine)
            print(f"   {label:24} {f['during']:>14.2f} s {f['after']:>6.2f} s "
                  f"{f['sigterm']:>17.2f} s", flush=True)
        print("2. one failure on a port with many established connections: time to the "
              "event, its size")
        port = BUSY
        for count in CROWDS:
            for label, src, engine in versions:
                port += 1  # the last crowd's connections linger in TIME_WAIT
                secs, size = busy(src, engine, count, port)
                print(f"   {count:>6} conns  {label:24} {secs:>8.2f} s {size / 1024:>10.1f} KiB",
                      flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp)],
                       check=False)


if __name__ == "__main__":
    main()
