"""Each conflict staged with real sockets in real processes; the real probes
must see the failed bind() and name the real blocker."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from typing import Any

import contract
from conftest import PORTS, TracerProcess, netns_inode

from portrace.commands.stage import ScratchNetns, Staged

ISO_TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def fail_bind(tracer: TracerProcess, addr: str, port: int, *args: str,
              netns: ScratchNetns | None = None, hold: bool = True
              ) -> tuple[Staged, dict[str, Any]]:
    """A `new-server` process binds addr:port; returns it and portrace's bind_error."""
    mark = tracer.mark()
    binder = Staged("bind", addr, port, *args, *(["--hold"] if hold else []),
                    name="new-server", netns=netns)
    assert binder.info == "EADDRINUSE", f"staging did not conflict: {binder.info}"
    ev = tracer.wait_for(lambda e: e["type"] == "bind_error" and e["pid"] == binder.pid,
                         start=mark)
    binder.release()
    assert ev is not None, "portrace reported no bind_error for the failed bind()"
    assert ev["errno"] == "EADDRINUSE" and ev["port"] == port and ev["comm"] == "new-server"
    assert ISO_TS.match(ev["ts"])
    # The engine looked the port up, and says what that alone cost.
    assert ev["snapshot_ms"] > 0
    return binder, ev


def bind_unreported(tracer: TracerProcess, addr: str, port: int,
                    netns: ScratchNetns) -> dict[str, Any]:
    """A bind that must succeed: the probes see it, and no bind_error follows."""
    mark = tracer.mark()
    binder = Staged("bind", addr, port, name="new-server", netns=netns)
    binder.release()
    assert binder.info == "ok"
    seen = tracer.wait_for(lambda e: e["type"] == "bind" and e["pid"] == binder.pid,
                           start=mark)
    assert seen is not None, "the probes did not see the successful bind()"
    assert tracer.wait_for(lambda e: e["type"] == "bind_error" and e["port"] == port,
                           timeout=1.0, start=mark) is None
    return seen


def test_time_wait_on_server_side_of_loopback_connection(tracer, netns, port):
    old = Staged("timewait", "127.0.0.1", port, name="old-server", netns=netns)
    old.release()
    client_port = int(old.info)
    _, ev = fail_bind(tracer, "127.0.0.1", port, netns=netns)

    assert ev["netns"] == {"inode": netns_inode(netns), "source": "process", "name": netns.name}
    assert ev["protocol"] == "tcp" and ev["family"] == "inet"
    assert ev["verdict"]["cause"] == "time_wait"
    [tw] = ev["blockers"]
    assert tw["state"] == "TIME_WAIT" and tw["minisock"] is True
    assert tw["local"] == {"addr": "127.0.0.1", "port": port}
    assert tw["remote"] == {"addr": "127.0.0.1", "port": client_port}
    assert 50.0 < tw["expires_s"] <= 60.0
    assert tw["processes"] == [] and tw["inode"] == 0
    assert tw["closed_by"]["pid"] == old.pid and tw["closed_by"]["comm"] == "old-server"
    advice = " ".join(ev["verdict"]["advice"])
    assert f"wait {round(tw['expires_s'])} s" in advice
    assert "SO_REUSEADDR" in advice and "both the old and the new" in advice
    assert "tcp_tw_reuse" in advice and "tcp_fin_timeout" in advice


def test_live_listener_in_another_process(tracer, netns, port):
    holder = Staged("listen", "0.0.0.0", port, "--hold", name="holder", netns=netns)
    try:
        _, ev = fail_bind(tracer, "127.0.0.1", port, netns=netns)
    finally:
        holder.release()
    assert ev["verdict"]["cause"] == "listener"
    [listener] = ev["blockers"]
    assert listener["state"] == "LISTEN" and listener["remote"] is None
    assert listener["local"] == {"addr": "0.0.0.0", "port": port}
    [proc] = listener["processes"]
    assert proc["pid"] == int(holder.info) and proc["comm"] == "holder"
    assert proc["inherited"] is False  # the probes saw this very process bind it
    assert f"kill {proc['pid']}" in ev["verdict"]["advice"][0]


def test_listener_kept_only_by_child_that_inherited_the_fd(tracer, netns, port):
    old = Staged("listen-fork-child", "0.0.0.0", port, "--child-seconds", "60",
                 name="old-server", netns=netns)
    child = int(old.info)
    old.release()  # the parent, which bound the socket, is gone
    try:
        _, ev = fail_bind(tracer, "0.0.0.0", port, netns=netns)
    finally:
        os.kill(child, signal.SIGTERM)
    assert ev["verdict"]["cause"] == "listener"
    [listener] = ev["blockers"]
    assert [(p["pid"], p["comm"], p["inherited"]) for p in listener["processes"]] == [
        (child, "sleep", True)]
    assert "inherited" in ev["verdict"]["advice"][0]


