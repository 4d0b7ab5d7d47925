"""A Kubernetes node, for real: containerd and runc started by the test,
host-network pods made through the CRI API as the kubelet makes them, and
containers whose bind() fails because another container holds the port.
portrace names both ends as the operator knows them (pod NAMESPACE/NAME,
container NAME) from the runtime's own record, and advises through kubectl,
crictl or ctr, never by a container's pid. CRI-O cannot run here: its reader
is held to a record taken from CRI-O's source (tests/data/crio-config.json)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import TracerProcess, need_root
from cri import Containerd, node

from portrace.commands.stage import Staged
from portrace.observe import runtimes

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def node_runtime() -> Iterator[Containerd]:
    need_root()
    with node() as runtime:
        yield runtime


@pytest.fixture
def containerd(node_runtime: Containerd) -> Iterator[Containerd]:
    """The node's runtime; the pods a test made are gone after it."""
    yield node_runtime
    node_runtime.remove_pods()


def failed_bind(tracer: TracerProcess, mark: int, port: int) -> dict[str, Any]:
    ev = tracer.wait_for(lambda e: e["type"] == "bind_error" and e["port"] == port,
                         start=mark)
    assert ev is not None, f"portrace reported no bind_error on {port}"
    return ev


def failing_owner(ev: dict[str, Any]) -> dict[str, Any] | None:
    """The failing process's owner: from its facts, or, when it had exited
    before they were read, from the cgroup it failed in."""
    return (ev["process"] or {}).get("owner") or ev["exited_owner"]


def holder(ev: dict[str, Any]) -> dict[str, Any]:
    [b] = ev["blockers"]
    [p] = b["processes"]
    return p


# A container whose entrypoint fails bind() exits at once: the bcc engine
# cannot read a gone process's network namespace (README, "Engines"), so it
# names no blocker there. The CO-RE engine reads it in the kernel.
CORE_ONLY = pytest.mark.parametrize("engine", ["core"], indirect=True)


@CORE_ONLY
def test_two_host_network_pods_on_one_port(tracer, containerd, port):
    web1 = containerd.pod("shop", "web-1")
    first = containerd.start(web1, "server", ["/bin/httpd", "-f", "-p", str(port)])
    mark = tracer.mark()
    web2 = containerd.pod("shop", "web-2")
    second = containerd.start(web2, "server", ["/bin/httpd", "-f", "-p", str(port)])
    assert containerd.wait_exited(second) == 1, "the second httpd's bind() did not fail"
    assert containerd.state(first)[0] == "CONTAINER_RUNNING"
    ev = failed_bind(tracer, mark, port)
    assert ev["errno"] == "EADDRINUSE" and ev["comm"] == "httpd"
    mine = failing_owner(ev)
    assert mine is not None and mine["pod"]["name"] == "web-2", ev
    assert mine["pod"]["namespace"] == "shop" and mine["pod"]["container"] == "server"
    assert mine["pod"]["uid"] == web2.uid
    owner = holder(ev)["owner"]
    assert owner["container"]["id"] == first
    assert owner["container"]["runtime"] == "containerd"
    assert owner["container"]["namespace"] == "k8s.io" and owner["container"]["sandbox"] is False
    assert owner["pod"] == {"namespace": "shop", "name": "web-1", "uid": web1.uid,
                            "container": "server"}
    v = ev["verdict"]
    assert v["cause"] == "listener"
    assert "(pod shop/web-1, container server)" in v["summary"]
    now = v["advice"][0]
    assert "`kubectl -n shop delete pod web-1`" in now and f"`crictl stop {first[:13]}`" in now
    assert "`kill" not in now, now


@CORE_ONLY
def test_a_sidecar_that_binds_the_app_port(tracer, containerd, port):
    pod = containerd.pod("shop", "api-7f9c")
    app = containerd.start(pod, "app", ["/bin/httpd", "-f", "-p", str(port)])
    mark = tracer.mark()
    sidecar = containerd.start(pod, "metrics", ["/bin/httpd", "-f", "-p", str(port)])
    assert containerd.wait_exited(sidecar) == 1
    ev = failed_bind(tracer, mark, port)
    mine = failing_owner(ev)
    assert mine is not None and mine["pod"]["container"] == "metrics", ev
    owner = holder(ev)["owner"]
    assert owner["container"]["id"] == app
    assert owner["pod"]["name"] == "api-7f9c" and owner["pod"]["container"] == "app"
    assert "(pod shop/api-7f9c, container app)" in ev["verdict"]["summary"]


