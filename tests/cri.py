"""A Kubernetes node's runtime for the tests, offline: the OS's containerd and
runc, started by the test with a config of its own (its own root, state and
socket under a temporary directory; cgroupfs, no systemd), images built from
busybox-static by scripts/oci_image.py and imported, and host-network pods
driven through the CRI API (runtime.v1.RuntimeService) as the kubelet drives
them. Stopped by pid at the end, with every pod it ran."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import IN_CI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from oci_image import write_image  # noqa: E402

BUSYBOX = "/bin/busybox"  # Debian's busybox-static: one file, no libraries
APPLETS = ("sh", "httpd", "nc", "sleep", "cat", "ls")
IMAGE, PAUSE = "portrace.test/busybox:1", "portrace.test/pause:1"
CRI_NS = "k8s.io"
START_TIMEOUT_S = 30
# This host's root lacks CAP_SYS_RESOURCE, so runc cannot lower a sandbox's
# oom_score_adj to -998 (nsexec: "failed to update /proc/self/oom_score_adj");
# restrict_oom_score_adj clamps it to containerd's own, as on a rootless node.
CONFIG = """version = 2
root = "{dir}/root"
state = "{dir}/state"
[grpc]
  address = "{dir}/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
"""


def unavailable(why: str) -> None:
    if IN_CI:
        pytest.fail(f"containerd cannot run in CI: {why}")
    pytest.skip(f"containerd cannot run here: {why} (`make setup-test` installs it)")


def _rootfs(at: Path) -> Path:
    for d in ("bin", "etc", "tmp", "proc", "sys", "dev"):
        (at / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, at / "bin" / "busybox")
    for applet in APPLETS:
        (at / "bin" / applet).symlink_to("busybox")
    (at / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534::/:\n")
    return at


@dataclass(frozen=True)
class Pod:
    """A pod as the kubelet names it; ``id``: its sandbox id."""

    id: str
    namespace: str
    name: str
    uid: str
    config: object  # runtime.v1.PodSandboxConfig


class Containerd:
    """The runtime, its CRI client (``rt``) and ``ctr`` against its socket."""

    def __init__(self) -> None:
        missing = [b for b in ("containerd", "runc", "ctr", BUSYBOX) if not shutil.which(b)]
        if missing:
            unavailable(f"{', '.join(missing)} not installed")
        try:
            import grpc
            from cri_api.v1 import api_pb2, api_pb2_grpc
        except ImportError as exc:
            unavailable(f"the CRI stubs are not installed ({exc})")
        self.pb = api_pb2
        self.dir = Path(tempfile.mkdtemp(prefix="portrace-ctd-", dir="/tmp"))
        self.sock = str(self.dir / "containerd.sock")
        (self.dir / "config.toml").write_text(CONFIG.format(dir=self.dir, pause=PAUSE))
        with open(self.dir / "containerd.log", "w") as log:
            self.proc = subprocess.Popen(
                ["containerd", "--config", str(self.dir / "config.toml")],
                stdout=subprocess.DEVNULL, stderr=log)
        self.pods: list[Pod] = []
        self.cgroups: set[str] = set()
        channel = grpc.insecure_channel(f"unix://{self.sock}")
        self.rt = api_pb2_grpc.RuntimeServiceStub(channel)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                self.rt.Version(api_pb2.VersionRequest(), timeout=2)
                break
            except grpc.RpcError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.dir / "containerd.log").read_text()[-600:]
                    self.stop()
                    unavailable(f"containerd did not answer ({exc.code()}): {log}")
                time.sleep(0.1)
        rootfs = _rootfs(self.dir / "rootfs")
        for name, entry in ((IMAGE, ["/bin/sh"]), (PAUSE, ["/bin/sleep", "2147483647"])):
            archive = self.dir / (name.rsplit("/", 1)[-1].replace(":", "-") + ".tar")
            write_image(rootfs, name, archive, entrypoint=entry)
            for ns in (CRI_NS, "default"):
                self.ctr(ns, "images", "import", str(archive))

    def ctr(self, ns: str, *args: str, check: bool = True) -> str:
        done = subprocess.run(["ctr", "-a", self.sock, "-n", ns, *args], capture_output=True,
                              text=True, timeout=60)
        if check and done.returncode:
            raise AssertionError(f"ctr {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def pod(self, namespace: str, name: str, host_pid: bool = False) -> Pod:
        """A host-network pod (its sandbox running), as kubelet's cgroupfs
        driver places it: /kubepods/besteffort/pod<uid>; ``host_pid``: in
        the node's pid namespace (hostPID)."""
        pb = self.pb
        uid = str(uuid.uuid4())
        logs = self.dir / "logs" / name
        logs.mkdir(parents=True, exist_ok=True)
        cgroup = f"/kubepods/besteffort/pod{uid}"
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, namespace=namespace, uid=uid),
            log_directory=str(logs),
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=cgroup,
                security_context=pb.LinuxSandboxSecurityContext(
                    namespace_options=pb.NamespaceOption(
                        network=pb.NODE, pid=pb.NODE if host_pid else pb.CONTAINER,
                        ipc=pb.POD))))
        sandbox = self.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=60)
        pod = Pod(sandbox.pod_sandbox_id, namespace, name, uid, config)
        self.pods.append(pod)
        self.cgroups.add(cgroup)
        return pod

    def start(self, pod: Pod, name: str, argv: Sequence[str], config: object = None) -> str:
        """A container of ``pod`` running ``argv`` (or made from ``config``,
        a CRI ContainerConfig), started; its id."""
        pb = self.pb
        config = config or pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=IMAGE),
            command=list(argv[:1]), args=list(argv[1:]), log_path=f"{name}.log")
        made = self.rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config), timeout=60)
        self.rt.StartContainer(pb.StartContainerRequest(container_id=made.container_id),
                               timeout=60)
        return str(made.container_id)

    def log(self, pod: Pod, name: str) -> str:
        """What container ``name`` of ``pod`` wrote, CRI's log format stripped."""
        path = self.dir / "logs" / pod.name / f"{name}.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return "\n".join(line.split(" ", 3)[-1] for line in lines)

    def state(self, container_id: str) -> tuple[str, int]:
        """(CONTAINER_RUNNING/EXITED/..., exit code)."""
        pb = self.pb
        st = self.rt.ContainerStatus(pb.ContainerStatusRequest(container_id=container_id),
                                     timeout=10).status
        return pb.ContainerState.Name(st.state), st.exit_code

    def wait_exited(self, container_id: str, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state, code = self.state(container_id)
            if state == "CONTAINER_EXITED":
                return code
            time.sleep(0.05)
        raise AssertionError(f"container {container_id[:12]} did not exit")

    def remove_pods(self) -> None:
        """Every pod made so far stopped and removed, as the kubelet does."""
        pb = self.pb
        for pod in self.pods:
            with contextlib.suppress(Exception):
                self.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod.id),
                                       timeout=30)
                self.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod.id),
                                         timeout=30)
        self.pods.clear()

    def stop(self) -> None:
        """Every pod stopped and removed, then containerd and its shims by pid."""
        self.remove_pods()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for shim in _shims(self.sock):  # a shim outlives its daemon
            with contextlib.suppress(ProcessLookupError):
                os.kill(shim, signal.SIGKILL)
        _unmount_under(self.dir)
        for cgroup in self.cgroups:
            _rmdir_cgroup(cgroup)
        shutil.rmtree(self.dir, ignore_errors=True)


