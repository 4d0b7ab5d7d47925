"""Bad input: one line on stderr, a distinct exit code, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need_root

from portrace import errors
from portrace.kernel import header

ROOT = Path(__file__).resolve().parents[1]


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


INTERRUPT_AT_CLICK = """
import os, signal, sys

class InterruptAtClick:
    def find_spec(self, name, path=None, target=None):
        if name == "click":
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, InterruptAtClick())
"""


def test_ctrl_c_while_the_cli_loads_exits_130_quietly(tmp_path: Path):
    """Ctrl-C inside the CLI's imports (a real SIGINT, sent by the process to
    itself as click starts to load): exit 130, nothing printed, as the
    installed command."""
    (tmp_path / "sitecustomize.py").write_text(INTERRUPT_AT_CLICK)
    r = subprocess.run([str(Path(sys.executable).with_name("portrace")), "--help"],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert (r.returncode, r.stderr, r.stdout) == (errors.ExitStatus.INTERRUPTED, "", "")


@pytest.mark.parametrize("port", ["70000", "0", "-1", "http"])
def test_bad_port(port):
    assert_one_line_error(run("--", port) if port == "-1" else run(port), errors.ExitStatus.USAGE,
                          "error:")


def test_bad_pid():
    assert_one_line_error(run("-p", "999999999", "9090"), errors.ExitStatus.USAGE, "no process")


def test_not_root():
    # Import first, then become nobody: the checkout may sit in a directory
    # nobody cannot read (CI clones into a 0700 temporary directory).
    drop = ("import os, sys, portrace.commands.cli\n"
            "if os.geteuid() == 0:\n"
            "    os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
            "portrace.commands.cli.main(['9090'])\n")
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


@pytest.mark.parametrize("case, words", [
    ("missing directory", ("No such file or directory",)),
    ("a directory", ("Is a directory",)),
    ("a symlink", ("is a symbolic link",)),
])
def test_an_output_that_cannot_be_opened(case, words, tmp_path: Path):
    """Exit 15 covers every output portrace will not or cannot open (the exit
    table says so), and its one line says which case it is."""
    path = {"missing directory": tmp_path / "nope" / "x", "a directory": tmp_path,
            "a symlink": tmp_path / "link"}[case]
    (tmp_path / "link").symlink_to(tmp_path / "target")
    r = run("-o", str(path), "9090")
    assert_one_line_error(r, errors.UnsafePath.exit_code, str(path), *words)
    assert "missing" in errors.EXIT_TEXT[errors.ExitStatus.UNSAFE_PATH]


def test_one_exit_status_table_in_help_and_readme():
    """ExitStatus is the one table: each status is explained once, listed by
    --help and named in the README's exit-status paragraph."""
    assert set(errors.EXIT_TEXT) == set(errors.ExitStatus)
    r = run("--help")
    assert r.returncode == 0
    readme = (ROOT / "README.md").read_text()
    for status in errors.ExitStatus:
        assert f"{int(status):>3}  {errors.EXIT_TEXT[status]}" in r.stdout
        assert f"`{int(status)}`" in readme, status


def _ready_of(*args: str, env: dict[str, str]) -> dict:
    """Start `portrace --json ARGS`, return its ready event, stop it."""
    import json
    import signal

    p = subprocess.Popen([sys.executable, "-m", "portrace", "--json", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **env})
    assert p.stdout is not None
    line = p.stdout.readline()
    p.send_signal(signal.SIGTERM)
    p.wait(30)
    assert line, p.stderr.read() if p.stderr else ""
    return json.loads(line)


@pytest.mark.parametrize(("env", "code", "words", "reason"), [
    ({"PORTRACE_KERNEL_BTF": "/nonexistent/vmlinux"}, errors.NoKernelBtf.exit_code,
     ("no kernel BTF",), "no kernel BTF"),
    ({"PORTRACE_LIBBPF": "/nonexistent/libbpf.so.1"}, errors.NoLibbpf.exit_code,
     ("libbpf.so.1 not found", "libbpf1"), "not found"),
], ids=["no-btf", "no-libbpf"])
def test_core_preflight_and_auto_fallback(env, code, words, reason):
    """--engine core fails in one line with its own code; auto falls back to
    bcc and says why in `ready`."""
    need_root()
    assert_one_line_error(run("--engine", "core", "9090", env=env), code, *words)
    ready = _ready_of("9090", env=env)
    assert ready["engine"] == "bcc" and reason in ready["engine_reason"]


def core_object_env(tmp_path: Path, source: str) -> dict[str, str]:
    """A CO-RE object built from ``source`` (beside bpf/), as the environment
    that makes portrace load it."""
    src, obj = tmp_path / "variant.bpf.c", tmp_path / "variant.bpf.o"
    src.write_text(source)
    subprocess.run(["clang", "-g", "-O2", "-target", "bpf", "-mcpu=v3",
                    f"-I{header.bpf_dir()}", "-c", str(src), "-o", str(obj)], check=True)
    return {"PORTRACE_CORE_OBJECT": str(obj)}


def test_core_object_the_verifier_refuses(tmp_path: Path):
    """An object whose load the verifier refuses: --engine core exits 14 with
    one line and the verifier's words in the log; auto falls back to bcc."""
    need_root()
    env = core_object_env(tmp_path, '#include "core.bpf.c"\n'
                                    'SEC("tracepoint/syscalls/sys_enter_bind")\n'
                                    'int broken(void *ctx) { return *(volatile int *)0; }\n')
    r = run("--engine", "core", "9090", env=env)
    assert_one_line_error(r, errors.CoreLoadFailed.exit_code, "refused", "/run/portrace/")
    log = Path("/run/portrace/verifier.log").read_text()
    assert "invalid mem access" in log or "R1" in log, log[-2000:]
    ready = _ready_of("9090", env=env)
    assert ready["engine"] == "bcc" and "refused" in ready["engine_reason"]


def test_core_object_of_another_build(tmp_path: Path):
    """An object that loads but lacks a type this portrace reads (its event
    struct renamed, as another version's portrace.h would): --engine core
    exits 14 with one line; auto falls back to bcc and says why."""
    need_root()
    env = core_object_env(tmp_path, '#define pt_event pt_event_of_another_build\n'
                                    '#include "core.bpf.c"\n')
    r = run("--engine", "core", "9090", env=env)
    assert_one_line_error(r, errors.CoreLoadFailed.exit_code, "does not match", "pt_event")
    ready = _ready_of("9090", env=env)
    assert ready["engine"] == "bcc" and "does not match" in ready["engine_reason"], ready


def test_demo_runs_on_core_without_kernel_headers():
    """`portrace demo` on the default engine needs no kernel headers."""
    need_root()
    r = run("demo", "--port", "19550", env={"BCC_KERNEL_SOURCE": "/nonexistent/build"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "portrace demo: engine core (kernel BTF at" in r.stdout
    assert "portrace demo: 2 of 2 staged conflicts diagnosed" in r.stdout
