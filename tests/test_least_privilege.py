"""portrace without root: uid nobody with only the capabilities the README's
"Least privilege" table documents (portrace.kernel.capabilities), for watch,
check, record and demo on each engine; a clear one-line refusal with none;
and a failure in a namespace portrace may not enter said as such."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import need_root
from test_check import AS_USER

from portrace import errors
from portrace.commands.stage import ScratchNetns, Staged
from portrace.kernel import capabilities

LP_PORTS = list(range(19270, 19280))  # beside test_hostile's, before test_metrics' scrape
NOBODY = 65534
README = Path(__file__).resolve().parent.parent / "README.md"
DEMO = ("CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_DAC_OVERRIDE")  # it makes /run/netns/*
# Nobody with no capability at all: what runs imported as root first (CI's
# clone is closed to other users), then the uid dropped, then portrace's CLI.
AS_NOBODY = AS_USER.format(uid=NOBODY)


def needed(engine: str) -> list[str]:
    return [c.name for c in capabilities.CAPABILITIES if engine in c.required_by]


def as_nobody(caps: list[str], *args: str) -> list[str]:
    """``portrace ARGS`` as uid nobody holding ``caps`` (ambient: kept across
    exec), nothing else. With CAP_DAC_READ_SEARCH it reads the checkout even
    where CI's clone is closed to other users."""
    want = ",".join("+" + c.removeprefix("CAP_").lower() for c in caps)
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            f"--inh-caps=-all,{want}", f"--ambient-caps={want}", f"--bounding-set=-all,{want}",
            sys.executable, "-m", "portrace", *args]


