"""What may refuse a bind() besides the port rule (events.Policy): the cgroup
BPF programs that run on the process's bind() (their id, name, tag, hook, and
the cgroup each is attached at), the active LSMs and the process's LSM label,
and its seccomp mode.

Kernel facts (net/ipv4/af_inet.c: inet_bind_sk; net/ipv6/af_inet6.c:
inet6_bind_sk; kernel/bpf/cgroup.c: __cgroup_bpf_run_filter_sock_addr,
bpf_prog_run_array_cg):
- the cgroup's ``bind4``/``bind6`` programs run before any other check; one
  that returns 0 makes bind() fail with EPERM, or with the errno it set with
  ``bpf_set_retval`` (5.18+);
- ``post_bind4``/``post_bind6`` run after the port is taken, and a refusal
  gives the port back;
- the programs that run are the cgroup's effective ones (BPF_PROG_QUERY with
  BPF_F_QUERY_EFFECTIVE), its own and those inherited from its ancestors;
- systemd's ``SocketBindAllow=``/``SocketBindDeny=`` are such programs, named
  ``sd_bind4``/``sd_bind6``;
- an LSM refuses through security_socket_bind, with EACCES (SELinux
  name_bind, AppArmor network rules, Landlock's LANDLOCK_ACCESS_NET_BIND_TCP);
- a seccomp filter may answer bind() with any errno (kernel/seccomp.c), its
  rules not readable back without CAP_SYS_ADMIN and ptrace.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator

from portrace.events import CgroupProgram, Policy
from portrace.kernel.cgroups import cgroup2_mount

# include/uapi/linux/bpf.h: enum bpf_attach_type
HOOKS = {"inet": (("bind4", 8), ("post_bind4", 12)),
         "inet6": (("bind6", 9), ("post_bind6", 13))}
LSM_LIST = "/sys/kernel/security/lsm"  # securityfs, where it is mounted
SYS_LSM_LIST_MODULES = 461  # the unified syscall table (x86_64, arm64); 6.8+
LSM_IDS = {100: "capability", 101: "selinux", 102: "smack", 103: "tomoyo", 104: "apparmor",
           105: "yama", 106: "loadpin", 107: "safesetid", 108: "lockdown", 109: "bpf",
           110: "landlock", 111: "ima", 112: "evm", 113: "ipe"}  # include/uapi/linux/lsm.h


def unified_path(pid: int) -> str | None:
    """The process's cgroup in the unified hierarchy (its ``0::`` line)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return next((ln.split(":", 2)[2].rstrip("\n") for ln in f if ln.startswith("0::")),
                        None)
    except OSError:
        return None


def _ancestors(path: str) -> Iterator[str]:
    """``/a/b/c``, ``/a/b``, ``/a``, ``/``."""
    while True:
        yield path or "/"
        if path in ("", "/"):
            return
        path = path.rsplit("/", 1)[0]


def _query(directory: str, hook: int, effective: bool) -> list[int]:
    from portrace.kernel import libbpf  # ~10 ms: paid by a refused bind(), not at start-up

    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return libbpf.prog_ids(fd, hook, effective)
    finally:
        os.close(fd)


def bind_programs(pid: int, family: str) -> tuple[CgroupProgram, ...] | None:
    """The cgroup programs that run on a bind() of ``family`` by ``pid``; None
    when that cannot be read (no cgroup2, the process gone, no libbpf)."""
    mount, path = cgroup2_mount(), unified_path(pid)
    if mount is None or path is None:
        return None
    found = []
    try:
        for name, hook in HOOKS.get(family, ()):
            ids = _query(mount + path, hook, effective=True)
            where: dict[int, str] = {}
            for cg in _ancestors(path):
                if len(where) == len(ids):
                    break
                for i in _query(mount + cg.rstrip("/"), hook, effective=False) if cg != "/" \
                        else _query(mount, hook, effective=False):
                    where.setdefault(i, cg)
            for i in ids:
                info = _prog_info(i)
                if info is not None:
                    found.append(CgroupProgram(id=i, name=info[0], tag=info[1], hook=name,
                                               cgroup=where.get(i)))
    except (OSError, ImportError):  # libbpf.LibbpfMissing is an ImportError
        return None
    return tuple(found)


def _prog_info(prog_id: int) -> tuple[str, str] | None:
    from portrace.kernel import libbpf  # see _query

    return libbpf.prog_info(prog_id)


def _listed_lsms() -> tuple[str, ...]:
    """lsm_list_modules(2) (6.8+), where securityfs is not mounted."""
    libc = ctypes.CDLL(None, use_errno=True)
    ids = (ctypes.c_uint64 * 32)()
    size = ctypes.c_uint32(ctypes.sizeof(ids))
    n = libc.syscall(SYS_LSM_LIST_MODULES, ids, ctypes.byref(size), 0)
    return tuple(LSM_IDS.get(i, str(i)) for i in ids[:n]) if n > 0 else ()


def active_lsms() -> tuple[str, ...]:
    """The LSMs the kernel runs, in order (``lockdown``, ``capability``...):
    securityfs's list, or the kernel's answer to lsm_list_modules(2)."""
    try:
        with open(LSM_LIST) as f:
            return tuple(x for x in f.read().strip().split(",") if x)
    except OSError:
        return _listed_lsms()


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as name -> value; empty once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return {}


def _label(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/attr/current") as f:
            return f.read().strip("\x00\n ") or None
    except OSError:  # EINVAL: no LSM gives labels
        return None


def policy(pid: int, family: str) -> Policy:
    """What may refuse ``pid``'s bind() of ``family`` besides the port rule."""
    status = proc_status(pid)
    mode, filters = status.get("Seccomp"), status.get("Seccomp_filters")
    return Policy(cgroup_programs=bind_programs(pid, family), lsms=active_lsms(),
                  lsm_label=_label(pid),
                  seccomp=int(mode) if mode and mode.strip().isdigit() else None,
                  seccomp_filters=int(filters) if filters and filters.strip().isdigit()
                  else None)
