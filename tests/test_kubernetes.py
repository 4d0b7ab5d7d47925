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
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import psutil
import pytest
import yaml
from conftest import READY_TIMEOUT_S, TracerProcess, bpf_unavailable, need_root
from cri import CRI_NS, ROOT, Containerd, Pod, container_config, node
from prometheus_client.parser import text_string_to_metric_families

from portrace import errors
from portrace.commands.stage import Staged
from portrace.kernel import capabilities
from portrace.observe import owners, runtimes

DATA = Path(__file__).resolve().parent / "data"
KUBERNETES = "1.31"  # the API version the manifest is checked against
# This module's own ports, watched by its own tracer (the session's pool is
# spoken for): outside conftest.PORTS and every other module's.
K8S_PORTS = list(range(19260, 19270))
_next: dict[str, Iterator[int]] = {}


@pytest.fixture(scope="module")
def node_runtime() -> Iterator[Containerd]:
    need_root()
    with node() as runtime:
        yield runtime


@pytest.fixture(scope="module")
def tracer(engine: str) -> Iterator[TracerProcess]:
    """portrace watching K8S_PORTS, once per engine."""
    need_root()
    t = TracerProcess(K8S_PORTS, engine=engine)
    if t.wait_for(lambda e: e["type"] == "ready", timeout=READY_TIMEOUT_S) is None:
        code, err = t.stop()
        bpf_unavailable(f"portrace --engine {engine} exited {code}: {err.strip()[-800:]}")
    yield t
    t.stop()


@pytest.fixture
def port(engine: str) -> int:
    """One of K8S_PORTS no other test of this engine here uses."""
    return next(_next.setdefault(engine, iter(K8S_PORTS)))


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


def test_a_pods_sandbox_is_named_as_its_pause_container(containerd):
    """The pause process of a live pod, named from containerd's own record
    of it (a sandbox holds the pod's namespaces; deleting the pod frees them)."""
    pod = containerd.pod("shop", "web-9")
    [pause] = [p for p in psutil.process_iter(["cmdline"])
               if p.info["cmdline"] == ["/bin/sleep", "2147483647"]
               and pod.uid in (owners.cgroup_of(p.pid) or "")]
    owner = owners.owner_of(pause.pid, "sleep", owners.cgroup_of(pause.pid), None)
    assert owner is not None and owner.sandbox and owner.container_id == pod.id
    assert owner.label() == "pod shop/web-9, its sandbox (pause) container"
    assert owner.pod is not None and owner.pod.uid == pod.uid


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


# The DaemonSet: deploy/kubernetes/portrace.yaml, checked, then its pod run.
MANIFEST = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes" / "portrace.yaml"
METRICS = "http://127.0.0.1:9464/metrics"


def manifest() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def daemonset() -> dict[str, Any]:
    [ds] = [d for d in manifest() if d["kind"] == "DaemonSet"]
    return ds


def test_the_daemonset_validates_against_the_kubernetes_api_schema():
    for doc in manifest():
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    broken = daemonset()
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsUsr"] = 0
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_the_daemonset_is_least_privilege():
    pod = daemonset()["spec"]["template"]["spec"]
    [c] = pod["containers"]
    sc = c["securityContext"]
    assert not sc.get("privileged") and sc["runAsUser"] != 0 and sc["runAsNonRoot"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {f"CAP_{a}" for a in sc["capabilities"]["add"]} == \
        {cap.name for cap in capabilities.CAPABILITIES}
    assert pod["hostPID"] and pod["hostNetwork"]
    assert all(m.get("readOnly") for m in c["volumeMounts"] if m["name"] != "evidence")
    ann = daemonset()["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and f":{ann['prometheus.io/port']}" in METRICS


@pytest.fixture(scope="module")
def image(node_runtime: Containerd, tmp_path_factory: pytest.TempPathFactory) -> str:
    """`make image`'s archive, imported as a node imports it."""
    out = tmp_path_factory.mktemp("image") / "portrace-image.tar"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "image.sh"), str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-1500:]
    node_runtime.ctr(CRI_NS, "images", "import", str(out))
    return str(daemonset()["spec"]["template"]["spec"]["containers"][0]["image"])


