"""Who a process belongs to, named as an operator names it: its systemd unit,
its container and Kubernetes pod, and what the special holders stand for
(systemd holding a socket-activated port, ``docker-proxy`` forwarding one).

Parsing (cgroup paths, argv) is pure; reading /proc, a runtime's API socket
and ``systemctl`` is done by :func:`owner_of` and may find nothing, which is
said as nothing, never guessed.

Cgroup names, as systemd and the runtimes make them:
- systemd: ``/system.slice/checkout.service``; a user's manager
  ``/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service``;
  ``session-3.scope`` for a login session.
- systemd cgroup driver: ``docker-<id>.scope``, ``libpod-<id>.scope``
  (podman), ``cri-containerd-<id>.scope``, ``crio-<id>.scope``; pods in
  ``kubepods[-<qos>]-pod<uid with _ for ->.slice``.
- cgroupfs driver: ``/docker/<id>``, ``/kubepods/<qos>/pod<uid>/<id>``.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from portrace.events import Endpoint, Owner, Pod
from portrace.kernel.engine import Holder, SocketEntry
from portrace.observe import runtimes

ID = r"[0-9a-f]{64}"
SCOPES = (  # systemd cgroup driver: <prefix><id>.scope
    ("docker-", "docker"), ("libpod-", "podman"), ("cri-containerd-", "containerd"),
    ("crio-", "cri-o"), ("containerd-", "containerd"))
CGROUPFS = {"docker": "docker", "libpod_parent": "podman", "machine.slice": "podman"}
POD_SLICE = re.compile(r"^kubepods(?:-[a-z]+)*-pod([0-9a-f_]{36})\.slice$")
POD_DIR = re.compile(r"^pod([0-9a-f-]{36})$")
UNIT = re.compile(r"^[^/]+\.(service|scope|socket|mount|swap|timer|path)$")
# Runtimes' API sockets that speak the Docker Engine API (podman's too), after
# those the runtimes' own variables name (unix:// only).
API_SOCKETS = (("docker", "/run/docker.sock"), ("podman", "/run/podman/podman.sock"))
API_VARIABLES = (("docker", "DOCKER_HOST"), ("podman", "CONTAINER_HOST"))
API_TIMEOUT_S = 0.5
DOCKER_NAMESPACE = "moby"  # containerd's namespace for Docker Engine's containers
# The kubelet's labels a Docker-compatible API gives back, as (pod namespace,
# pod name, container name): the same keys CRI-O records (runtimes).
K8S_LABELS = tuple(runtimes.KUBELET_LABELS[k] for k in ("pod_namespace", "pod_name", "container"))


def cgroup_of(pid: int) -> str | None:
    """A process's cgroup path: the unified (v2) line ``0::/path``, or on a
    hybrid host without one, systemd's ``name=systemd`` hierarchy."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    path = next((ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")), None)
    if path in (None, "/"):
        path = next((ln.split(":", 2)[2] for ln in lines if ":name=systemd:" in ln), path)
    return path


def cmdline_of(pid: int) -> list[str] | None:
    """A process's argv, None when it is gone or unreadable."""
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return None



@dataclass(frozen=True)
class CgroupNames:
    """What a cgroup path names: a systemd unit (``user``: in a user's
    manager), a container id and its runtime, a pod uid."""

    unit: str | None = None
    user: bool = False
    container_id: str | None = None
    runtime: str | None = None
    pod_uid: str | None = None


def parse_cgroup(path: str) -> CgroupNames:
    """The names in a cgroup v2 (or name=systemd) path. Pure."""
    parts = [p for p in path.split("/") if p]
    unit, user, cid, runtime, pod = None, False, None, None, None
    for i, part in enumerate(parts):
        for prefix, rt in SCOPES:
            m = re.fullmatch(re.escape(prefix) + f"({ID})\\.scope", part)
            if m:
                cid, runtime = m.group(1), rt
                break
        else:
            if re.fullmatch(ID, part):
                cid = part
                runtime = next((rt for p, rt in CGROUPFS.items() if p in parts[:i]),
                               runtime or ("kubernetes" if pod else None))
            elif (m := POD_SLICE.match(part)) or (m := POD_DIR.match(part)):
                pod = m.group(1).replace("_", "-")
            elif UNIT.match(part) and cid is None:
                if re.fullmatch(r"user@\d+\.service", part):
                    user, unit = True, None  # the manager itself; its units follow
                else:
                    unit = part
    if cid is not None and unit is not None and unit.endswith(".scope"):
        unit = None  # a runtime's scope around the container, not a unit anyone names
    return CgroupNames(unit=unit, user=user and unit is not None, container_id=cid,
                       runtime=runtime, pod_uid=pod)


