"""What a container runtime recorded of a container, read from its own files:
the OCI bundle's ``config.json`` annotations. containerd's CRI plugin and
CRI-O write the pod's namespace, name and uid and the container's name there
for every container they create, whatever the caller passed; nerdctl passes
its labels (``nerdctl/name``) as annotations too. No API socket, credentials
or gRPC stack is needed: a read-only mount of the runtime's state directory is
enough, and the answer does not wait on a busy runtime.

The bundle is found through the runtime's process above the container:
- containerd's shim (``containerd-shim-runc-v2 -namespace NS -id ID``) runs
  with the bundle of the first container it serves as its working directory
  (containerd runtime/v2/README.md: "all binary calls to the shim [have] the
  bundle for the container set as the cwd"); the other containers of that
  namespace are its siblings,
  ``<state>/io.containerd.runtime.v2.task/<namespace>/<id>/``, reached as
  ``/proc/<shim>/cwd/..``, which leads there from any mount namespace (a
  DaemonSet's pod sees the node's state directory without mounting it).
  Without access to the shim's cwd (ptrace), containerd's default state
  directory is read;
- CRI-O's ``conmon`` is given the container's own bundle (``-b``), by default
  ``/run/containers/storage/overlay-containers/<id>/userdata``.
Parsing is pure; :func:`record_of` does the reading and finds nothing rather
than guess.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

CONTAINERD_TASKS = Path("/run/containerd/io.containerd.runtime.v2.task")
CRIO_CONTAINERS = Path("/run/containers/storage/overlay-containers")
ANCESTORS_MAX = 32  # a runtime's process is a few levels up; a loop is not
CONFIG_MAX = 4 << 20  # bytes of config.json read

# containerd's CRI plugin (pkg/cri/annotations/annotations.go).
CRI_TYPE = "io.kubernetes.cri.container-type"
CRI_NAMES = {"pod_namespace": "io.kubernetes.cri.sandbox-namespace",
             "pod_name": "io.kubernetes.cri.sandbox-name",
             "pod_uid": "io.kubernetes.cri.sandbox-uid",
             "container": "io.kubernetes.cri.container-name"}
# CRI-O (pkg/annotations/internal.go): the kubelet's labels, each also an
# annotation of its own on a container, and all of them as JSON in Labels.
CRIO_TYPE = "io.kubernetes.cri-o.ContainerType"
CRIO_LABELS = "io.kubernetes.cri-o.Labels"
KUBELET_LABELS = {"pod_namespace": "io.kubernetes.pod.namespace",
                  "pod_name": "io.kubernetes.pod.name",
                  "pod_uid": "io.kubernetes.pod.uid",
                  "container": "io.kubernetes.container.name"}
NERDCTL_NAME = "nerdctl/name"
SANDBOX = "sandbox"  # both runtimes' container type of a pod's sandbox (pause)


@dataclass(frozen=True)
class RuntimeRecord:
    """One container as its runtime recorded it. ``runtime``: ``containerd``
    or ``cri-o``; ``namespace``: containerd's namespace (``k8s.io`` for
    Kubernetes, ``default`` for ``ctr``); ``container``: its name in its pod,
    else nerdctl's name; ``sandbox``: the pod's sandbox (pause) container,
    which holds the pod's namespaces."""

    runtime: str
    container_id: str
    namespace: str | None = None
    container: str | None = None
    pod_namespace: str | None = None
    pod_name: str | None = None
    pod_uid: str | None = None
    sandbox: bool = False


def parse_annotations(runtime: str, container_id: str, namespace: str | None,
                      annotations: Mapping[str, str]) -> RuntimeRecord:
    """The record in a bundle's annotations, containerd's CRI keys or
    CRI-O's, and nerdctl's name. Pure."""
    names: dict[str, str | None] = {k: annotations.get(v) for k, v in CRI_NAMES.items()}
    kind = annotations.get(CRI_TYPE)
    if runtime == "cri-o":
        labels: dict[str, str] = {}
        try:
            parsed = json.loads(annotations.get(CRIO_LABELS) or "{}")
            labels = {k: v for k, v in parsed.items() if isinstance(v, str)}
        except (ValueError, AttributeError):
            pass
        labels.update(annotations)
        names = {k: labels.get(v) for k, v in KUBELET_LABELS.items()}
        kind = annotations.get(CRIO_TYPE)
    if names["container"] is None:
        names["container"] = annotations.get(NERDCTL_NAME)
    return RuntimeRecord(runtime=runtime, container_id=container_id, namespace=namespace,
                         sandbox=kind == SANDBOX, **names)


def flag(argv: Sequence[str], *names: str) -> str | None:
    """The value of ``-flag VALUE`` or ``--flag=VALUE`` in an argv. Pure."""
    for i, arg in enumerate(argv):
        if arg in names and i + 1 < len(argv):
            return argv[i + 1]
        key, eq, value = arg.partition("=")
        if eq and key in names:
            return value
    return None


