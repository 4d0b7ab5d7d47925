"""Postmortem evidence: a real recorded restart and its report, rotation,
crash safety, bad evidence, the HTML in a real browser, the systemd unit."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import IN_CI, need_root

from portrace.commands.stage import ScratchNetns, Staged
from portrace.events import Lost, to_json
from portrace.output.evidence import EvidenceDir, ReadReport, read

ROOT = Path(__file__).resolve().parents[1]
PORT = 19178


def evidence(d: Path, seen: ReadReport | None = None) -> list[dict[str, Any]]:
    """The events read back from an evidence directory, as JSON objects."""
    return [to_json(e) for e in read([d], seen)]


def portrace(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "portrace", *args], capture_output=True,
                          text=True, timeout=120, **kw)


@pytest.fixture(scope="module")
def restart(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Record a restart that fails twice on the old server's TIME_WAIT and
    succeeds once the TIME_WAIT socket is destroyed with ss -K."""
    need_root()
    d = tmp_path_factory.mktemp("record") / "evidence"
    rec = subprocess.Popen([sys.executable, "-m", "portrace", "record", "--dir", str(d),
                            str(PORT)], stderr=subprocess.PIPE, text=True)
    assert rec.stderr is not None
    line = rec.stderr.readline()
    if "recording into" not in line:
        rec.kill()
        pytest.fail(f"portrace record did not start: {line}{rec.stderr.read()[-500:]}")
    with ScratchNetns(f"portrace-rec-{os.getpid()}") as ns:
        old = Staged("timewait", "127.0.0.1", PORT, name="old-server", netns=ns)
        old.release()
        new = Staged("retry", "127.0.0.1", PORT, name="new-server", netns=ns)
        results = [new.info]
        time.sleep(0.2)
        results.append(new.go())
        time.sleep(0.2)
        subprocess.run(["ip", "netns", "exec", ns.name, "ss", "-K", "state", "time-wait",
                        "src", f"127.0.0.1:{PORT}"], capture_output=True, check=False)
        results.append(new.go())
        new.release()
    time.sleep(0.3)
    rec.send_signal(signal.SIGTERM)
    assert rec.wait(30) == 0
    return {"dir": d, "results": results, "old": old.pid, "new": new.pid}


def test_recorded_restart_report_shows_the_blocked_window(restart):
    assert restart["results"] == ["EADDRINUSE", "EADDRINUSE", "ok ok"]
    r = portrace("report", str(restart["dir"]), "--format", "json")
    assert r.returncode == 0, r.stderr
    [w] = json.loads(r.stdout)["ports"][str(PORT)]
    assert w["attempts"] == 2 and w["recovered"] is True
    assert w["causes"] == {"time_wait": 2}
    assert 0 < w["blocked_s"] < 10
    assert w["recovered_by"]["pid"] == restart["new"] and w["recovered_by"]["type"] == "bind"
    [b] = w["blockers"]
    assert b["state"] == "TIME_WAIT" and b["closed_by"]["pid"] == restart["old"]
    [p] = [p for p in w["processes"] if p["pid"] == restart["new"]]
    assert re.fullmatch(r"[0-9a-f]{40}", p["build_id"]) and p["exe"]
    assert p["ppids"] and "retry" in p["cmdline"] and str(PORT) in p["cmdline"]


def test_evidence_is_root_only_and_starts_with_ready(restart):
    d = restart["dir"]
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    files = list(d.iterdir())
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    first = evidence(d)[0]
    assert first["type"] == "ready" and first["options"]["command"] == "record"
    assert first["options"]["ports"] == [PORT] and first["host"]["hostname"]
    errors = [e for e in evidence(d) if e["type"] == "bind_error"]
    assert all(e["sysctls"]["net.ipv4.tcp_tw_reuse"] for e in errors)
    assert all(e["host"]["kernel"] == os.uname().release for e in errors)


def test_terminal_and_markdown_reports(restart):
    text = portrace("report", str(restart["dir"])).stdout
    assert f"port {PORT}: 1 blocked window" in text and "2 failed attempts" in text
    assert "recovered by new-server" in text and "cause: time_wait x2" in text
    md = portrace("report", str(restart["dir"]), "--format", "markdown").stdout
    assert md.startswith("# portrace postmortem") and f"## port {PORT}" in md


def test_since_until_filter(restart):
    later = datetime.now(timezone.utc).isoformat()
    r = portrace("report", str(restart["dir"]), "--since", later, "--format", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["ports"] == {}


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if IN_CI:
            pytest.fail("chromium is not installed: make setup installs it")
        pytest.skip("chromium not installed (make setup installs it)")
    return path


def test_html_report_renders_its_timeline_in_chromium(restart, tmp_path):
    browser = chromium()
    page = tmp_path / "postmortem.html"
    r = portrace("report", str(restart["dir"]), "--format", "html", "-o", str(page))
    assert r.returncode == 0, r.stderr
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-500:]
    # What the browser built, not the file: the timeline and its marks exist.
    svg = re.search(rf'<svg class="timeline" data-port="{PORT}".*?</svg>', dom.stdout, re.S)
    assert svg is not None, "no timeline for the port in the rendered page"
    assert len(re.findall(r'class="mark failure"', svg.group(0))) == 2
    assert re.search(r'class="mark success"', svg.group(0))
    assert re.search(r'class="mark window" x="[\d.]+" y="10" width="([\d.]+)"', svg.group(0))
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, "--window-size=1100,700", f"--screenshot={shot}",
                    page.as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000  # a drawn page, not a blank one


