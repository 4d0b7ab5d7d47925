"""`portrace record --metrics` (issue 10): a staged conflict, scraped over
loopback from the running recorder, as a fleet's Prometheus would."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import PORTS, bpf_unavailable, need_root
from prometheus_client.parser import text_string_to_metric_families

from portrace.commands.stage import Staged

METRICS_PORTS = list(range(PORTS[-1] + 41, PORTS[-1] + 45))
SCRAPE_AT = 19290  # the recorder's HTTP endpoint, on loopback


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def wait_sample(port: int, name: str, labels: dict[str, str], value: float,
                timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    key = (name, tuple(sorted(labels.items())))
    while True:
        got = scrape(port)
        if got.get(key) == value or time.monotonic() > deadline:
            assert got.get(key) == value, (key, {k: v for k, v in got.items()
                                                 if k[0].startswith("portrace")})
            return got
        time.sleep(0.2)


def test_conflict_counted_blocked_then_its_window_measured(engine: str, tmp_path: Path):
    need_root()
    port = METRICS_PORTS[0] + (0 if engine == "core" else 1)
    scrape_at = SCRAPE_AT + (0 if engine == "core" else 1)
    rec = subprocess.Popen([sys.executable, "-m", "portrace", "record", "--engine", engine,
                            "--dir", str(tmp_path / "ev"), "--metrics",
                            f"127.0.0.1:{scrape_at}", str(port)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _started(scrape_at):  # the probes are attached: the ready event was seen
            if rec.poll() is not None or time.monotonic() > deadline:
                rec.kill()
                bpf_unavailable(f"record exited {rec.poll()}: {rec.stderr.read()[-800:]}")
            time.sleep(0.2)
        got = scrape(scrape_at)
        assert got[("portrace_probe_startup_seconds", ())] > 0
        assert got[("portrace_engine_info", (("engine", engine), ("kernel", _kernel())))] == 1
        holder = Staged("listen", "127.0.0.1", port, "--hold", name="old-server")
        new = Staged("bind", "127.0.0.1", port, "--hold", name="new-server")
        assert new.info == "EADDRINUSE"
        failure = {"port": str(port), "call": "bind", "errno": "EADDRINUSE",
                   "cause": "listener"}
        got = wait_sample(scrape_at, "portrace_failures_total", failure, 1)
        assert got[("portrace_blocked_ports", ())] == 1
        new.release()
        holder.release()
        time.sleep(0.5)
        Staged("bind", "127.0.0.1", port, name="new-server").release()  # now it binds
        got = wait_sample(scrape_at, "portrace_blocked_ports", {}, 0)
        count = got[("portrace_blocked_window_seconds_count", (("port", str(port)),))]
        total = got[("portrace_blocked_window_seconds_sum", (("port", str(port)),))]
        assert count == 1 and 0.5 <= total < 30
    finally:
        rec.terminate()
        rec.wait(20)
    assert rec.returncode == 0


def _started(port: int) -> bool:
    try:
        return scrape(port).get(("portrace_probe_startup_seconds", ()), 0) > 0
    except OSError:  # not serving yet
        return False


def _kernel() -> str:
    import os

    return os.uname().release


@pytest.mark.parametrize("value", ["9464", "localhost:9464", "127.0.0.1:0", "[::1]:x"])
def test_bad_metrics_address_is_one_line_exit_2(value: str, tmp_path: Path):
    need_root()
    done = subprocess.run([sys.executable, "-m", "portrace", "record", "--dir",
                           str(tmp_path / "ev"), "--metrics", value, "80"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "HOST:PORT" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
