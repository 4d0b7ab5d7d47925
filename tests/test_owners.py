"""Holders and failing processes named the way the operator thinks of them
(issue 10): systemd unit, container and pod, socket activation, docker-proxy,
and a port taken as an outgoing connection's source port.

Real processes hold real sockets in real cgroups named as systemd and the
runtimes name theirs; the one stand-in is a runtime's API (a Docker Engine API
answered on a UNIX socket, as $DOCKER_HOST points to), since no container
runtime runs here."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PORTS, TracerProcess, bpf_unavailable, need_root
from test_check import check

from portrace.commands.stage import ScratchNetns, Staged
from portrace.observe.owners import (
    parse_cgroup,
    parse_docker_proxy,
    parse_list_sockets,
    parse_socket_activate,
)

OWNER_PORTS = list(range(PORTS[-1] + 31, PORTS[-1] + 41))
CID = "3f2a1b4c5d6e" + "0" * 52
POD_UID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"


@pytest.mark.parametrize("path, unit, user, cid, runtime, pod", [
    ("/system.slice/checkout.service", "checkout.service", False, None, None, None),
    ("/user.slice/user-1000.slice/user@1000.service/app.slice/node-app.service",
     "node-app.service", True, None, None, None),
    ("/user.slice/user-1000.slice/session-3.scope", "session-3.scope", False, None, None, None),
    (f"/system.slice/docker-{CID}.scope", None, False, CID, "docker", None),
    (f"/docker/{CID}", None, False, CID, "docker", None),
    (f"/machine.slice/libpod-{CID}.scope/container", None, False, CID, "podman", None),
    ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
     f"{POD_UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope",
     None, False, CID, "containerd", POD_UID),
    (f"/kubepods/besteffort/pod{POD_UID}/{CID}", None, False, CID, "kubernetes", POD_UID),
    (f"/kubepods.slice/kubepods-pod{POD_UID.replace('-', '_')}.slice/crio-{CID}.scope",
     None, False, CID, "cri-o", POD_UID),
    ("/", None, False, None, None, None),
])
def test_cgroup_paths_name_unit_container_and_pod(path, unit, user, cid, runtime, pod):
    n = parse_cgroup(path)
    assert (n.unit, n.user, n.container_id, n.runtime, n.pod_uid) == (unit, user, cid, runtime,
                                                                       pod)


def test_special_holders_argv():
    fwd = parse_docker_proxy(["/usr/bin/docker-proxy", "-proto", "tcp", "-host-ip", "0.0.0.0",
                              "-host-port", "8080", "-container-ip", "172.17.0.2",
                              "-container-port", "80"])
    assert fwd is not None and str(fwd[0]) == "172.17.0.2:80" and fwd[1] == 8080
    assert parse_docker_proxy(["nginx", "-g", "daemon off;"]) is None
    assert parse_socket_activate(["systemd-socket-activate", "-l", "9090", "--accept",
                                  "-E", "X=1", "/usr/bin/app", "--port", "9090"]) == \
        "/usr/bin/app --port 9090"
    listing = ("0.0.0.0:9090   checkout.socket   checkout.service\n"
               "/run/dbus/system_bus_socket dbus.socket dbus.service\n")
    assert parse_list_sockets(listing) == {"0.0.0.0:9090": "checkout.socket",
                                           "/run/dbus/system_bus_socket": "dbus.socket"}


def _cgroup2_root() -> Path:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "cgroup2":
                return Path(fields[4])
    pytest.fail("no cgroup2 hierarchy mounted (this machine type has one)")


class Cgroups:
    """Real cgroups created for the test, processes moved in; removed after."""

    def __init__(self) -> None:
        self.root = _cgroup2_root()
        self.made: list[Path] = []

    def move(self, pid: int, path: str) -> None:
        d = self.root
        for part in path.strip("/").split("/"):
            d = d / part
            if not d.exists():
                d.mkdir()
                self.made.append(d)
        (d / "cgroup.procs").write_text(f"{pid}\n")

    def cleanup(self) -> None:
        for d in reversed(self.made):
            for pid in (d / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):  # it may have exited meanwhile
                    (self.root / "cgroup.procs").write_text(f"{pid}\n")
            d.rmdir()


@pytest.fixture
def cgroups() -> Iterator[Cgroups]:
    need_root()
    cg = Cgroups()
    try:
        yield cg
    finally:
        cg.cleanup()


class _Api(http.server.BaseHTTPRequestHandler):
    answers: dict[str, Any] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = self.answers.get(self.path.split("?")[0])
        data = json.dumps(body).encode()
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def address_string(self) -> str:
        return "unix"

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def docker_api(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A Docker Engine API on a UNIX socket; yields the answers by path (set
    them) and DOCKER_HOST in ``answers['env']``."""
    path = str(tmp_path / "docker.sock")
    answers: dict[str, Any] = {}
    handler = type("Api", (_Api,), {"answers": answers})
    server = socketserver.ThreadingUnixStreamServer(path, handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield {"answers": answers, "env": {"DOCKER_HOST": f"unix://{path}"}}
    finally:
        server.shutdown()
        server.server_close()


def _blocker_process(ans: dict[str, Any]) -> dict[str, Any]:
    [b] = ans["blockers"]
    [p] = b["processes"]
    return p


def test_systemd_service_named_and_stopped_by_its_unit(cgroups):
    port = OWNER_PORTS[0]
    holder = Staged("listen", "0.0.0.0", port, "--hold", name="node")
    try:
        cgroups.move(holder.pid, "system.slice/checkout.service")
        code, [ans], _ = check(str(port))
    finally:
        holder.release()
    assert code == 1
    assert _blocker_process(ans)["owner"]["unit"] == "checkout.service"
    assert f"held by node[{holder.pid}] (checkout.service)" in ans["verdict"]["summary"]
    assert "`systemctl stop checkout.service`" in ans["verdict"]["advice"][0]


def test_container_and_pod_named_from_cgroup_and_runtime_api(cgroups, docker_api):
    port = OWNER_PORTS[1]
    docker_api["answers"][f"/containers/{CID}/json"] = {
        "Id": CID, "Name": "/web-1", "Config": {"Labels": {
            "io.kubernetes.pod.namespace": "shop", "io.kubernetes.pod.name": "checkout-7d9",
            "io.kubernetes.container.name": "web"}}}
    holder = Staged("listen", "0.0.0.0", port, "--hold", name="web")
    try:
        cgroups.move(holder.pid, "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-"
                     f"pod{POD_UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope")
        code, [ans], _ = check(str(port), env=docker_api["env"])
    finally:
        holder.release()
    owner = _blocker_process(ans)["owner"]
    assert owner["container"] == {"id": CID, "runtime": "containerd", "name": "web-1",
                                  "namespace": None, "sandbox": False}
    assert owner["pod"] == {"namespace": "shop", "name": "checkout-7d9", "uid": POD_UID,
                            "container": "web"}
    assert (f"web[{holder.pid}] (pod shop/checkout-7d9, container web)"
            in ans["verdict"]["summary"])
    assert "`kubectl -n shop delete pod checkout-7d9`" in ans["verdict"]["advice"][0]
    assert "kill" not in ans["verdict"]["advice"][0].replace("never kill its pid", "")


def test_container_without_a_reachable_runtime_is_named_by_id(cgroups):
    port = OWNER_PORTS[2]
    holder = Staged("listen", "0.0.0.0", port, "--hold", name="web")
    try:
        cgroups.move(holder.pid, f"system.slice/docker-{CID}.scope")
        code, [ans], _ = check(str(port), env={"DOCKER_HOST": "unix:///nonexistent.sock"})
    finally:
        holder.release()
    owner = _blocker_process(ans)["owner"]
    assert owner["container"] == {"id": CID, "runtime": "docker", "name": None,
                                  "namespace": None, "sandbox": False}
    assert f"web[{holder.pid}] (container {CID[:12]})" in ans["verdict"]["summary"]


def test_socket_activation_names_what_it_starts():
    port = OWNER_PORTS[3]
    need_root()
    act = subprocess.Popen(["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "/bin/cat"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert act.stderr is not None and "Listening on" in act.stderr.readline()
        code, [ans], _ = check("--addr", "127.0.0.1", str(port))
    finally:
        act.kill()
        act.wait()
    p = _blocker_process(ans)
    assert p["pid"] == act.pid and p["owner"]["activates"] == "/bin/cat"
    assert "(socket activation: /bin/cat)" in ans["verdict"]["summary"]


def test_docker_proxy_names_the_container_it_forwards_to(docker_api):
    port = OWNER_PORTS[4]
    need_root()
    docker_api["answers"]["/containers/json"] = [
        {"Id": CID, "Names": ["/web-1"],
         "NetworkSettings": {"Networks": {"bridge": {"IPAddress": "172.17.0.2"}}}}]
    script = ("import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, "
              f"socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', {port})); s.listen(); "
              "print('ready', flush=True); sys.stdin.read()")
    proxy = subprocess.Popen(
        ["bash", "-c", 'exec -a docker-proxy "$0" "$@"', sys.executable, "-c", script,
         "-proto", "tcp", "-host-ip", "0.0.0.0", "-host-port", str(port),
         "-container-ip", "172.17.0.2", "-container-port", "80"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
        _, [ans], _ = check(str(port), env=docker_api["env"])
    finally:
        proxy.kill()
        proxy.wait()
    owner = _blocker_process(ans)["owner"]
    assert owner["forwards_to"] == {"addr": "172.17.0.2", "port": 80, "container": "web-1"}
    assert "docker-proxy to 172.17.0.2:80 in container web-1" in ans["verdict"]["summary"]
    assert "`docker stop web-1`" in ans["verdict"]["advice"][0]


def test_source_port_of_an_outgoing_connection_points_to_reserved_ports():
    need_root()
    with ScratchNetns(f"portrace-own-{os.getpid()}") as ns:
        ns.sysctl("net.ipv4.ip_local_port_range", "40000 40001")
        conn = Staged("established", "127.0.0.1", OWNER_PORTS[5], "--hold", name="client",
                      netns=ns)
        try:
            source = int(conn.info)
            code, [ans], _ = check("--netns", ns.name, "--addr", "127.0.0.1", str(source))
        finally:
            conn.release()
        assert code == 1 and ans["verdict"]["cause"] == "connected_socket"
        note = next(a for a in ans["verdict"]["advice"] if "ip_local_reserved_ports" in a)
        assert f"{source} lies inside net.ipv4.ip_local_port_range 40000-40001" in note
        # The advice holds: once reserved, connect() never takes that port again.
        ns.sysctl("net.ipv4.ip_local_reserved_ports", str(source))
        for _ in range(3):
            again = Staged("established", "127.0.0.1", OWNER_PORTS[6], "--reuseaddr",
                           name="client", netns=ns)
            again.release()
            assert int(again.info) != source


def test_traced_failure_names_both_units(engine, cgroups):
    """The tracer path: holder and failing process each named by their unit."""
    port = OWNER_PORTS[7]
    holder = Staged("listen", "0.0.0.0", port, "--hold", name="old-app")
    new = Staged("bind", "0.0.0.0", port, "--wait", "--hold", name="new-app", first="waiting")
    t = TracerProcess([port], engine=engine)
    try:
        if t.wait_for(lambda e: e["type"] == "ready", timeout=120) is None:
            bpf_unavailable(f"portrace --engine {engine} did not start: {t.stop()[1][-800:]}")
        cgroups.move(holder.pid, "system.slice/app-old.service")
        cgroups.move(new.pid, "system.slice/app-new.service")
        assert new.go() == "EADDRINUSE"
        ev = t.wait_for(lambda e: e["type"] == "bind_error" and e["pid"] == new.pid)
    finally:
        t.stop()
        new.release()
        holder.release()
    assert ev is not None
    assert ev["process"]["owner"]["unit"] == "app-new.service"
    assert ev["blockers"][0]["processes"][0]["owner"]["unit"] == "app-old.service"
    assert "`systemctl stop app-old.service`" in ev["verdict"]["advice"][0]
