"""The unified (v2) cgroup hierarchy, read by cgroup id: where it is mounted,
and the processes of one cgroup. A socket keeps the cgroup of the task that
created it (net/core/sock.c: sk_alloc -> cgroup_sk_alloc), so its holders
are most likely there: the CO-RE engine walks those processes' fds before the
host's (portrace.kernel.core)."""

from __future__ import annotations

import ctypes
import functools
import os

FILEID_KERNFS = 0xFE  # include/linux/exportfs.h: a kernfs node's 64-bit id is its handle


class _KernfsHandle(ctypes.Structure):
    """include/uapi/linux/fcntl.h: struct file_handle with a kernfs node id."""

    _fields_ = [("handle_bytes", ctypes.c_uint32), ("handle_type", ctypes.c_int32),
                ("id", ctypes.c_uint64)]


# The process's own symbols include libc's: no ldconfig run (find_library) at import.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]


@functools.cache
def cgroup2_mount() -> str | None:
    """Where the unified (v2) hierarchy is mounted, from our mountinfo."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split()[4]
    except OSError:
        return None
    return None


def _open(cgroup_id: int) -> tuple[int, str] | None:
    """The v2 cgroup ``cgroup_id`` (the id BPF reads as ``cgroup->kn->id``)
    opened by its kernfs handle (fs/kernfs/mount.c: kernfs_fh_to_dentry;
    needs CAP_DAC_READ_SEARCH), with the mount it was opened under. None when
    there is no cgroup2 mount or the cgroup is gone."""
    mount = cgroup2_mount()
    if mount is None or not cgroup_id:
        return None
    try:
        mount_fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        handle = _KernfsHandle(handle_bytes=8, handle_type=FILEID_KERNFS, id=cgroup_id)
        fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(handle),
                                     os.O_RDONLY | os.O_DIRECTORY)
    finally:
        os.close(mount_fd)
    return None if fd < 0 else (fd, mount)


def procs(cgroup_id: int) -> list[int] | None:
    """The processes in the v2 cgroup ``cgroup_id``; None when it cannot be
    opened (see _open)."""
    opened = _open(cgroup_id)
    if opened is None:
        return None
    fd, _mount = opened
    try:
        try:
            procs_fd = os.open("cgroup.procs", os.O_RDONLY, dir_fd=fd)
        finally:
            os.close(fd)
        with os.fdopen(procs_fd) as f:
            return [int(line) for line in f]
    except (OSError, ValueError):
        return None


def path(cgroup_id: int) -> str | None:
    """The v2 cgroup ``cgroup_id``'s path below the mount, as /proc/PID/cgroup
    writes it (``/kubepods/besteffort/pod<uid>/<id>``): it names a process's
    container after the process has exited, while the cgroup lives. None when
    it cannot be opened (see _open)."""
    opened = _open(cgroup_id)
    if opened is None:
        return None
    fd, mount = opened
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    finally:
        os.close(fd)
    if where == mount:
        return "/"
    return where[len(mount):] if where.startswith(mount + "/") else None
