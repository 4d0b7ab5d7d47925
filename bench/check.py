"""Issue 10's figures: `portrace check` wall time, whole process (Python start,
engine load, lookup, verdict), beside `ss -tanp 'sport = :P'` on the same
sockets, interleaved, median of RUNS (figures, not pass/fail; root; part of
`make bench`):

1. a port held only by a TIME_WAIT, in a throwaway netns (the target: < 0.5 s,
   with the seconds left);
2. a port with CROWD established connections (the fd limit here is 20000 per
   process, and the crowd holds one end of each).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from portrace.commands.stage import ScratchNetns, Staged

RUNS = 7
TIME_WAIT_PORT, CROWD_PORT = 19690, 19691
CROWD = 19000
TARGET_S = 0.5


def timed(argv: list[str]) -> tuple[float, str]:
    start = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True)
    return time.monotonic() - start, done.stdout


def compare(label: str, port: int, netns: str | None, addr: str) -> None:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    where = ["--netns", netns] if netns else []
    commands = {
        f"portrace check ({engine})": [sys.executable, "-m", "portrace", "check", "--json",
                                       "--engine", engine, "--addr", addr, *where, str(port)]
        for engine in ("core", "sock_diag")}
    commands["ss -tanp 'sport = :P'"] = [*prefix, "ss", "-tanp", f"sport = :{port}"]
    times: dict[str, list[float]] = {name: [] for name in commands}
    answers: dict[str, str] = {}
    for _ in range(RUNS):
        for name, argv in commands.items():
            secs, out = timed(argv)
            times[name].append(secs)
            if name.startswith("portrace"):
                ans = json.loads(out.splitlines()[0])
                b = ans["blockers"][0] if ans["blockers"] else None
                left = f", {b['expires_s']:.1f} s left" if b and b["expires_s"] else ""
                answers[name] = (f"{'free' if ans['free'] else 'blocked'}, "
                                 f"{ans['blockers_total']} blockers{left}")
    print(label)
    for name, xs in times.items():
        med = statistics.median(xs)
        note = f"   {answers[name]}" if name in answers else ""
        print(f"   {name:28} {med:>7.3f} s (min {min(xs):.3f}){note}", flush=True)


def main() -> None:
    print(f"portrace check vs ss, whole-process wall time, median of {RUNS}, interleaved")
    with ScratchNetns("portrace-bench-check") as ns:
        Staged("timewait", "127.0.0.1", TIME_WAIT_PORT, name="old-server",
               netns=ns).release()
        compare(f"1. a TIME_WAIT only (target < {TARGET_S} s)", TIME_WAIT_PORT, ns.name,
                "0.0.0.0")
    crowd = Staged("crowd", "127.0.0.1", CROWD_PORT, "--count", str(CROWD),
                   name="busy-server", timeout=300)
    try:
        compare(f"2. {CROWD} established connections on the port", CROWD_PORT, None,
                "127.0.0.1")
    finally:
        crowd.release()


if __name__ == "__main__":
    main()
