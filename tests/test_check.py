"""`portrace check` answers before the next failure (issue 10): staged real
sockets in a scratch namespace, and the answer held against a real bind()."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import contract
import pytest
from conftest import IN_CI, PORTS, need_root

from portrace.commands.stage import ScratchNetns, Staged

CHECK_PORTS = list(range(PORTS[-1] + 21, PORTS[-1] + 31))
LOOKERS = ("core", "sock_diag")
NOBODY = 65534


@pytest.fixture(params=LOOKERS)
def looker(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def scratch() -> Iterator[ScratchNetns]:
    need_root()
    with ScratchNetns(f"portrace-ck-{os.getpid()}") as ns:
        yield ns


AS_USER = ("import os, sys, pyroute2, portrace.commands.check, portrace.commands.cli; "
           "os.setgroups([]); "
           "os.setgid({uid}); os.setuid({uid}); sys.path.remove('') if '' in sys.path else None; "
           "portrace.commands.cli.main(sys.argv[1:])")


def check(*args: str, uid: int | None = None, timeout: float = 60,
          env: dict[str, str] | None = None) -> tuple[int, list[dict[str, Any]], str]:
    """Run `portrace check --json ARGS` (as ``uid``, with ``env`` added):
    exit code, one answer per port, stderr."""
    argv = [sys.executable, "-m", "portrace", "check", "--json", *args]
    if uid is not None:
        # Imports as root, then the user's uid before anything runs: CI's clone
        # (and its venv) may be closed to other users, and a real user's venv is not.
        argv = [sys.executable, "-c", AS_USER.format(uid=uid), "check", "--json", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd="/")
    if "--engine" in args and "core" in args and done.returncode in (6, 12, 13, 14) and IN_CI:
        pytest.fail(f"the CO-RE engine did not load in CI: {done.stderr}")
    assert "Traceback" not in done.stderr, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    for ans in answers:
        contract.check(ans)
    return done.returncode, answers, done.stderr


def binds(scratch: ScratchNetns, port: int, *args: str) -> str:
    """What a real bind() of 0.0.0.0:port answers in the namespace now."""
    b = Staged("bind", "0.0.0.0", port, *args, name="new-server", netns=scratch)
    b.release()
    return b.info


def test_time_wait_named_then_destroyed_with_the_printed_command(looker, scratch):
    port = CHECK_PORTS[0]
    old = Staged("timewait", "127.0.0.1", port, name="old-server", netns=scratch)
    old.release()
    code, [ans], _ = check("--engine", looker, "--netns", scratch.name, str(port))
    assert code == 1 and ans["free"] is False and ans["engine"] == looker
    [tw] = ans["blockers"]
    assert tw["state"] == "TIME_WAIT" and tw["remote"]["port"] == int(old.info)
    assert 50 < tw["expires_s"] <= 60
    assert ans["verdict"]["cause"] == "time_wait" and ans["can_destroy"] is True
    if looker == "core":  # the minisock's own flag, read from the kernel
        assert tw["options"]["so_reuseaddr"] is False and tw["options"]["source"] == "kernel"
    assert binds(scratch, port) == "EADDRINUSE"  # the answer matches the kernel's
    [cmd] = re.findall(r"`([^`]*ss -K[^`]*)`", ans["verdict"]["advice"][0])
    assert cmd.startswith(f"ip netns exec {scratch.name} ss -K state time-wait src ")
    subprocess.run(shlex.split(cmd), check=True, capture_output=True)
    code, [ans], _ = check("--engine", looker, "--netns", scratch.name, str(port))
    assert code == 0 and ans["free"] is True and ans["blockers"] == []
    assert binds(scratch, port) == "ok"


@pytest.mark.parametrize("old_on", [False, True], ids=["old-plain", "old-reuseaddr"])
@pytest.mark.parametrize("new_on", [False, True], ids=["new-plain", "new-reuseaddr"])
def test_answer_agrees_with_a_real_bind(looker, scratch, old_on, new_on):
    """Exact where the engine reads the minisock's flag; never 'free' wrongly."""
    port = CHECK_PORTS[1]
    flag = ["--reuseaddr"] if old_on else []
    Staged("timewait", "127.0.0.1", port, *flag, name="old-server", netns=scratch).release()
    new = ["--reuseaddr"] if new_on else []
    code, [ans], _ = check("--engine", looker, "--netns", scratch.name, *new, str(port))
    real = binds(scratch, port, *new)
    assert real in ("ok", "EADDRINUSE")
    if ans["free"]:
        assert real == "ok" and code == 0
    if looker == "core":
        assert ans["free"] is (real == "ok")
    elif not ans["free"]:  # sock_diag cannot read the old flag: blocked unless sure
        assert code == 1 and (real == "EADDRINUSE" or ans["blockers"][0]["conflicts"] is None)