def parse_docker_proxy(argv: Sequence[str]) -> tuple[Endpoint, int | None] | None:
    """``docker-proxy -proto tcp -host-ip 0.0.0.0 -host-port 8080
    -container-ip 172.17.0.2 -container-port 80``: the container end it
    forwards to, and the host port; None for any other argv. Pure."""
    if not argv or argv[0].rsplit("/", 1)[-1] != "docker-proxy":
        return None
    flags: dict[str, str] = {}
    for flag, value in zip(argv[1:], argv[2:]):
        if flag.startswith("-"):
            flags[flag.lstrip("-")] = value
    try:
        end = Endpoint(flags["container-ip"], int(flags["container-port"]))
    except (KeyError, ValueError):
        return None
    host = flags.get("host-port")
    return end, int(host) if host and host.isdigit() else None


ACTIVATE_VALUES = {"-l", "--listen", "-E", "--setenv", "--fdname"}  # options taking a value


def parse_socket_activate(argv: Sequence[str]) -> str | None:
    """``systemd-socket-activate -l 9090 [-a] CMD ARGS``: the command it
    starts on the first connection (passing the listening fd); None for any
    other argv. Pure."""
    if not argv or argv[0].rsplit("/", 1)[-1] != "systemd-socket-activate":
        return None
    rest = list(argv[1:])
    while rest and rest[0].startswith("-"):
        flag = rest.pop(0)
        if flag == "--":
            break
        if flag in ACTIVATE_VALUES and rest:
            rest.pop(0)
    return " ".join(rest) or None


def parse_list_sockets(text: str) -> dict[str, str]:
    """``systemctl list-sockets --all --full --no-legend --no-pager`` ->
    listen address (as systemd prints it: ``0.0.0.0:9090``, ``[::]:9090``,
    ``/run/x.sock``) -> socket unit. Pure."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1].endswith(".socket"):
            out[fields[0]] = fields[1]
    return out


def socket_unit(local: Endpoint, systemctl: str | None = None) -> str | None:
    """The ``.socket`` unit systemd (pid 1) listens on ``local`` for, asked of
    ``systemctl list-sockets``; None when systemd does not say."""
    exe = systemctl or shutil.which("systemctl")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "list-sockets", "--all", "--full", "--no-legend",
                               "--no-pager"], capture_output=True, text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return None
    units = parse_list_sockets(done.stdout) if done.returncode == 0 else {}
    wild = "[::]" if ":" in local.addr else "0.0.0.0"
    for addr in (str(local), f"{wild}:{local.port}", f"*:{local.port}", str(local.port)):
        if addr in units:
            return units[addr]
    return None


def _api_get(path: str, api_socket: str) -> Any:
    """GET a Docker Engine API path over a UNIX socket; None when the
    runtime is not there or does not answer in API_TIMEOUT_S."""

    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(API_TIMEOUT_S)
            self.sock.connect(api_socket)

    conn = Conn("localhost", timeout=API_TIMEOUT_S)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        if resp.status != 200:
            return None
        return json.loads(resp.read(1 << 20))
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()


def api_sockets() -> tuple[tuple[str, str], ...]:
    """(runtime, UNIX socket path) to ask, in order: $DOCKER_HOST and
    $CONTAINER_HOST where they are unix:// URLs, then the default paths."""
    named = tuple((rt, os.environ[var][len("unix://"):]) for rt, var in API_VARIABLES
                  if os.environ.get(var, "").startswith("unix://"))
    return named + API_SOCKETS


@functools.lru_cache(maxsize=256)
def container_names(cid: str, sockets: tuple[tuple[str, str], ...]
                    ) -> tuple[str | None, tuple[str | None, ...]]:
    """(name, (pod namespace, pod name, container name in the pod)) of a
    container, from the first runtime API socket that knows it."""
    for _runtime, path in sockets:
        info = _api_get(f"/containers/{cid}/json", path)
        if isinstance(info, dict):
            labels = (info.get("Config") or {}).get("Labels") or {}
            name = str(info.get("Name") or "").lstrip("/") or None
            return name, tuple(labels.get(k) for k in K8S_LABELS)
    return None, (None, None, None)


def container_at(addr: str, sockets: tuple[tuple[str, str], ...]) -> str | None:
    """The name of the container with this IP address, from a runtime's API."""
    for _runtime, path in sockets:
        listing = _api_get("/containers/json", path)
        for c in listing if isinstance(listing, list) else ():
            nets = ((c.get("NetworkSettings") or {}).get("Networks") or {}).values()
            if any(n.get("IPAddress") == addr for n in nets if isinstance(n, dict)):
                names = c.get("Names") or []
                return str(names[0]).lstrip("/") if names else str(c.get("Id", ""))[:12]
    return None


