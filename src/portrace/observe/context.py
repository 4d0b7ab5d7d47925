"""Facts about processes and the host, captured at the moment of a failure,
so a postmortem names the exact binaries and settings that were in play.

Everything here reads /proc (via psutil) and the executable itself; any
process may be gone by the time it is asked about, and then its facts are
simply absent.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
from datetime import datetime, timezone
from typing import Any

import psutil
from elftools.common.exceptions import ELFError
from elftools.construct import ConstructError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection

from portrace.events import Blocker, ProcessRef, write
from portrace.observe import owners

MAX_PARENTS = 16
MAX_PROCESSES_LISTED = 16  # holders of one socket listed with their facts


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


def with_facts(blockers: list[Blocker]) -> tuple[Blocker, ...]:
    """Blockers whose holders carry their process facts (exe, build-id...),
    read once per process however many sockets it holds, for at most
    MAX_PROCESSES_LISTED holders of one socket. Each holder's owner is the
    one the judging already has (ProcessRef.owner), not looked up again."""
    facts: dict[int, dict[str, Any] | None] = {}

    def of(p: ProcessRef) -> dict[str, Any] | None:
        if p.pid not in facts:
            facts[p.pid] = process_facts(p.pid, owner=p.owner)
        return facts[p.pid]

    return tuple(
        dataclasses.replace(
            b, processes=tuple(dataclasses.replace(p, facts=of(p))
                               for p in b.processes[:MAX_PROCESSES_LISTED]),
            processes_total=len(b.processes) if len(b.processes) > MAX_PROCESSES_LISTED
            else None)
        for b in blockers)