def _lost(n: int) -> Lost:
    return Lost(ts=datetime.now(timezone.utc), count=n + 1)


def _flood(d: Path, keep: int, events: int = 5000, max_bytes: int = 4096) -> None:
    writer = EvidenceDir(d, max_bytes=max_bytes, keep=keep)
    for n in range(events):
        writer(_lost(n))
    writer.close()


def test_rotation_under_a_flood_keeps_every_event_and_the_bound(tmp_path):
    d = tmp_path / "ev"
    _flood(d, keep=1000)
    got = [e["count"] for e in evidence(d)]
    assert got == list(range(1, 5001))
    segs = sorted(d.glob("portrace-*"))
    assert len(segs) > 10 and all(s.name.endswith(".jsonl.gz") for s in segs[:-1])
    for s in segs[:-1]:
        assert len(gzip.decompress(s.read_bytes())) <= 4096


def test_rotation_keeps_only_the_newest_segments(tmp_path):
    d = tmp_path / "ev"
    _flood(d, keep=3)
    assert len(list(d.glob("*.jsonl.gz"))) == 3 and len(list(d.glob("*.jsonl"))) == 1
    got = [e["count"] for e in evidence(d)]
    assert got == list(range(got[0], 5001))  # a contiguous tail, ending at the last


WRITER = """
import sys
from datetime import datetime, timezone
from portrace.output.evidence import EvidenceDir
from portrace.events import Lost
w = EvidenceDir(sys.argv[1], max_bytes=65536, keep=1000)
n = 0
while True:
    n += 1
    w(Lost(ts=datetime.now(timezone.utc), count=n))
    print(n, flush=True)
"""


def test_killed_writer_loses_no_finished_event(tmp_path):
    d = tmp_path / "ev"
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(d)], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout is not None
    last = 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        last = int(p.stdout.readline())
    p.kill()  # SIGKILL: no cleanup at all
    p.wait()
    got = [e["count"] for e in evidence(d)]
    assert len(got) >= last and got[:last] == list(range(1, last + 1))
    # A restart compresses what the dead run left and carries on.
    EvidenceDir(d, max_bytes=65536, keep=1000).close()
    assert len(evidence(d)) == len(got)


def test_torn_and_corrupt_lines_are_skipped_with_a_warning(tmp_path):
    d = tmp_path / "ev"
    writer = EvidenceDir(d)
    for n in range(3):
        writer(_lost(n))
    writer.close()
    [seg] = d.glob("*.jsonl")
    text = seg.read_text().splitlines(keepends=True)
    seg.write_text(text[0] + "{not json\n" + "".join(text[1:]) + '{"type":"lost","ts":"2026')
    seen = ReadReport()
    assert [e["count"] for e in evidence(d, seen)] == [1, 2, 3]
    assert len(seen.torn) == 1 and len(seen.corrupt) == 1
    r = portrace("report", str(d))
    assert r.returncode == 0
    assert "torn last line" in r.stderr and "unreadable line" in r.stderr


def _report_fails(path: Path, *words: str) -> None:
    r = portrace("report", str(path))
    assert r.returncode == 10, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0]


def test_empty_directory_is_a_clear_error(tmp_path):
    _report_fails(tmp_path, "no evidence files")


def test_a_file_that_is_not_evidence_is_a_clear_error(tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("hello\nworld\n")
    _report_fails(other, "is not portrace evidence")
    json_lines = tmp_path / "other.jsonl"
    json_lines.write_text('{"a": 1}\n{"type": "something else", "ts": 0}\n')
    _report_fails(json_lines, "is not portrace evidence")
    fake = tmp_path / "x.jsonl.gz"
    fake.write_text("plain text, not gzip")
    _report_fails(fake, "not gzip data")
    _report_fails(tmp_path / "missing", "no such file")


def test_systemd_unit_verifies(tmp_path):
    if shutil.which("systemd-analyze") is None:
        if IN_CI:
            pytest.fail("systemd-analyze missing: make setup installs systemd")
        pytest.skip("systemd-analyze not installed")
    unit = (ROOT / "systemd" / "portrace-record.service").read_text()
    exe = Path(sys.executable).with_name("portrace")
    assert "/opt/portrace/.venv/bin/portrace" in unit
    local = tmp_path / "portrace-record.service"
    local.write_text(unit.replace("/opt/portrace/.venv/bin/portrace", str(exe)))
    r = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "error" not in r.stderr.lower(), r.stderr
    for needed in ("ProtectSystem=strict", "CapabilityBoundingSet=CAP_BPF CAP_PERFMON",
                   "StateDirectory=portrace"):
        assert needed in unit
