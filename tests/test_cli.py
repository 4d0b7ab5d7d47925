"""Bad input: one line on stderr, a distinct exit code, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need_root

from portrace import errors


def run(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-m", "portrace", *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def assert_one_line_error(r: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("portrace: ")
    for w in words:
        assert w in lines[0]
    assert r.stdout == ""


@pytest.mark.parametrize("port", ["70000", "0", "-1", "http"])
def test_bad_port(port):
    assert_one_line_error(run("--", port) if port == "-1" else run(port), errors.EXIT_USAGE,
                          "error:")


def test_bad_pid():
    assert_one_line_error(run("-p", "999999999", "9090"), errors.EXIT_USAGE, "no process")


def test_not_root():
    # Import first, then become nobody: the checkout may sit in a directory
    # nobody cannot read (CI clones into a 0700 temporary directory).
    drop = ("import os, sys, portrace.cli\n"
            "if os.geteuid() == 0:\n"
            "    os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
            "portrace.cli.main(['9090'])\n")
    r = subprocess.run([sys.executable, "-c", drop], capture_output=True, text=True, timeout=60)
    assert_one_line_error(r, errors.NeedsRoot.exit_code, "root")


def test_root_without_bpf_capabilities(engine):
    need_root()
    r = run("--engine", engine, "9090",
            prefix=("setpriv", "--bounding-set=-all", "--inh-caps=-all"))
    assert_one_line_error(r, errors.BpfUnavailable.exit_code, "CAP_BPF")


def test_no_tracefs(engine):
    need_root()
    r = run("--engine", engine, "9090", env={"PORTRACE_TRACEFS": "/nonexistent/tracing"})
    assert_one_line_error(r, errors.NoTracefs.exit_code, "mount -t tracefs")


def test_kernel_without_a_needed_tracepoint(engine, tmp_path: Path):
    need_root()
    # A tracefs view that has the bind tracepoints but not inet_sock_set_state.
    for tp in ("syscalls/sys_enter_bind", "syscalls/sys_exit_bind"):
        (tmp_path / "events" / tp).mkdir(parents=True)
    r = run("--engine", engine, "9090", env={"PORTRACE_TRACEFS": str(tmp_path)})
    assert_one_line_error(r, errors.MissingTracepoint.exit_code, "sock:inet_sock_set_state")


def test_missing_kernel_headers():
    need_root()
    r = run("--engine", "bcc", "9090", env={"BCC_KERNEL_SOURCE": "/nonexistent/build"})
    assert_one_line_error(r, errors.NoKernelHeaders.exit_code, "kernel headers")


def test_help_lists_exit_codes():
    r = run("--help")
    assert r.returncode == 0
    for code in errors.EXIT_CODES:
        assert f"  {code}  " in r.stdout
