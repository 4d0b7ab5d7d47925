"""The failing socket's own address, for a bind() refused with EINVAL: read
through a duplicate of the process's fd (pidfd_getfd, Linux 5.6+) and
getsockname(). The duplicate is closed at once; like a readlink of
/proc/PID/fd it holds the file for microseconds, so this runs at failure time
only (an EINVAL bind(), never a successful one)."""

from __future__ import annotations

import ctypes
import os
import socket

from portrace.events import Endpoint

SYS_PIDFD_GETFD = 438  # the same on x86_64 and arm64 (the unified syscall table)


def bound_address(pid: int, fd: int) -> Endpoint | None:
    """The local address of process ``pid``'s socket ``fd``; None when the
    process or the fd is gone, or it is not an inet socket."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        dup = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if dup < 0:
            return None
        with socket.socket(fileno=dup) as s:
            if s.family not in (socket.AF_INET, socket.AF_INET6):
                return None
            name = s.getsockname()
        return Endpoint(str(name[0]), int(name[1]))
    except OSError:
        return None
    finally:
        os.close(pidfd)
