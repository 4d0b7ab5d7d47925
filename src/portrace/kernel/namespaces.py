"""Network namespaces as portrace meets them: the failing thread's (by pid, or
by the inode the kernel reported), entered for a lookup, named as ``ip netns``
names them, and the sysctls as one sees them (the ``net.*`` ones are per netns).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import threading
from collections.abc import Iterable, Iterator

import psutil

from portrace.events import Netns

NETNS_NAMES = "/run/netns"  # where `ip netns add` pins named namespaces


def pinned() -> Iterator[str]:
    """The paths of the namespaces pinned under /run/netns (``ip netns add``)."""
    try:
        with os.scandir(NETNS_NAMES) as it:
            yield from (e.path for e in it)
    except OSError:
        return


def netns_name(inode: int) -> str | None:
    """The ``ip netns`` name of a namespace, if it has one."""
    for path in pinned():
        try:
            if os.stat(path).st_ino == inode:
                return os.path.basename(path)
        except OSError:
            continue
    return None


def _thread_netns(pid: int, tid: int) -> tuple[str, str]:
    """The failing thread's namespace, then its process's."""
    return f"/proc/{pid}/task/{tid}/ns/net", f"/proc/{pid}/ns/net"


def open_netns(pid: int, tid: int) -> tuple[int | None, Netns]:
    """An fd on the failing thread's network namespace, or None and portrace's
    own namespace when the thread is already gone (the caller closes the fd)."""
    for path in _thread_netns(pid, tid):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        inode = os.fstat(fd).st_ino
        return fd, Netns(inode=inode, source="process", name=netns_name(inode))
    inode = os.stat("/proc/self/ns/net").st_ino
    return None, Netns(inode=inode, source="tracer", name=netns_name(inode))


def open_netns_inode(inode: int, pid: int, tid: int) -> tuple[int | None, Netns]:
    """An fd on the network namespace whose inode the kernel reported for a
    failing thread (CO-RE engine). Tried in order: the thread itself, a name
    under /run/netns, any process in it. ``source`` says which: ``process``,
    ``pinned`` or ``member``; ``gone`` (and no fd) when nothing holds the
    namespace any more, so its sockets cannot be looked up (the caller closes
    the fd)."""
    for source, paths in (("process", _thread_netns(pid, tid)), ("pinned", pinned()),
                          ("member", _members())):
        for path in paths:
            try:
                if os.stat(path).st_ino != inode:
                    continue
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            if os.fstat(fd).st_ino == inode:
                return fd, Netns(inode=inode, source=source, name=netns_name(inode))
            os.close(fd)
    return None, Netns(inode=inode, source="gone", name=None)


def _members() -> Iterator[str]:
    for pid in psutil.pids():
        yield f"/proc/{pid}/ns/net"


CLONE_NEWNET = 0x40000000  # include/uapi/linux/sched.h


def _setns(fd: int) -> None:
    """setns(2) for the calling thread only (os.setns is Python 3.12+)."""
    if hasattr(os, "setns"):
        os.setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(netns_fd: int | None) -> Iterator[None]:
    """Run the body with this thread in ``netns_fd`` (None: stay where we are).
    The thread's own namespace is not entered again: setns() needs
    CAP_SYS_ADMIN (kernel/nsproxy.c: validate_nsset, net/core/net_namespace.c:
    netns_install), which a failure in the tracer's own namespace does not.
    Raises OSError if the namespace cannot be entered."""
    if netns_fd is None:
        yield
        return
    if is_own(netns_fd):
        yield
        return
    home = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        _setns(netns_fd)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def is_own(netns_fd: int) -> bool:
    """Whether ``netns_fd`` is the calling thread's own network namespace."""
    there = os.fstat(netns_fd)
    here = os.stat(f"/proc/self/task/{threading.get_native_id()}/ns/net")
    return (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino)


def _read_sysctl(name: str) -> str | None:
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return f.read().strip()
    except OSError:
        return None


def read_sysctls(names: Iterable[str]) -> dict[str, str]:
    """The named sysctls as the calling thread's namespace sees them (the
    ``net.*`` ones are per netns), those that exist."""
    return {name: v for name in names if (v := _read_sysctl(name)) is not None}


def run_in(netns: Netns, pid: int | None) -> str:
    """The command prefix that runs a command in ``netns``: nothing for
    portrace's own namespace, ``ip netns exec NAME`` for a named one, else
    ``nsenter`` through a process in it."""
    if netns.inode == os.stat("/proc/self/ns/net").st_ino:
        return ""
    if netns.name:
        return f"ip netns exec {shlex.quote(netns.name)} "
    return f"nsenter --net=/proc/{pid}/ns/net " if pid else ""