def test_wait_returns_when_the_holder_exits_and_says_for_what(looker, scratch):
    port = CHECK_PORTS[2]
    holder = Staged("listen", "0.0.0.0", port, "--hold", name="old-server", netns=scratch)
    threading.Timer(1.5, holder.release).start()
    code, [ans], err = check("--engine", looker, "--netns", scratch.name, "--wait",
                             "--timeout", "30", str(port))
    assert code == 0 and ans["free"] is True
    assert 1.0 < ans["waited_s"] < 30
    [waited] = ans["waited_for"]
    assert waited.startswith(f"LISTEN 0.0.0.0:{port}") and f"old-server[{holder.pid}]" in waited
    assert binds(scratch, port) == "ok"


def test_wait_gives_up_at_the_timeout(looker, scratch):
    port = CHECK_PORTS[3]
    holder = Staged("listen", "0.0.0.0", port, "--hold", name="old-server", netns=scratch)
    try:
        code, [ans], _ = check("--engine", looker, "--netns", scratch.name, "--wait",
                               "--timeout", "1", str(port))
    finally:
        holder.release()
    assert code == 1 and ans["free"] is False and ans["waited_s"] >= 1.0
    assert ans["verdict"]["cause"] == "listener"
    assert [p["pid"] for p in ans["blockers"][0]["processes"]] == [holder.pid]
    assert f"kill {holder.pid}" in ans["verdict"]["advice"][0]


def test_process_namespace_and_ports_each_answered(scratch):
    port = CHECK_PORTS[4]
    holder = Staged("listen", "::", port, "--hold", name="old-server", netns=scratch)
    try:
        code, answers, _ = check("--pid", str(holder.pid), "--addr", "0.0.0.0", str(port),
                                 str(port + 1))
    finally:
        holder.release()
    assert code == 1 and [a["port"] for a in answers] == [port, port + 1]
    blocked, free = answers
    assert blocked["netns"]["source"] == "process" and blocked["netns"]["name"] == scratch.name
    # [::] without IPV6_V6ONLY covers IPv4 (RULES overlap)
    assert blocked["blockers"][0]["local"]["addr"] == "::" and free["free"] is True


def test_without_root_names_no_holder_it_cannot_see(scratch):
    """sock_diag lists every socket to anyone; /proc/PID/fd only to root."""
    port = CHECK_PORTS[5]
    holder = Staged("listen", "0.0.0.0", port, "--hold", name="old-server")
    try:
        code, [ans], _ = check(str(port), uid=NOBODY)
    finally:
        holder.release()
    assert code == 1 and ans["engine"] == "sock_diag"
    [b] = ans["blockers"]
    assert b["processes"] == [] and b["holders_known"] is False
    assert "orphaned" not in ans["verdict"]["summary"]
    assert "run as root" in ans["verdict"]["advice"][0]


@pytest.mark.parametrize("args, word", [
    (["--netns", "no-such-ns", "80"], "--netns no-such-ns"),
    (["--pid", "999999999", "80"], "--pid"),
    (["--timeout", "3", "80"], "--timeout limits --wait"),
    (["--v6only", "80"], "IPv6"),
    (["--addr", "localhost", "80"], "not an IPv4 or IPv6 address"),
    (["--netns", "x", "--pid", "1", "80"], "give one"),
])
def test_bad_input_is_one_line_and_exit_2(args, word):
    need_root()
    code, _, err = check(*args)
    assert code == 2 and word in err and len(err.strip().splitlines()) == 1, err


def test_wait_returns_within_a_second_of_the_time_wait_expiry(scratch):
    """Both lookers wait on one real TIME_WAIT (60 s: TCP_TIMEWAIT_LEN) while
    ss watches the kernel's table; each must return within 1 s of its removal."""
    port = CHECK_PORTS[6]
    Staged("timewait", "127.0.0.1", port, name="old-server", netns=scratch).release()
    waiting = {name: subprocess.Popen(
        [sys.executable, "-m", "portrace", "check", "--json", "--engine", name, "--netns",
         scratch.name, "--wait", "--timeout", "90", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in LOOKERS}
    ended: dict[str, float] = {}

    def reap(name: str) -> None:
        waiting[name].wait()
        ended[name] = time.monotonic()

    reapers = [threading.Thread(target=reap, args=(n,)) for n in LOOKERS]
    for r in reapers:
        r.start()
    ss = ["ip", "netns", "exec", scratch.name, "ss", "-tanH", "state", "time-wait",
          f"sport = :{port}"]
    deadline = time.monotonic() + 90
    time.sleep(50)  # nothing to watch before the timer is near
    while subprocess.run(ss, capture_output=True, text=True, check=True).stdout.strip():
        assert time.monotonic() < deadline, "the TIME_WAIT outlived 90 s"
        time.sleep(0.02)
    gone = time.monotonic()
    for r in reapers:
        r.join(10)
    for name, proc in waiting.items():
        out, err = proc.communicate()
        assert proc.returncode == 0, err
        [ans] = [json.loads(line) for line in out.splitlines()]
        assert ans["free"] and ans["waited_for"][0].startswith(f"TIME_WAIT 127.0.0.1:{port}")
        assert abs(ended[name] - gone) < 1.0, (name, ended[name] - gone)