def _shims(sock: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"containerd-shim-runc-v2") and sock.encode() in argv:
                found.append(int(pid))
    return found


def _unmount_under(top: Path) -> None:
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f if line.split()[1].startswith(f"{top}/")]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def _rmdir_cgroup(cgroup: str) -> None:
    """The pod's cgroup in each hierarchy runc made it in (runc removes the
    containers' own, not the parent the kubelet would)."""
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        path = hierarchy / cgroup.lstrip("/")
        for d in (path, path.parent, path.parent.parent):
            with contextlib.suppress(OSError):
                d.rmdir()


@contextlib.contextmanager
def node() -> Iterator[Containerd]:
    runtime = Containerd()
    try:
        yield runtime
    finally:
        runtime.stop()


def container_config(pb: Any, spec: dict[str, Any], image: str, mounts: dict[str, str],
                     log: str) -> Any:
    """A Kubernetes container spec (a DaemonSet's, as read from its YAML) as
    the kubelet turns it into a CRI ContainerConfig: command/args, the
    securityContext (uid, gid, read-only root, capabilities without their
    CAP_ prefix, no_new_privs from allowPrivilegeEscalation), and each
    volumeMount bound from ``mounts``: volume name -> host path."""
    sc = spec.get("securityContext", {})
    caps = sc.get("capabilities", {})
    return pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=spec["name"]),
        image=pb.ImageSpec(image=image),
        command=spec.get("command", []), args=spec.get("args", []), log_path=log,
        mounts=[pb.Mount(container_path=m["mountPath"],
                         host_path=mounts[m["name"]], readonly=m.get("readOnly", False))
                for m in spec.get("volumeMounts", [])],
        linux=pb.LinuxContainerConfig(
            security_context=pb.LinuxContainerSecurityContext(
                run_as_user=pb.Int64Value(value=sc["runAsUser"]),
                run_as_group=pb.Int64Value(
                    value=sc.get("runAsGroup", sc["runAsUser"])),
                readonly_rootfs=sc.get("readOnlyRootFilesystem", False),
                no_new_privs=not sc.get("allowPrivilegeEscalation", True),
                capabilities=pb.Capability(
                    add_capabilities=caps.get("add", []),
                    drop_capabilities=caps.get("drop", [])))))