def _read_annotations(bundle: Path) -> dict[str, str] | None:
    try:
        with open(bundle / "config.json", "rb") as f:
            spec = json.loads(f.read(CONFIG_MAX))
    except (OSError, ValueError):
        return None
    found = spec.get("annotations") if isinstance(spec, dict) else None
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def _runtime_process(pid: int) -> psutil.Process | None:
    """The nearest ancestor of ``pid`` that is containerd's shim or conmon."""
    try:
        proc = psutil.Process(pid).parent()
        for _ in range(ANCESTORS_MAX):
            if proc is None or proc.pid <= 1:
                return None
            name = proc.name()
            if name.startswith("containerd-shim") or name == "conmon":
                return proc
            proc = proc.parent()
    except psutil.Error:
        return None
    return None


def _containerd(shim: psutil.Process, container_id: str | None) -> RuntimeRecord | None:
    argv = shim.cmdline()
    namespace, first = flag(argv, "-namespace", "--namespace"), flag(argv, "-id", "--id")
    if namespace is None or first is None:
        return None
    # A pod's shim serves all its containers; the cgroup names which one.
    for tasks in _tasks_of(shim.pid, namespace):
        for cid in (container_id, first):
            if cid and (found := _read_annotations(tasks / cid)) is not None:
                return parse_annotations("containerd", cid, namespace, found)
    return None


def _crio(conmon: psutil.Process) -> RuntimeRecord | None:
    argv = conmon.cmdline()
    cid = flag(argv, "-c", "--cid")
    bundle = flag(argv, "-b", "--bundle")
    if cid is None:
        return None
    for path in ([Path(bundle)] if bundle else []) + [CRIO_CONTAINERS / cid / "userdata"]:
        if (found := _read_annotations(path)) is not None:
            return parse_annotations("cri-o", cid, None, found)
    return None


def _tasks_of(shim: int, namespace: str) -> tuple[Path, ...]:
    """Where the task directory a shim serves may be read: through its cwd
    (ptrace access: not asked with access(2), which ignores a non-root
    caller's capabilities), then containerd's default place."""
    return Path(f"/proc/{shim}/cwd/.."), CONTAINERD_TASKS / namespace


def _task_dirs() -> list[tuple[Path, str]]:
    """Where each containerd namespace's task directory a running shim serves
    may be read (see _tasks_of), with the namespace."""
    found: dict[Path, tuple[tuple[Path, ...], str]] = {}
    for proc in psutil.process_iter(["name"]):
        try:
            if not (proc.info["name"] or "").startswith("containerd-shim"):
                continue
            namespace = flag(proc.cmdline(), "-namespace", "--namespace")
            if namespace is None:
                continue
            try:  # one entry per directory: a pod's shims share one
                key = Path(os.readlink(f"/proc/{proc.pid}/cwd")).parent
            except OSError:
                key = CONTAINERD_TASKS / namespace
            found.setdefault(key, (_tasks_of(proc.pid, namespace), namespace))
        except psutil.Error:
            continue
    return [(tasks, namespace) for ways, namespace in found.values() for tasks in ways]


def record_in(container_id: str, pod_uid: str | None) -> RuntimeRecord | None:
    """What containerd recorded of ``container_id`` when no process of it is
    left to start from (a process that failed and exited): its bundle in a
    running shim's task directory; once the runtime has removed that, its
    pod's sandbox record, which names the pod but not the container. CRI-O:
    its default bundle. None when nothing is found."""
    crio = _read_annotations(CRIO_CONTAINERS / container_id / "userdata")
    if crio is not None:
        return parse_annotations("cri-o", container_id, None, crio)
    dirs = _task_dirs()
    for tasks, namespace in dirs:
        if (found := _read_annotations(tasks / container_id)) is not None:
            return parse_annotations("containerd", container_id, namespace, found)
    for tasks, namespace in dirs if pod_uid else ():
        for bundle in tasks.iterdir() if tasks.is_dir() else ():
            found = _read_annotations(bundle)
            if found and found.get(CRI_TYPE) == SANDBOX \
                    and found.get(CRI_NAMES["pod_uid"]) == pod_uid:
                pod = parse_annotations("containerd", container_id, namespace, found)
                return dataclasses.replace(pod, container=None, sandbox=False)
    return None


def record_of(pid: int, container_id: str | None = None) -> RuntimeRecord | None:
    """What containerd or CRI-O recorded of the container ``pid`` runs in
    (``container_id``: its id as the cgroup names it, when it does); None
    when no runtime process is above it or its bundle cannot be read."""
    proc = _runtime_process(pid)
    if proc is None:
        return None
    try:
        if proc.name() == "conmon":
            return _crio(proc)
        return _containerd(proc, container_id)
    except psutil.Error:
        return None
