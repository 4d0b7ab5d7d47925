"""portrace as root on a host in trouble: planted symlinks, hostile names,
floods from other users, a closed pipe, a full disk, malformed evidence and
signals at awkward moments, each staged for real. Outcomes, not timings
(those are in `make bench`)."""

from __future__ import annotations

import gzip
import json
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import contract
import pytest
from conftest import TracerProcess, bpf_unavailable, need_root
from test_cli import assert_one_line_error, run

from portrace import errors
from portrace.commands.stage import Staged

NOBODY = 65534
# Ports of their own: these tests run their own portrace processes.
_PORTS = iter(range(19200, 19260))
HOSTILE = "<i>\x1b[31m\n- kill"  # 15 bytes: all of a comm


def fresh_port() -> int:
    return next(_PORTS)


def started(ports: list[int], engine: str, *extra: str) -> TracerProcess:
    need_root()
    t = TracerProcess(ports, extra=list(extra), engine=engine)
    if t.wait_for(lambda e: e["type"] == "ready", timeout=120) is None:
        code, err = t.stop()
        bpf_unavailable(f"portrace exited {code}: {err.strip()[-500:]}")
    return t


def ready_json(engine: str, port: int) -> subprocess.Popen[bytes]:
    """`portrace --json PORT` past its ready line, its pipes left to the test."""
    need_root()
    proc = subprocess.Popen([sys.executable, "-m", "portrace", "--json", "--engine", engine,
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    if not proc.stdout.readline():
        bpf_unavailable(proc.stderr.read().decode() if proc.stderr else "")
    return proc


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A world-writable sticky directory, like /tmp, where nobody plants links."""
    d = Path(tempfile.mkdtemp(prefix="portrace-shared-", dir="/tmp"))
    d.chmod(0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_nobody(*argv: str) -> None:
    subprocess.run(argv, check=True, user=NOBODY, group=NOBODY, extra_groups=[])


def conflict(tracer: TracerProcess, port: int, timeout: float = 20) -> dict | None:
    """A new-server's bind() on 127.0.0.1:port fails; it stays until portrace
    reports it (bcc finds the namespace through the living process)."""
    binder = Staged("bind", "127.0.0.1", port, "--hold", name="new-server")
    assert binder.info == "EADDRINUSE", binder.info
    try:
        return tracer.wait_for(lambda e: e["type"] == "bind_error" and e["pid"] == binder.pid,
                               timeout=timeout)
    finally:
        binder.release()


# -- where portrace writes ---------------------------------------------------

def test_no_write_through_a_symlink_another_user_planted(shared_dir: Path, tmp_path: Path):
    need_root()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = shared_dir / "out.jsonl"
    as_nobody("ln", "-s", str(victim), str(link))
    evidence = tmp_path / "ev.jsonl"
    evidence.write_text(json.dumps({"type": "ready", "ts": "2026-11-30T10:00:00.000000Z",
                                    "kernel": "6.18", "ports": [], "host": {}}) + "\n")

    assert_one_line_error(run("-o", str(link), "9090"), errors.UnsafePath.exit_code,
                          "symbolic link")
    assert_one_line_error(run("report", str(evidence), "-o", str(link)),
                          errors.UnsafePath.exit_code, "symbolic link")
    assert victim.read_text() == "precious\n"

    dir_link = shared_dir / "evidence"
    as_nobody("ln", "-s", str(tmp_path), str(dir_link))
    tmp_path.chmod(0o755)
    assert_one_line_error(run("record", "--dir", str(dir_link), "9090"),
                          errors.UnsafePath.exit_code, "symbolic link")
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755  # not chmodded through the link
    assert not (tmp_path / ".portrace.lock").exists()
    theirs = shared_dir / "theirs"
    as_nobody("mkdir", "-m", "0755", str(theirs))
    assert_one_line_error(run("record", "--dir", str(theirs), "9090"),
                          errors.UnsafePath.exit_code, "uid 65534")
    assert list(theirs.iterdir()) == []

    new = shared_dir / "report.txt"
    r = run("report", str(evidence), "-o", str(new))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(new.stat().st_mode) == 0o600


def test_two_recorders_cannot_share_a_directory(engine: str, tmp_path: Path):
    need_root()
    port = fresh_port()
    first = subprocess.Popen([sys.executable, "-m", "portrace", "record", "--engine", engine,
                              "--dir", str(tmp_path / "ev"), str(port)],
                             stderr=subprocess.PIPE, text=True)
    try:
        assert first.stderr is not None
        line = first.stderr.readline()
        if "recording into" not in line:
            bpf_unavailable(line)
        second = run("record", "--engine", engine, "--dir", str(tmp_path / "ev"), str(port))
        assert_one_line_error(second, errors.EvidenceBusy.exit_code, "another portrace")
    finally:
        first.terminate()
        assert first.wait(20) == 0


# -- names are data ----------------------------------------------------------

def test_hostile_names_are_escaped_on_screen_and_in_reports(engine: str, tmp_path: Path):
    need_root()
    port = fresh_port()
    out = tmp_path / "ev.jsonl"
    tracer = subprocess.Popen([sys.executable, "-m", "portrace", "--engine", engine, "-o",
                               str(out), str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert tracer.stdout is not None
    if "watching" not in tracer.stdout.readline():
        tracer.kill()
        bpf_unavailable(tracer.stderr.read() if tracer.stderr else "")
    holder = Staged("listen", "127.0.0.1", port, "--hold", name=HOSTILE)
    binder = Staged("bind", "127.0.0.1", port, name=HOSTILE)
    binder.release()
    lines = []
    for line in tracer.stdout:
        lines.append(line)
        if line.startswith("  cause:"):
            break
    holder.release()
    tracer.terminate()
    rest, err = tracer.communicate(timeout=20)
    screen = "".join(lines) + rest
    assert tracer.returncode == 0 and "Traceback" not in err, err
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    escaped = "<i>\\x1b[31m\\n- kill"
    assert escaped in screen, screen
    assert "\x1b" not in screen and not any(ln.startswith("- kill") for ln in screen.splitlines())

    for fmt in ("terminal", "markdown", "html"):
        r = run("report", str(out), "--format", fmt)
        assert r.returncode == 0, r.stderr
        assert "\x1b" not in r.stdout
        assert not any(ln.startswith("- kill") for ln in r.stdout.splitlines()), r.stdout
        if fmt == "terminal":
            assert escaped in r.stdout
        else:
            assert "&lt;i&gt;" in r.stdout and "<i>" not in r.stdout, r.stdout


# -- floods, pipes, full disks -----------------------------------------------

def flood(port: int, seconds: float, *args: str) -> Staged:
    """Failing binds from uid nobody (portrace.commands.stage's flood role)."""
    return Staged("flood", "127.0.0.1", port, "--uid", str(NOBODY), "--within", str(seconds),
                  *args, name="flooder")


def test_an_unprivileged_einval_flood_does_not_blind_a_watched_port(engine: str):
    port = fresh_port()
    tracer = started([port], engine, "--json")
    holder = Staged("listen", "0.0.0.0", port, "--hold", name="old-server")
    noise = flood(port, 8, "--einval")
    try:
        time.sleep(1)
        for _ in range(5):
            ev = conflict(tracer, port)
            assert ev is not None and ev["verdict"]["cause"] == "listener", ev
    finally:
        noise.release()
        holder.release()
        code, err = tracer.stop()
    assert code == 0 and "Traceback" not in err, err
    assert not [e for e in tracer.events if e.get("errno") == "EINVAL"]


def test_under_a_flood_a_real_conflict_is_reported_and_sigterm_is_honoured(engine: str):
    noisy, quiet = fresh_port(), fresh_port()
    tracer = started([noisy, quiet], engine, "--json")
    holders = [Staged("listen", "0.0.0.0", p, "--hold", name="old-server")
               for p in (noisy, quiet)]
    noise = flood(noisy, 60)
    try:
        time.sleep(3)  # a backlog of distinct failures builds up
        ev = conflict(tracer, quiet)
        lost = [e for e in tracer.events if e["type"] in ("lost", "error")]
        assert ev is not None, f"the quiet port's conflict was not reported: {lost}"
        assert ev["verdict"]["cause"] == "listener"
        limited = tracer.wait_for(lambda e: e["type"] == "lost" and e["source"] == "limit",
                                  timeout=3)
        assert limited is not None, "the flood's excess was not counted as lost"
        t0 = time.monotonic()
        tracer.proc.terminate()
        tracer.proc.wait(10)  # 51 s before this issue; `make bench` has the figure
        assert time.monotonic() - t0 < 10
    finally:
        noise.release()
        for h in holders:
            h.release()
        code, err = tracer.stop()
    assert code == 0 and "Traceback" not in err, err
    flooded = [e for e in tracer.events if e["type"] in ("bind_error", "repeats")
               and e["port"] == noisy]
    assert flooded, "the flood itself was not reported at all"
    for e in tracer.events:
        contract.check(e)


def test_sigterm_is_honoured_when_nobody_reads_stdout(engine: str):
    """A reader that stops reading (a stuck log shipper) fills the pipe; the
    write blocks, but the drain and the signal must not wait for it."""
    port = fresh_port()
    proc = ready_json(engine, port)
    holder = Staged("listen", "0.0.0.0", port, "--hold", name="old-server")
    noise = flood(port, 30)
    try:
        time.sleep(5)  # far more than a pipe's 64 KiB of events, never read
        proc.terminate()
        proc.wait(10)
    finally:
        noise.release()
        holder.release()
        proc.kill()
    assert proc.returncode == 0, proc.returncode


def test_a_closed_pipe_ends_portrace_cleanly(engine: str):
    port = fresh_port()
    proc = ready_json(engine, port)
    proc.stdout.close()  # `| head -1`
    holder = Staged("listen", "127.0.0.1", port, "--hold", name="old-server")
    try:
        binder = Staged("bind", "127.0.0.1", port, "--hold", name="new-server")
        proc.wait(20)
        binder.release()
    finally:
        holder.release()
        proc.kill()
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert proc.returncode == 0, (proc.returncode, err)
    assert "Traceback" not in err and "Exception" not in err, err


def test_a_full_disk_on_the_output_file_is_reported_not_fatal(engine: str):
    port = fresh_port()
    tracer = started([port], engine, "--json", "-o", "/dev/full")
    holder = Staged("listen", "127.0.0.1", port, "--hold", name="old-server")
    try:
        assert conflict(tracer, port) is not None
        error = tracer.wait_for(lambda e: e["type"] == "error")
        assert error is not None and error["where"] == "output /dev/full", tracer.events
        assert "No space left" in error["message"] and error["count"] >= 1
    finally:
        holder.release()
        code, err = tracer.stop()
    assert code == 0 and "Traceback" not in err, err
    assert "cannot write to /dev/full" in err
    for e in tracer.events:
        contract.check(e)


def test_a_port_with_10k_connections_gives_a_bounded_event(engine: str):
    port = fresh_port()
    tracer = started([port], engine, "--json")
    crowd = Staged("crowd", "127.0.0.1", port, "--count", "10000", name="busy-server",
                   timeout=120)
    try:
        ev = conflict(tracer, port, timeout=120)
    finally:
        crowd.release()
        code, err = tracer.stop()
    assert ev is not None and code == 0, err
    assert ev["verdict"]["cause"] == "listener"
    assert ev["blockers"][0]["state"] == "LISTEN"
    assert len(ev["blockers"]) <= 32 and ev["blockers_total"] >= 10001
    assert ev["blockers_by_state"]["ESTABLISHED"] >= 10000
    assert len(json.dumps(ev)) < 1024 * 1024


def test_many_ports_fit_the_watched_map(engine: str):
    ports = list(range(30000, 31100))  # more than bcc's default 1024-entry map
    tracer = started(ports, engine, "--json")
    code, err = tracer.stop()
    assert code == 0 and "Traceback" not in err, err


def test_ctrl_c_during_start_up_exits_at_once():
    need_root()  # bcc compiles for seconds: the window to interrupt
    proc = subprocess.Popen([sys.executable, "-m", "portrace", "--engine", "bcc",
                             str(fresh_port())], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=5)
    assert proc.returncode == -signal.SIGINT, (proc.returncode, err)  # a shell says 130
    assert "watching" not in out and "Traceback" not in err


def test_stdout_closed_is_one_line():
    r = subprocess.run(f"{sys.executable} -m portrace 9090 >&-", shell=True,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == errors.OutputFailed.exit_code, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "standard output is closed" in r.stderr


# -- hostile evidence ----------------------------------------------------------

GOOD = {"type": "bind_error", "ts": "2026-11-30T10:00:01.000000Z", "pid": 7, "comm": "srv",
        "addr": "0.0.0.0", "port": 9090, "errno": "EADDRINUSE", "sysctls": {}, "process": None,
        "blockers": [{"state": "LISTEN", "local": {"addr": "0.0.0.0", "port": 9090},
                      "remote": None, "processes": [{"pid": 5, "comm": "old"}],
                      "expires_s": None, "closed_by": None}],
        "verdict": {"cause": "listener", "summary": "held", "advice": ["kill 5"]}}


def test_malformed_evidence_is_skipped_with_warnings(tmp_path: Path):
    bad = [
        {k: v for k, v in GOOD.items() if k != "port"},
        {**GOOD, "ts": 1764496801},
        {**GOOD, "ts": "2026-11-30T10:00:01"},
        {**GOOD, "blockers": None},
        {k: v for k, v in GOOD.items() if k != "verdict"},
        {**GOOD, "port": "<script>alert(1)</script>"},
        {**GOOD, "verdict": {"cause": "listener", "summary": "x", "advice": []}},
    ]
    plain = tmp_path / "portrace-a.jsonl"
    plain.write_text("".join(json.dumps(e) + "\n" for e in [GOOD, *bad]))
    huge = tmp_path / "portrace-b.jsonl.gz"
    with gzip.open(huge, "wb") as f:
        f.write(b'{"type": "lost", "pad": "' + b"x" * (9 * 1024 * 1024) + b'"}\n')
        f.write((json.dumps({**GOOD, "ts": "2026-11-30T10:00:02.000000Z"}) + "\n").encode())
    cut = tmp_path / "portrace-c.jsonl.gz"
    data = gzip.compress((json.dumps({**GOOD, "ts": "2026-11-30T10:00:03.000000Z"}) + "\n")
                         .encode() * 200)
    cut.write_bytes(data[: len(data) // 2])
    for fmt in ("terminal", "markdown", "html", "json"):
        r = run("report", str(tmp_path), "--format", fmt)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert "skipped 6 events with a missing or mistyped field" in r.stderr, r.stderr
        assert "lines over" in r.stderr and "truncated gzip" in r.stderr, r.stderr
        assert "<script>" not in r.stdout
    r = run("report", str(tmp_path), "--format", "json")
    windows = json.loads(r.stdout)["ports"]["9090"]
    assert windows[0]["attempts"] >= 3  # the good ones of each file


def test_report_to_a_full_disk_is_one_line(tmp_path: Path):
    ev = tmp_path / "ev.jsonl"
    ev.write_text(json.dumps(GOOD) + "\n")
    assert_one_line_error(run("report", str(ev), "-o", "/dev/full"),
                          errors.OutputFailed.exit_code, "No space left")


# -- lab input and signals -----------------------------------------------------

@pytest.mark.parametrize(("args", "words"), [
    (["--within", "nan"], "finite"),
    (["--compare", "net.//.kernel.hostname=a,b"], "not a net.* sysctl"),
    (["--sysctl", "net.ipv4..tcp_fin_timeout=30"], "not a net.* sysctl"),
    (["--sysctl", "kernel.hostname=x"], "net.KEY=VALUE"),
])
def test_lab_refuses_bad_input_before_running(args: list[str], words: str):
    assert_one_line_error(run("lab", "restart-finwait2", *args), errors.ExitStatus.USAGE, words)


def test_lab_evidence_in_an_impossible_place_is_one_line():
    assert_one_line_error(run("lab", "restart-finwait2", "--evidence", "/proc/1/nope"),
                          errors.UnsafePath.exit_code, "cannot make")


def test_lab_checks_sysctl_values_before_the_first_run():
    need_root()
    r = run("lab", "restart-finwait2", "--compare", "net.ipv4.tcp_fin_timeout=30,banana")
    assert_one_line_error(r, errors.ExitStatus.USAGE, "banana", "refused")
    r = run("lab", "restart-finwait2", "--sysctl", "net.ipv4.no_such_thing=1")
    assert_one_line_error(r, errors.ExitStatus.USAGE, "no such")


def _lab_netns(pid: int) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if f"portrace-lab-{pid}-" in ln]


@pytest.mark.parametrize(("signum", "host"), [(signal.SIGTERM, True), (signal.SIGHUP, False)])
def test_lab_cleans_up_on_sigterm_and_sighup(signum: int, host: bool):
    """--host: the changed sysctl is restored; else the namespaces are gone.
    (--host runs once: its scenario leaves a FIN_WAIT2 on the host's port.)"""
    need_root()
    fin = Path("/proc/sys/net/ipv4/tcp_fin_timeout")
    before = fin.read_text()
    argv = (["--host", "--yes", "--sysctl", "net.ipv4.tcp_fin_timeout=37", "restart-finwait2"]
            if host else ["restart-timewait"])
    lab = subprocess.Popen([sys.executable, "-m", "portrace", "lab", *argv],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and lab.poll() is None:
        if fin.read_text() != before if host else _lab_netns(lab.pid):
            break
        time.sleep(0.05)
    assert lab.poll() is None, lab.communicate()[1]
    lab.send_signal(signum)
    _, err = lab.communicate(timeout=30)
    assert "Traceback" not in err, err
    assert fin.read_text() == before
    assert _lab_netns(lab.pid) == []