def run_daemonset_pod(runtime: Containerd, image: str, evidence: Path,
                      drop: str | None = None) -> tuple[Pod, str]:
    """The DaemonSet's pod as the kubelet would run it on this node: its
    init container to the end, then portrace (``drop``: one capability taken
    out of its spec). Its hostPath volumes are the node's own paths."""
    pod_spec = daemonset()["spec"]["template"]["spec"]
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod_spec["volumes"]}
    volumes["evidence"] = str(evidence)
    for path in list(volumes.values()):
        Path(path).mkdir(parents=True, exist_ok=True)
    # A name of its own: a container's CRI log is appended to, never replaced.
    pod = runtime.pod("portrace", f"portrace-{uuid.uuid4().hex[:5]}", host_pid=True)
    [init] = pod_spec["initContainers"]
    done = runtime.start(pod, init["name"], [], container_config(
        runtime.pb, init, image, volumes, f"{init['name']}.log"))
    assert runtime.wait_exited(done, 60) == 0, runtime.log(pod, init["name"])
    [spec] = pod_spec["containers"]
    if drop is not None:
        spec["securityContext"]["capabilities"]["add"].remove(drop)
    cid = runtime.start(pod, spec["name"], [], container_config(
        runtime.pb, spec, image, volumes, f"{spec['name']}.log"))
    return pod, cid


def scrape() -> str | None:
    try:
        with urllib.request.urlopen(METRICS, timeout=2) as r:
            return r.read().decode()
    except OSError:
        return None


@CORE_ONLY
def test_the_daemonset_pod_records_a_conflict_between_two_pods(containerd, image, port,
                                                               tmp_path):
    evidence = tmp_path / "evidence"
    pod, cid = run_daemonset_pod(containerd, image, evidence)
    deadline = time.monotonic() + 60
    while scrape() is None:
        assert containerd.state(cid)[0] == "CONTAINER_RUNNING", containerd.log(pod, "portrace")
        assert time.monotonic() < deadline, "no metrics from the portrace pod"
        time.sleep(0.3)
    web1 = containerd.pod("shop", "web-1")
    containerd.start(web1, "server", ["/bin/httpd", "-f", "-p", str(port)])
    web2 = containerd.pod("shop", "web-2")
    containerd.wait_exited(containerd.start(web2, "server", ["/bin/httpd", "-f", "-p",
                                                              str(port)]))
    ev = None
    while ev is None and time.monotonic() < deadline + 30:
        events = [json.loads(line) for f in evidence.glob("*.jsonl") for line in f.open()]
        ev = next((e for e in events if e["type"] == "bind_error" and e["port"] == port), None)
        time.sleep(0.3)
    assert ev is not None, containerd.log(pod, "portrace")[-1500:]
    assert "(pod shop/web-1, container server)" in ev["verdict"]["summary"], ev["verdict"]
    mine = failing_owner(ev)
    assert mine is not None and mine["pod"]["name"] == "web-2", ev
    ready = next(e for e in events if e["type"] == "ready")
    assert ready["engine"] == "core" and ready["left_out"].keys() <= {"fexit", "walk"}, ready
    metrics = scrape() or ""
    counted = [s.value for fam in text_string_to_metric_families(metrics) for s in fam.samples
               if s.name == "portrace_failures_total" and s.labels.get("port") == str(port)
               and s.labels.get("cause") == "listener"]
    assert counted == [1.0], metrics[-1500:]
    assert containerd.state(cid)[0] == "CONTAINER_RUNNING"


def test_the_daemonset_pod_without_one_capability_says_which(containerd, image, tmp_path):
    # (Not CAP_BPF or CAP_PERFMON: the spec's CAP_SYS_ADMIN stands in for both.)
    pod, cid = run_daemonset_pod(containerd, image, tmp_path / "evidence",
                                 drop="DAC_READ_SEARCH")
    code = containerd.wait_exited(cid, 60)
    log = containerd.log(pod, "portrace").strip().splitlines()
    assert code == errors.ExitStatus.NEEDS_ROOT, log
    assert len(log) == 1 and log[0].startswith("portrace: without CAP_DAC_READ_SEARCH (to "), log
