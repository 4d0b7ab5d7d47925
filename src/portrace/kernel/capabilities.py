"""What portrace needs of the kernel's privileges, capability by capability
(kernels 5.8+: CAP_BPF and CAP_PERFMON split from CAP_SYS_ADMIN), and the check
made before anything is loaded. Root is not needed: a uid with these in its
effective set (``AmbientCapabilities=`` in a unit, a container's ``add:``)
runs every command. Each capability is named with what it is used for, so a
refusal says which one is missing and what it would have done."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from portrace import errors


@dataclass(frozen=True)
class Capability:
    """One capability: its number (include/uapi/linux/capability.h), what
    portrace does with it, and which engines cannot run without it
    (``required_by``); the others lose only ``without``."""

    name: str
    number: int
    used_for: str
    required_by: tuple[str, ...]
    without: str = ""


CAPABILITIES = (
    Capability("CAP_BPF", 39, "load the probes and read their maps (kernel/bpf/syscall.c: "
               "bpf_prog_load, map_lookup_elem)", ("core", "bcc")),
    Capability("CAP_PERFMON", 38, "load tracing programs and attach them to tracepoints "
               "(kernel/bpf/syscall.c: bpf_prog_load; kernel/events/core.c: perf_event_open)",
               ("core", "bcc")),
    Capability("CAP_DAC_READ_SEARCH", 2, "read tracefs (mode 0700) for tracepoint ids, and "
               "open a socket's cgroup by its id (fs/fhandle.c: open_by_handle_at)",
               ("core", "bcc")),
    Capability("CAP_SYS_PTRACE", 19, "read other users' processes: /proc/PID/exe, "
               "ns/net and (bcc) every /proc/PID/fd (kernel/ptrace.c: ptrace_may_access)",
               ("bcc",), "processes' executables and build-ids are not named"),
    Capability("CAP_NET_ADMIN", 12, "list the cgroup BPF programs on a bind() "
               "(kernel/bpf/syscall.c: bpf_prog_query) and destroy sockets on request "
               "(sock_diag, `ss -K`)", (), "a cgroup program's EPERM is not named"),
    Capability("CAP_SYS_ADMIN", 21, "enter another network namespace to look up a failure "
               "there (kernel/nsproxy.c: setns, net/core/net_namespace.c: netns_install)",
               (), "failures in network namespaces other than portrace's own (a pod "
               "without hostNetwork) are reported without their blockers"),
)
BY_NAME = {c.name: c for c in CAPABILITIES}


def effective() -> int:
    """The calling thread's effective capability set (/proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


class _CapHeader(ctypes.Structure):
    """include/uapi/linux/capability.h: struct __user_cap_header_struct."""

    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


CAPABILITY_VERSION_3 = 0x20080522  # two _CapData: capabilities 0-31, 32-63


def raise_permitted() -> None:
    """Make every permitted capability effective. A non-root process in a
    container gets none at exec unless its executable carries them as file
    capabilities (security/commoncap.c: cap_bprm_creds_from_file; Kubernetes
    has no ambient capabilities); portrace's image grants them permitted
    only, so that one the container withholds is named by :func:`require`
    instead of failing the exec with EPERM. Does nothing where nothing is
    gained or the call is refused."""
    libc = ctypes.CDLL(None, use_errno=True)
    header = _CapHeader(CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        return
    if all(d.effective == d.permitted for d in data):
        return
    for d in data:
        d.effective = d.permitted
    libc.capset(ctypes.byref(header), data)


def held(name: str, caps: int | None = None) -> bool:
    """Whether capability ``name`` is in ``caps`` (default: effective)."""
    return bool((effective() if caps is None else caps) >> BY_NAME[name].number & 1)


def missing(engine: str, caps: int | None = None) -> list[Capability]:
    """The capabilities ``engine`` cannot run without, of those not held.
    CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON (before 5.8 it was
    the only way; kernel/bpf/syscall.c: bpf_capable, perfmon_capable)."""
    have = effective() if caps is None else caps
    admin = held("CAP_SYS_ADMIN", have)
    return [c for c in CAPABILITIES if engine in c.required_by and not held(c.name, have)
            and not (admin and c.name in ("CAP_BPF", "CAP_PERFMON"))]


def lacking(caps: int | None = None) -> list[Capability]:
    """The capabilities no engine needs to start, of those not held: each
    costs ``without``."""
    have = effective() if caps is None else caps
    return [c for c in CAPABILITIES if c.without and not held(c.name, have)]


def require(engine: str) -> None:
    """Raises, when ``engine`` lacks a capability it cannot run without, one
    line naming each and what the first is for: NeedsRoot for a user that is
    not root, BpfUnavailable for root whose set was cut (a container, a
    bounding set)."""
    gone = missing(engine)
    if not gone:
        return
    names = " ".join(c.name for c in gone)
    all_of = " ".join(c.name for c in CAPABILITIES if engine in c.required_by)
    paranoid = _paranoid() if "CAP_PERFMON" in names else None
    sysctl = (f"; kernel.perf_event_paranoid is {paranoid}, which only CAP_PERFMON "
              "passes (kernel/events/core.c: perf_allow_kernel)") \
        if paranoid is not None and paranoid > 1 else ""
    if os.geteuid() == 0:
        raise errors.BpfUnavailable(
            f"root, but without {names} (to {gone[0].used_for}): a container or "
            f"capability bounding set dropped it; the {engine} engine needs {all_of}{sysctl}")
    raise errors.NeedsRoot(
        f"without {names} (to {gone[0].used_for}): run as root, or with {all_of} "
        f"(README, \"Least privilege\"){sysctl}")


def _paranoid() -> int | None:
    try:
        with open("/proc/sys/kernel/perf_event_paranoid") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None