def test_kube_proxy_holding_a_node_port(tracer, containerd, port):
    pod = containerd.pod("kube-system", "kube-proxy-x2x7q")
    containerd.start(pod, "kube-proxy", ["/bin/httpd", "-f", "-p", str(port)])
    mark = tracer.mark()
    b = Staged("bind", "0.0.0.0", port, "--hold", name="nodeapp")
    b.release()
    assert b.info == "EADDRINUSE", b.info
    ev = failed_bind(tracer, mark, port)
    assert holder(ev)["owner"]["pod"]["container"] == "kube-proxy"
    now = ev["verdict"]["advice"][0]
    assert "NodePort" in now and "kubectl get svc -A" in now and "`kill" not in now, now


def test_a_ctr_run_container(tracer, containerd, port):
    name = f"portrace-ctr-{os.getpid()}"
    run = subprocess.Popen(["ctr", "-a", containerd.sock, "-n", "default", "run", "--rm",
                            "--net-host", "portrace.test/busybox:1", name,
                            "/bin/httpd", "-f", "-p", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port)
        mark = tracer.mark()
        b = Staged("bind", "0.0.0.0", port, "--hold", name="deploy")
        b.release()
        assert b.info == "EADDRINUSE", b.info
        ev = failed_bind(tracer, mark, port)
    finally:
        containerd.ctr("default", "task", "kill", "-s", "KILL", name, check=False)
        run.wait(30)
    owner = holder(ev)["owner"]
    assert owner["container"] == {"id": name, "runtime": "containerd", "name": None,
                                  "namespace": "default", "sandbox": False}
    assert owner["pod"] is None
    assert f"(container {name} in containerd namespace default)" in ev["verdict"]["summary"]
    assert f"`ctr -n default task kill {name}`" in ev["verdict"]["advice"][0]


def _wait_listening(port: int) -> None:
    for _ in range(200):
        out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                             text=True).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


# CRI-O: a record taken from CRI-O's source, not from a live CRI-O.
def test_crio_record_names_pod_and_container():
    spec = json.loads((DATA / "crio-config.json").read_text())
    r = runtimes.parse_annotations("cri-o", "b1c4", None, spec["annotations"])
    assert (r.pod_namespace, r.pod_name, r.pod_uid, r.container) == (
        "shop", "web-1", "1e0e7a4f-6a4e-4a1e-9a59-6b7b0c3b8f21", "server")
    assert r.sandbox is False


def test_crio_sandbox_record_is_the_pause_container():
    spec = json.loads((DATA / "crio-sandbox-config.json").read_text())
    r = runtimes.parse_annotations("cri-o", "a7d2", None, spec["annotations"])
    assert r.sandbox is True and (r.pod_namespace, r.pod_name) == ("shop", "web-1")


def test_crio_conmon_above_a_holder_names_its_pod(tmp_path, port):
    """conmon's own argv (`-c ID -b BUNDLE`) leads to the bundle; the record
    in it is CRI-O's, from tests/data."""
    need_root()
    bundle = tmp_path / "userdata"
    bundle.mkdir()
    shutil.copy(DATA / "crio-config.json", bundle / "config.json")
    conmon = tmp_path / "conmon"  # a process whose comm is conmon, as CRI-O's is
    conmon.write_text(f"#!{sys.executable}\nimport subprocess, sys\n"
                      f"sys.exit(subprocess.call([{sys.executable!r}, '-m', "
                      f"'portrace.commands.stage', 'listen', '0.0.0.0', '{port}', "
                      "'--name', 'server', '--hold']))\n")
    conmon.chmod(0o755)
    proc = subprocess.Popen([str(conmon), "--cid", "b1c4", "--bundle", str(bundle)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
        [server] = [c.pid for c in psutil.Process(proc.pid).children()]
        r = runtimes.record_of(server)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
    assert r is not None and r.runtime == "cri-o" and r.container_id == "b1c4"
    assert (r.pod_namespace, r.pod_name, r.container) == ("shop", "web-1", "server")