class Watching:
    """``portrace --json`` as nobody; its events as they come."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd="/")
        self.events: list[dict[str, Any]] = []

    def wait(self, kind: str, timeout: float = 60) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            ev = json.loads(line)
            self.events.append(ev)
            if ev["type"] == kind:
                return ev
            if time.monotonic() > deadline:
                break
        self.proc.kill()
        err = self.proc.stderr.read() if self.proc.stderr else ""
        raise AssertionError(f"no {kind} event; portrace said: {err[-600:]}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


@contextlib.contextmanager
def conflict(port: int, netns: ScratchNetns | None = None) -> Iterator[int]:
    """A listener on 127.0.0.1:port and a bind() that fails on it, both held
    for the body (bcc reads the failing thread's namespace through it);
    yields the listener's pid."""
    holder = Staged("listen", "127.0.0.1", port, "--hold", name="holder", netns=netns)
    try:
        b = Staged("bind", "127.0.0.1", port, "--hold", name="deploy", netns=netns)
        try:
            assert b.info == "EADDRINUSE", b.info
            yield holder.pid
        finally:
            b.release()
    finally:
        holder.release()


def test_watch_as_nobody_with_the_documented_capabilities(engine):
    need_root()
    port = LP_PORTS[0] if engine == "core" else LP_PORTS[1]
    w = Watching(as_nobody(needed(engine), "--json", "--engine", engine, str(port)))
    try:
        ready = w.wait("ready")
        assert "CAP_SYS_ADMIN" in ready["left_out"], ready["left_out"]
        with conflict(port) as holder:
            ev = w.wait("bind_error")
    finally:
        w.stop()
    [b] = ev["blockers"]
    assert [p["pid"] for p in b["processes"]] == [holder], b
    assert ev["verdict"]["cause"] == "listener"


def test_without_cap_sys_admin_another_namespace_is_said_closed():
    need_root()
    port = LP_PORTS[2]
    w = Watching(as_nobody(needed("core"), "--json", "--engine", "core", str(port)))
    try:
        w.wait("ready")
        with ScratchNetns(f"portrace-lp-{os.getpid()}") as ns, conflict(port, netns=ns):
            ev = w.wait("bind_error")
    finally:
        w.stop()
    assert ev["netns"]["source"] == "closed" and ev["blockers"] == []
    assert ev["verdict"]["cause"] == "unknown"
    assert f"`portrace check --pid {ev['pid']} {port}`" in ev["verdict"]["advice"][0]


def test_check_with_sock_diag_as_nobody_without_any_capability():
    """`check --engine sock_diag` reads portrace's own namespace over
    sock_diag, which asks no capability; the holders' fds need ptrace."""
    need_root()
    port = LP_PORTS[6]
    holder = Staged("listen", "127.0.0.1", port, "--hold", name="holder")
    try:
        done = subprocess.run([sys.executable, "-c", AS_NOBODY, "check", "--json", "--engine",
                               "sock_diag", "--addr", "127.0.0.1", str(port)],
                              capture_output=True, text=True, timeout=60, cwd="/")
    finally:
        holder.release()
    assert done.returncode == errors.ExitStatus.BLOCKED, done.stderr
    [ans] = [json.loads(line) for line in done.stdout.splitlines()]
    assert ans["engine"] == "sock_diag" and ans["blockers"][0]["state"] == "LISTEN", ans


def test_check_as_nobody():
    need_root()
    port = LP_PORTS[3]
    holder = Staged("listen", "127.0.0.1", port, "--hold", name="holder")
    try:
        done = subprocess.run(as_nobody(needed("core"), "check", "--json", "--engine", "core",
                                        "--addr", "127.0.0.1", str(port)),
                              capture_output=True, text=True, timeout=60, cwd="/")
    finally:
        holder.release()
    assert done.returncode == errors.ExitStatus.BLOCKED, done.stderr
    [ans] = [json.loads(line) for line in done.stdout.splitlines()]
    assert ans["engine"] == "core"
    assert [p["pid"] for p in ans["blockers"][0]["processes"]] == [holder.pid]


def test_record_as_nobody(engine):
    need_root()
    port = LP_PORTS[4] if engine == "core" else LP_PORTS[5]
    evidence = Path(tempfile.mkdtemp(prefix="portrace-lp-"))
    os.chown(evidence, NOBODY, NOBODY)
    w = Watching(as_nobody(needed(engine), "record", "--engine", engine, "--dir",
                           str(evidence), str(port)))
    try:
        deadline = time.monotonic() + 60
        while not any('"type":"ready"' in f.read_text() for f in evidence.glob("*.jsonl")):
            assert time.monotonic() < deadline, "the recorder never got ready"
            time.sleep(0.2)
        with conflict(port):
            time.sleep(1.5)
    finally:
        w.stop()
    lines = [json.loads(line) for f in evidence.glob("*.jsonl") for line in f.open()]
    assert any(e["type"] == "bind_error" and e["port"] == port for e in lines), lines[-3:]
    for f in evidence.iterdir():
        f.unlink()
    evidence.rmdir()


def test_demo_as_nobody_with_its_capabilities(engine):
    need_root()
    done = subprocess.run(as_nobody(needed(engine) + list(DEMO), "demo", "--engine", engine),
                          capture_output=True, text=True, timeout=300, cwd="/")
    assert done.returncode == 0, done.stderr[-800:] + done.stdout[-800:]
    assert "2 of 2 staged conflicts diagnosed" in done.stdout


def test_without_any_capability_one_line_names_them():
    need_root()
    done = subprocess.run([sys.executable, "-c", AS_NOBODY, "--engine", "core", "9090"],
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == errors.ExitStatus.NEEDS_ROOT, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("portrace: without CAP_BPF CAP_PERFMON CAP_DAC_READ_SEARCH"), line


def test_one_capability_short_names_it():
    need_root()
    caps = [c for c in needed("core") if c != "CAP_PERFMON"]
    done = subprocess.run(as_nobody(caps, "--engine", "core", "9090"), capture_output=True,
                          text=True, timeout=60, cwd="/")
    assert done.returncode == errors.ExitStatus.NEEDS_ROOT, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("portrace: without CAP_PERFMON (to "), line


def test_the_readme_table_names_each_capability():
    text = README.read_text().split("## Least privilege", 1)[1].split("\n## ", 1)[0]
    for c in capabilities.CAPABILITIES:
        assert f"`{c.name}`" in text, c.name
    for c in DEMO:
        assert f"`{c}`" in text, c