def _containers(names: CgroupNames, record: runtimes.RuntimeRecord | None
                ) -> dict[str, Any]:
    """The Owner fields of a container and its pod: from the runtime's record
    when there is one, else from a Docker-compatible API by the cgroup's id.
    Docker's containers live in containerd's ``moby`` namespace, whose records
    carry no names: Docker's API names them."""
    if record is not None and record.namespace == DOCKER_NAMESPACE:
        record = None
    if record is not None:  # the runtime's own record: no API needed
        pod = None
        if record.pod_name or record.pod_uid or names.pod_uid:
            pod = Pod(namespace=record.pod_namespace, name=record.pod_name,
                      uid=record.pod_uid or names.pod_uid, container=record.container)
        return {"container_id": record.container_id, "runtime": record.runtime,
                "container": None if pod else record.container, "pod": pod,
                "runtime_namespace": record.namespace, "sandbox": record.sandbox}
    name, pod = None, None
    if names.container_id is not None:
        name, (ns, pod_name, in_pod) = container_names(names.container_id, api_sockets())
        if names.pod_uid or pod_name:
            pod = Pod(namespace=ns, name=pod_name, uid=names.pod_uid, container=in_pod)
    return {"container_id": names.container_id, "runtime": names.runtime, "container": name,
            "pod": pod}


def owner_of(pid: int, comm: str, cgroup: str | None, argv: Sequence[str] | None,
             local: Endpoint | None = None) -> Owner | None:
    """The unit, container and pod of a process, and what it stands for when
    it is systemd holding a socket-activated ``local`` or a docker-proxy;
    None when nothing names it. A container's names come from its runtime's
    own record (containerd, CRI-O: portrace.observe.runtimes) where one is
    above the process, else from a Docker-compatible API."""
    names = parse_cgroup(cgroup or "")
    # Only a cgroup that may be a container's is worth a walk up the process
    # tree (a failure's own process is named at every failure): not the root
    # cgroup, not a systemd unit's.
    maybe = names.container_id is not None or (names.unit is None and cgroup not in (None, "/"))
    record = runtimes.record_of(pid, names.container_id) if maybe else None
    if record is None and names.container_id is not None and names.pod_uid is not None:
        # Gone while its parents were read (a container's entrypoint failing):
        # its runtime's record by the ids its cgroup gives.
        record = runtimes.record_in(names.container_id, names.pod_uid)
    containers = _containers(names, record)
    activates = None
    if local is not None and comm == "systemd" and pid == 1:
        activates = socket_unit(local)
    elif local is not None:
        activates = parse_socket_activate(argv or ())
    forwards = parse_docker_proxy(argv or ())
    forwards_to = None
    if forwards is not None:
        end, _host = forwards
        forwards_to = (end, container_at(end.addr, api_sockets()))
    owner = Owner(unit=names.unit, user_unit=names.user, **containers, activates=activates,
                  forwards_to=forwards_to[0] if forwards_to else None,
                  forwards_to_container=forwards_to[1] if forwards_to else None)
    return None if owner == Owner() else owner


def owner_of_cgroup(cgroup: str) -> Owner | None:
    """The unit, container and pod a cgroup path names, for a process that
    is gone: its runtime's record found by the container id (runtimes.record_in),
    else a Docker-compatible API. None when nothing names it."""
    names = parse_cgroup(cgroup)
    record = runtimes.record_in(names.container_id, names.pod_uid) \
        if names.container_id else None
    owner = Owner(unit=names.unit, user_unit=names.user, **_containers(names, record))
    return None if owner == Owner() else owner


def of_holders(socks: Sequence[SocketEntry], holders: Mapping[int, Sequence[Holder]]
               ) -> dict[tuple[int, int], Owner]:
    """(socket inode, pid) -> the Owner of each holder of these sockets. Each
    process's cgroup and argv are read once; systemd and
    systemd-socket-activate are asked about each socket they hold."""
    found: dict[tuple[int, int], Owner] = {}
    read: dict[int, tuple[str | None, list[str] | None]] = {}
    for s in socks:
        for h in holders.get(s.inode, ()) if s.inode else ():
            if h.pid not in read:
                read[h.pid] = (cgroup_of(h.pid), cmdline_of(h.pid))
            cgroup, argv = read[h.pid]
            owner = _owner_cached(h.pid, h.comm, cgroup, tuple(argv or ()),
                                  s.local if _special(h.pid, h.comm, argv) else None)
            if owner is not None:
                found[(s.inode, h.pid)] = owner
    return found


def _special(pid: int, comm: str, argv: Sequence[str] | None) -> bool:
    """Holders whose owner depends on the socket: systemd, socket activators."""
    return (comm == "systemd" and pid == 1) or parse_socket_activate(argv or ()) is not None


@functools.lru_cache(maxsize=1024)
def _owner_cached(pid: int, comm: str, cgroup: str | None, argv: tuple[str, ...],
                  local: Endpoint | None) -> Owner | None:
    return owner_of(pid, comm, cgroup, argv, local)