def test_ipv6_wildcard_listener_blocks_ipv4_bind(tracer, netns, port):
    holder = Staged("listen", "::", port, "--v6only", "0", "--hold", name="dual-stack",
                    netns=netns)
    try:
        _, ev = fail_bind(tracer, "0.0.0.0", port, netns=netns)
    finally:
        holder.release()
    assert ev["family"] == "inet"
    [listener] = ev["blockers"]
    assert listener["family"] == "inet6" and listener["local"]["addr"] == "::"
    assert listener["v6only"] is False
    assert ev["verdict"]["cause"] == "listener"
    assert any("IPV6_V6ONLY" in line for line in ev["verdict"]["advice"])


def test_ipv6_only_listener_does_not_block_ipv4(tracer, netns, port):
    holder = Staged("listen", "::", port, "--v6only", "1", "--hold", name="v6-only",
                    netns=netns)
    try:
        bind_unreported(tracer, "0.0.0.0", port, netns)
    finally:
        holder.release()


def test_udp_conflict(tracer, netns, port):
    holder = Staged("listen", "0.0.0.0", port, "--udp", "--hold", name="udp-holder",
                    netns=netns)
    tcp = Staged("listen", "0.0.0.0", port, "--hold", name="tcp-holder", netns=netns)
    try:
        _, ev = fail_bind(tracer, "127.0.0.1", port, "--udp", netns=netns)
    finally:
        holder.release()
        tcp.release()
    assert ev["protocol"] == "udp"
    assert ev["verdict"]["cause"] == "udp_socket"
    [sock] = ev["blockers"]  # the TCP listener on the same port is not a UDP blocker
    assert sock["protocol"] == "udp" and sock["state"] == "UNCONN"
    assert [p["comm"] for p in sock["processes"]] == ["udp-holder"]


def test_accepted_connection_outlives_its_listener(tracer, netns, port):
    old = Staged("established", "127.0.0.1", port, "--hold", name="old-server", netns=netns)
    client_port = int(old.info)
    try:
        _, ev = fail_bind(tracer, "0.0.0.0", port, netns=netns)
    finally:
        old.release()
    assert ev["verdict"]["cause"] == "connected_socket"
    [conn] = ev["blockers"]
    assert conn["state"] == "ESTABLISHED"
    assert conn["local"] == {"addr": "127.0.0.1", "port": port}
    assert conn["remote"] == {"addr": "127.0.0.1", "port": client_port}
    assert [p["pid"] for p in conn["processes"]] == [old.pid]
    assert "SO_REUSEADDR" in " ".join(ev["verdict"]["advice"])


def test_bind_to_other_address_on_same_port_succeeds_without_event(tracer, netns, port):
    holder = Staged("listen", "127.0.0.1", port, "--hold", name="holder", netns=netns)
    try:
        seen = bind_unreported(tracer, "127.0.0.2", port, netns)
    finally:
        holder.release()
    assert seen["addr"] == "127.0.0.2"


def test_failing_process_that_exits_at_once_in_host_namespace(tracer, port):
    holder = Staged("listen", "127.0.0.1", port, "--hold", name="holder")
    try:
        _, ev = fail_bind(tracer, "127.0.0.1", port, hold=False)
    finally:
        holder.release()
    if ev["netns"]["source"] == "tracer":
        # bcc, the process already gone: its namespace is not known, so
        # nothing is named (never a guess from portrace's own namespace).
        assert tracer.engine == "bcc"
        assert ev["verdict"]["cause"] == "unknown" and ev["blockers"] == []
        return
    # The CO-RE engine read the namespace in the kernel; the host's is pinned
    # by every process in it.
    assert ev["netns"]["inode"] == os.stat("/proc/self/ns/net").st_ino
    assert ev["verdict"]["cause"] == "listener"
    assert ev["blockers"][0]["processes"][0]["comm"] == "holder"


def test_transitions_stream_with_owner(tracer, netns, port):
    mark = tracer.mark()
    old = Staged("timewait", "127.0.0.1", port, name="old-server", netns=netns)
    old.release()
    ev = tracer.wait_for(lambda e: e["type"] == "state" and e["local"]["port"] == port
                         and e["old"] == "ESTABLISHED" and e["new"] == "FIN_WAIT1", start=mark)
    assert ev is not None and ev["comm"] == "old-server" and ev["pid"] == old.pid
    closed = tracer.wait_for(lambda e: e["type"] == "state" and e["local"]["port"] == port
                             and e["old"] == "FIN_WAIT2" and e["new"] == "CLOSE", start=mark)
    # Entering TIME_WAIT shows only as FIN_WAIT2 -> CLOSE of the same socket.
    assert closed is not None and closed["skaddr"] == ev["skaddr"]


