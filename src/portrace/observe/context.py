"""Facts about processes and the host, captured at the moment of a failure,
so a postmortem names the exact binaries and settings that were in play.

Everything here reads /proc (via psutil) and the executable itself; any
process may be gone by the time it is asked about, and then its facts are
simply absent.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import psutil
from elftools.common.exceptions import ELFError
from elftools.construct import ConstructError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection

from portrace.events import Owner, write
from portrace.kernel.engine import Holder
from portrace.observe import owners

MAX_PARENTS = 16
MAX_PROCESSES_LISTED = 16  # holders of one socket listed with their facts
# Processes whose facts are read for one failure: as many as a verdict lists
# (32 blockers of 16 holders each), however many processes hold the port.
MAX_FACT_PROCESSES = 512


@functools.lru_cache(maxsize=256)
def _build_id(dev: int, ino: int, mtime_ns: int, path: str) -> str | None:
    # Keyed by the file's identity, so an upgraded binary is read again.
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            for section in elf.iter_sections():
                if not isinstance(section, NoteSection):
                    continue
                for note in section.iter_notes():
                    if note["n_type"] == "NT_GNU_BUILD_ID":
                        return str(note["n_desc"])
    except (OSError, ELFError, ConstructError, ValueError, KeyError, IndexError):
        # Any executable may be hostile: malformed notes make pyelftools raise
        # construct's errors, not only ELFError.
        return None
    return None


def build_id(pid: int) -> str | None:
    """The GNU build-id (hex) of a process's executable, read from
    ``/proc/<pid>/exe`` (which works even if the file was replaced or deleted)."""
    path = f"/proc/{pid}/exe"
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _build_id(st.st_dev, st.st_ino, st.st_mtime_ns, path)


_LOOK_UP = object()


def process_facts(pid: int, owner: Any = _LOOK_UP) -> dict[str, Any] | None:
    """pid, comm, ppid chain, exe, cmdline, start time (ISO 8601 UTC), uid,
    cgroup, container id, owner and build-id; None when the process is gone.
    ``owner``: its Owner (or None) when the caller already looked it up
    (owners.of_holders), else it is looked up here."""
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            facts: dict[str, Any] = {
                "pid": pid,
                "comm": p.name(),
                "exe": _safe(p.exe),
                "cmdline": _safe(p.cmdline),
                "start": datetime.fromtimestamp(p.create_time(), tz=timezone.utc)
                .strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "uid": p.uids().real,
            }
            parents = []
            for parent in p.parents()[:MAX_PARENTS]:
                parents.append({"pid": parent.pid, "comm": _safe(parent.name)})
    except psutil.Error:
        return None
    facts["ppids"] = parents
    facts["cgroup"] = owners.cgroup_of(pid)
    if owner is _LOOK_UP:
        owner = owners.owner_of(pid, facts["comm"], facts["cgroup"], facts["cmdline"])
    # container_id stays for the contract's sake; owner names it and more
    facts["container_id"] = owner.container_id if owner else None
    facts["owner"] = write(owner) if owner else None
    facts["build_id"] = build_id(pid)
    return facts


def _safe(getter: Any) -> Any:
    try:
        return getter()
    except psutil.Error:
        return None


def host_facts() -> dict[str, str]:
    return {"hostname": socket.gethostname(), "kernel": os.uname().release}


def holder_facts(holders: Mapping[int, Sequence[Holder]],
                 belongs: Mapping[tuple[int, int], Owner]) -> dict[int, dict[str, Any] | None]:
    """pid -> process facts (exe, build-id...) of the holders a verdict may
    list: each socket's first MAX_PROCESSES_LISTED by pid (the order a blocker
    lists them in), read once per process however many sockets it holds, at
    most MAX_FACT_PROCESSES in all. Each holder's owner is the one already
    found (``belongs``), not looked up again."""
    owner_of = {pid: owner for (_inode, pid), owner in belongs.items()}
    facts: dict[int, dict[str, Any] | None] = {}
    for held in holders.values():
        for h in sorted(held, key=lambda h: h.pid)[:MAX_PROCESSES_LISTED]:
            if h.pid in facts:
                continue
            if len(facts) >= MAX_FACT_PROCESSES:
                return facts
            facts[h.pid] = process_facts(h.pid, owner=owner_of.get(h.pid))
    return facts
