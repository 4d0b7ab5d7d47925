"""Recorder soak (figures, not pass/fail; root): `portrace record` on one port
for DURATION seconds with a failed bind() every INTERVAL seconds. Prints the
recorder's CPU time and share, RSS, the evidence size and bytes per failure.

    sudo .venv/bin/python bench/recorder.py [DURATION_S] [INTERVAL_S]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from portrace.commands.stage import Staged
from portrace.events import to_json
from portrace.output.evidence import read

PORT = 19390
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def mem_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def main(duration: float, interval: float) -> None:
    d = Path(tempfile.mkdtemp(prefix="portrace-soak-")) / "evidence"
    rec = subprocess.Popen([sys.executable, "-m", "portrace", "record", "--dir", str(d),
                            str(PORT)], stderr=subprocess.PIPE, text=True)
    assert rec.stderr is not None
    rec.stderr.readline()  # "recording into ..." once the probes are attached
    holder = Staged("listen", "127.0.0.1", PORT, "--hold", name="holder")
    cpu0, t0 = cpu_s(rec.pid), time.monotonic()
    failures = 0
    try:
        while time.monotonic() - t0 < duration:
            Staged("bind", "127.0.0.1", PORT, name="new-server").release()
            failures += 1
            time.sleep(interval)
        elapsed = time.monotonic() - t0
        cpu = cpu_s(rec.pid) - cpu0
        rss, hwm = mem_kib(rec.pid, "VmRSS:"), mem_kib(rec.pid, "VmHWM:")
    finally:
        holder.release()
        rec.terminate()
        rec.wait(30)
    events = [to_json(e) for e in read([d])]
    errors = [e for e in events if e["type"] == "bind_error" and e["port"] == PORT]
    # bind(0) failures anywhere on the host are recorded too (ephemeral exhaustion).
    others = sum(1 for e in events if e["type"].endswith("_error")) - len(errors)
    size = sum(f.stat().st_size for f in d.iterdir())
    per = sum(len(json.dumps(e, separators=(",", ":"))) + 1 for e in errors) / max(1, len(errors))
    print(f"recorder soak: {elapsed:.0f} s, {failures} failed binds staged, "
          f"{len(errors)} recorded on port {PORT} (+{others} other failures on the host)")
    print(f"CPU: {cpu:.2f} s over {elapsed:.0f} s = {100 * cpu / elapsed:.2f} % of one core "
          f"({1000 * cpu / max(1, failures):.1f} ms per failure)")
    print(f"RSS at end: {rss / 1024:.1f} MiB (peak {hwm / 1024:.1f} MiB, compiler included)")
    print(f"evidence: {size} bytes on disk; {per:.0f} bytes per bind_error event on average")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 600,
         float(sys.argv[2]) if len(sys.argv) > 2 else 2.0)