def test_every_event_printed_meets_the_json_contract(tracer):
    """Runs after the scenarios above: everything portrace printed for them."""
    events = list(tracer.events)
    assert events[0]["type"] == "ready" and events[0]["ports"] == PORTS
    kinds = {e["type"] for e in events}
    assert {"ready", "state", "bind", "bind_error"} <= kinds
    for ev in events:
        contract.check(ev)


def test_tracing_never_causes_eaddrinuse(tracer, port):
    """A tight bind/close loop on a watched port must not fail because portrace
    looked: no fd of a binding process may be pinned by the tracer."""
    loop = (
        "import socket\n"
        f"for i in range(3000):\n"
        "    s = socket.socket()\n"
        f"    s.bind(('127.0.0.1', {port}))\n"
        "    s.close()\n"
        "print('ok')\n"
    )
    mark = tracer.mark()
    r = subprocess.run([sys.executable, "-c", loop], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "ok", r.stderr[-500:]
    assert tracer.wait_for(lambda e: e["type"] == "bind" and e["port"] == port,
                           start=mark) is not None  # the probes did see the loop


def test_all_ports_with_pid_filter_streams_only_that_process_failures(engine, netns, tmp_path):
    """`portrace --json -p PID -o FILE` (no port): every port, failures only."""
    port = 19177  # not among the session tracer's ports
    holder = Staged("listen", "0.0.0.0", port, "--hold", name="holder", netns=netns)
    mine = Staged("bind", "0.0.0.0", port, "--wait", "--hold", name="watched",
                  netns=netns, first="waiting")
    other = Staged("bind", "0.0.0.0", port, "--wait", "--hold", name="unwatched",
                   netns=netns, first="waiting")
    evidence = tmp_path / "evidence.jsonl"
    t = TracerProcess([], extra=["-p", str(mine.pid), "-o", str(evidence)], engine=engine)
    try:
        ready = t.wait_for(lambda e: e["type"] == "ready", timeout=120)
        assert ready is not None and ready["ports"] == []
        mark = t.mark()
        assert other.go() == "EADDRINUSE" and mine.go() == "EADDRINUSE"
        ev = t.wait_for(lambda e: e["type"] == "bind_error", start=mark)
        assert ev is not None and ev["pid"] == mine.pid and ev["comm"] == "watched"
        assert ev["verdict"]["cause"] == "listener"
        assert t.wait_for(lambda e: e["pid"] == other.pid, timeout=1.0, start=mark) is None
    finally:
        for s in (mine, other, holder):
            s.release()
        code, err = t.stop()
    assert code == 0, err
    # Only failures left the kernel: no transitions, no successful binds.
    assert {e["type"] for e in t.events} == {"ready", "bind_error"}
    recorded = [json.loads(line) for line in evidence.read_text().splitlines()]
    assert [e["type"] for e in recorded] == ["ready", "bind_error"]
    assert recorded[1] == ev


def test_orphaned_fin_wait2_bounded_by_the_namespace_fin_timeout(tracer, port):
    with ScratchNetns(f"portrace-fw2-{os.getpid()}") as ns:
        ns.sysctl("net.ipv4.tcp_fin_timeout", "17")  # this namespace only
        old = Staged("finwait2", "127.0.0.1", port, "--hold", name="old-server", netns=ns)
        try:
            _, ev = fail_bind(tracer, "127.0.0.1", port, netns=ns)
        finally:
            old.release()
    assert ev["verdict"]["cause"] == "fin_wait2"
    [fw2] = ev["blockers"]
    assert fw2["state"] == "FIN_WAIT2" and fw2["minisock"] is True
    assert fw2["remote"] == {"addr": "127.0.0.1", "port": int(old.info)}
    assert 0 < fw2["expires_s"] <= 17.0
    assert fw2["closed_by"]["comm"] == "old-server"
    assert any("net.ipv4.tcp_fin_timeout = 17 s" in a for a in ev["verdict"]["advice"])


def test_a_process_that_binds_one_port_twice_conflicts_with_itself(tracer, netns, port):
    """Two servers in one process on one port: the blocker is its own
    listener, and the advice never tells it to kill itself."""
    binder, ev = fail_bind(tracer, "127.0.0.1", port, "--own-listener", "--keep-own",
                           netns=netns)
    assert ev["verdict"]["cause"] == "listener"
    holders = ev["blockers"][0]["processes"]
    assert [h["pid"] for h in holders] == [binder.pid]
    now = ev["verdict"]["advice"][0]
    assert "conflicts with itself" in now and f"(fd {holders[0]['fds'][0]})" in now
    assert "kill" not in now
