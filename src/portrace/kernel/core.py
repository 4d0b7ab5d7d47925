"""The CO-RE engine: load ``bpf/core.bpf.o`` through libbpf and read the
kernel's own socket state.

- Failures arrive with the failing socket's options, owner uid, protocol,
  inode and own port range read from its ``struct sock``, and the thread's
  netns inode (bpf/core.bpf.c: emit_call), exact even when the socket
  predates portrace or the process exits at once.
- At failure time the port's sockets come from BPF iterators run inside the
  failing namespace: ``iter/tcp`` (minisocks with their own flags and timers),
  ``iter/udp``, and ``iter/task_file`` for every (process, fd) holding one,
  bound-only sockets included. No ``/proc/PID/fd`` is read.
- Who bound, listened or closed a socket, and the last transitions per port,
  stay in kernel maps and are read here on demand.

Records are decoded with the layout read from the object's own BTF.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import os
import re
import socket
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from portrace import errors
from portrace.events import (
    FAMILIES,
    PROTOCOLS,
    Closer,
    Endpoint,
    SnapshotSource,
    SockOpts,
    StateChange,
    Task,
    tcp_state_name,
)
from portrace.kernel import capabilities, cgroups, engine, header, libbpf, namespaces
from portrace.kernel.btf import BtfError
from portrace.kernel.records import (
    PT_OPT_ALL,
    PT_STATE,
    MonotonicClock,
    addr_text,
    decode_event,
    decode_state,
    decode_task,
    fill_tuple,
    opts_of,
)

TRACEPOINTS = ("sock/inet_sock_set_state",) + tuple(
    f"syscalls/sys_{edge}_{call}" for call in ("bind", "listen", "connect")
    for edge in ("enter", "exit"))
# The calls' probes, one set attached: fexit where the kernel has BPF
# trampolines, else the syscall tracepoints (bpf/core.bpf.c says why).
SYSCALL_PROGRAMS = ("bind_enter", "bind_exit", "listen_enter", "listen_exit", "connect_enter",
                    "connect_exit")
FEXIT = ("bind_fexit", "listen_fexit", "connect_fexit")
PROGRAMS = ("set_state",)  # always attached
ITERATORS = {"tcp": "iter_tcp", "udp": "iter_udp", "holders": "iter_task_file"}
WALK = "walk_port"  # the port's own hash bucket, run by BPF_PROG_TEST_RUN
# Programs the engine can do without, by what they give: loaded only where
# the kernel takes them (a refused one is left out and the load retried).
OPTIONAL = {"walk": (WALK,), "fexit": FEXIT}
WALK_SOURCE = {"tcp": "bind_hash", "udp": "udp_hash"}  # SnapshotSource.sockets
WALK_TABLE = {"tcp": "bind hash", "udp": "per-netns udp_table (Linux 6.2+)"}
# Processes of one socket's cgroup whose fds are walked before the host's:
# a cgroup with more (the root cgroup of a host without systemd) is the host.
CGROUP_PROCS_MAX = 64
FOUND_CAP = 16384  # sockets one walk returns; a port with more is listed by the iterators
WALK_STEPS = 4 * FOUND_CAP  # list nodes one walk visits: sockets plus the port's buckets
WALK_STATUS = header.enum("pt_walk")
WALK_WHY = {
    WALK_STATUS["PT_WALK_NO_LAYOUT"]: "this kernel's {table} has no layout the walk reads",
    WALK_STATUS["PT_WALK_STEP_CAP"]: "the port's bucket holds more than {steps} list nodes",
    WALK_STATUS["PT_WALK_FULL"]: "more than {cap} sockets on the port",
    WALK_STATUS["PT_WALK_FAULT"]: "the bucket changed under the walk twice",
}
LOG_DIR = Path("/run/portrace")  # root-only: the verifier's log of a refused load
FEXIT_REFUSED = LOG_DIR / "fexit-refused"  # boot id, then why: fexit is not tried again
PAGE = 4096


class CoreEngine:
    """The CO-RE engine for a set of ports (empty: every port, failures only).

    ``states``: stream transitions to ``on_event`` (they are kept in the kernel
    either way). Raises from :meth:`open` the errors of ``engine.require_tracing``,
    NoLibbpf, and CoreLoadFailed when the kernel refuses the object.
    """

    name = "core"

    def __init__(self, ports: Iterable[int], on_event: Callable[[Any], None],
                 ringbuf_pages: int = 64, states: bool = True, attach: bool = True,
                 walk: bool = True, walk_steps: int = WALK_STEPS) -> None:
        self.ports = sorted(set(ports))
        self.attach = attach  # False: only the iterators (portrace check), nothing attached
        self.on_event = on_event
        self.ringbuf_pages = ringbuf_pages
        self.states = states
        self.clock = MonotonicClock()
        self._obj: libbpf.BpfObject | None = None
        self._rb = 0
        self._iters: dict[str, int] = {}
        self._budget = engine.PollBudget()
        # walk=False: the iterators alone (the path this engine had before
        # walk_port, kept as the benchmarks' anchor and the tests' reference).
        self.walk = walk
        self.walk_steps = walk_steps
        # OPTIONAL groups left out, and why: "walk" (then the iterators answer),
        # "fexit" (then the syscall tracepoints see the calls).
        self.off: dict[str, str] = {}
        # The binders read for the last snapshot's sockets, by struct sock:
        # one map read per socket per diagnosis, not one per asker.
        self._owners_read: dict[int, Task | None] = {}
        self.probes = ""  # once attached: "fexit" or "tracepoints"
        self._found: libbpf.Map | None = None

    def open(self) -> None:
        if self.attach:
            engine.require_tracing(TRACEPOINTS, "core")
        else:
            capabilities.require("core")
        path = str(engine.core_object())
        try:
            obj = self._obj = self._load(path)
            self.event_t = obj.btf.layout("pt_event")
            self.sock_t = obj.btf.layout("pt_sock")
            self.query_t = obj.btf.layout("pt_query")
            self.task_t = obj.btf.layout("pt_task")
            self.tuple_t = obj.btf.layout("pt_tuple")
            self.recent_t = obj.btf.layout("pt_recent")
            if "walk" not in self.off:
                self._found = obj.map("found")
            watched = obj.map("watched_ports")
            for port in self.ports:
                watched.update(ctypes.c_uint16(port), ctypes.c_uint8(1))
            self._iters = {k: obj.iterator_link(v) for k, v in ITERATORS.items()}
            if not self.attach:
                return
            self._attach_calls(obj)
            for prog in PROGRAMS:
                obj.attach(prog)
            # Failures of the watched ports come first and have their own
            # ring: no flood of transitions or host-wide noise can crowd them out.
            self._rb = obj.ring_buffer([("failures", self._on_record),
                                        ("events", self._on_record)])
        except libbpf.LibbpfError as exc:
            self.close()
            raise errors.CoreLoadFailed(
                f"the kernel refused the CO-RE object ({exc}); the verifier's last lines "
                f"are in {_save_log(exc.log)}; `--engine bcc` does without it") from None
        except BtfError as exc:  # an object built from another portrace's bpf/portrace.h
            self.close()
            raise errors.CoreLoadFailed(
                f"the CO-RE object {path} does not match this portrace ({exc}); `sudo make "
                "setup` rebuilds it; `--engine bcc` does without it") from None

    def _load(self, path: str) -> libbpf.BpfObject:
        """The object, loaded with every OPTIONAL group the kernel takes; why
        each other one is off goes to ``self.off``. Raises LibbpfError when
        a program the engine needs is refused."""
        if not self.walk:
            self.off["walk"] = f"{WALK} is off (PORTRACE_LOOKUP=iterators)"
        if not self.attach:
            self.off["fexit"] = "nothing is attached"
        elif (refused := _refused_this_boot()) is not None:
            self.off["fexit"] = refused
        while True:
            obj = _open_object(path)
            for group, progs in OPTIONAL.items():
                if group not in self.off and not all(map(obj.has_program, progs)):
                    self.off[group] = f"{path} has no {' '.join(progs)} program"
            try:
                self._configure(obj, [p for g in self.off for p in OPTIONAL[g]
                                      if obj.has_program(p)])
                obj.load()
                return obj
            except libbpf.LibbpfError as exc:
                obj.close()
                failed = _refused_program(exc.log)
                refused = next((g for g, progs in OPTIONAL.items()
                                if failed in progs and g not in self.off), None)
                if refused is None:
                    raise
                self.off[refused] = f"the kernel refused {failed} ({os.strerror(exc.errno or 0)})"
                if refused == "fexit":
                    _remember_refusal(self.off["fexit"])

    def _attach_calls(self, obj: libbpf.BpfObject) -> None:
        """fexit on the calls where loaded and attachable, else their syscall
        tracepoints; ``self.probes`` says which, ``self.off`` why not fexit."""
        if "fexit" not in self.off:
            try:
                for prog in FEXIT:
                    obj.attach(prog)
                self.probes = "fexit"
                return
            except libbpf.LibbpfError as exc:  # a kernel without trampolines for them
                obj.detach()
                why = os.strerror(exc.errno or 0)
                self.off["fexit"] = f"the kernel refused to attach fexit ({why})"
        for prog in SYSCALL_PROGRAMS:
            obj.attach(prog)
        self.probes = "tracepoints"

    def _configure(self, obj: libbpf.BpfObject, skip: list[str]) -> None:
        n = max(1, len(self.ports))
        obj.set_max_entries("watched_ports", n)
        obj.set_max_entries("recent", n)
        obj.set_max_entries("port_rate", n)
        obj.set_max_entries("events", self.ringbuf_pages * PAGE)
        obj.set_rodata({"all_ports": 0 if self.ports else 1,
                        "stream_states": 1 if self.states else 0})
        obj.set_max_entries("found", FOUND_CAP)
        for prog in skip:
            obj.skip(prog)

    def _on_record(self, data: int, _size: int) -> int:
        ev = decode_event(self.event_t.from_address(data), self.clock)
        if ev is not None:
            self.on_event(ev)
        return self._budget.after_record()

    def poll(self, timeout_ms: int) -> None:
        """Deliver pending records to ``on_event``, waiting up to
        ``timeout_ms``; returns however long a flood lasts (engine.PollBudget)."""
        obj = self._obj
        assert obj is not None
        self._budget.poll(lambda: obj.poll(self._rb, timeout_ms), lambda: obj.consume(self._rb))

    def lost_total(self) -> int:
        """Records dropped so far because a ring buffer was full."""
        assert self._obj is not None
        lost = self._obj.map("lost")
        return sum(lost.percpu_sum(ctypes.c_uint32(i)) for i in engine.LOST_FULL)

    def limited_total(self) -> int:
        """Failures not sent so far because their port was over its rate."""
        assert self._obj is not None
        return self._obj.map("lost").percpu_sum(ctypes.c_uint32(engine.LOST_LIMITED))

    def closer(self, family: str, local: Endpoint, remote: Endpoint) -> Closer | None:
        """Who closed the socket with this 4-tuple, if the probes saw it close.
        Its options are not taken from the close: the minisock keeps its own."""
        assert self._obj is not None
        key = fill_tuple(self.tuple_t(), family, local, remote)
        raw = self.task_t()
        if not self._obj.map("closers").lookup(key, raw):
            return None
        task = decode_task(raw, self.clock)
        return None if task is None else Closer(pid=task.pid, comm=task.comm, ts=task.ts)

    def owner(self, skaddr: int) -> Task | None:
        """The process that last bound, listened on or closed this socket
        (as read since the last snapshot began)."""
        assert self._obj is not None
        if skaddr in self._owners_read:
            return self._owners_read[skaddr]
        raw = self.task_t()
        found = None
        if skaddr and self._obj.map("owners").lookup(ctypes.c_uint64(skaddr), raw):
            found = decode_task(raw, self.clock)
        self._owners_read[skaddr] = found
        return found

    def recent(self, port: int) -> list[StateChange] | None:
        """The last transitions on a watched port, oldest first, from the kernel."""
        assert self._obj is not None
        raw = self.recent_t()
        if not self._obj.map("recent").lookup(ctypes.c_uint16(port), raw):
            return []
        n = len(raw.ring)
        count = min(raw.next, n)
        slots = [(raw.next - count + i) % n for i in range(count)]
        return [decode_state(raw.ring[s], self.clock) for s in slots
                if raw.ring[s].kind == PT_STATE]

    def fd_opts(self, holders: dict[int, list[engine.Holder]]) -> dict[int, SockOpts]:
        return {}  # every socket of a snapshot carries its own options

    def snapshot(self, port: int, protocols: Iterable[str], netns_fd: int | None,
                 netns_inode: int, sysctls: Iterable[str], holders: bool
                 ) -> engine.Snapshot:
        """The sockets on ``port`` (0: every port) in the namespace, with their
        holders, and the named sysctls as it sees them.

        Sockets: from the port's own hash bucket (walk_port) where this kernel
        lets it be read, else from the iterators over the whole netns.
        Holders: from the fds of the processes the kernel saw bind or listen
        on the port, then also of those in each socket's cgroup, when they
        account for every reference to each socket's file; else from every fd
        of the host. ``source`` says which, and why a cheaper path was left.
        Raises LibbpfError."""
        assert self._obj is not None
        obj = self._obj
        self._owners_read = {}
        protos = tuple(protocols)
        q = self.query_t()
        q.netns, q.lo, q.hi = netns_inode, port or 1, port or 65535
        obj.map("query").update(ctypes.c_uint32(0), q)
        fallback = [] if port else ["every port: the iterators list them"]
        # Without the bucket, TCP's bound-only sockets are found only through
        # the fds that hold them: the host walk then runs beside the socket
        # walk (read() releases the GIL), as both cost ~0.4 us per item.
        side = _HostWalk(obj, self._iters["holders"], self.sock_t)
        try:
            with namespaces.entered(netns_fd):
                values = namespaces.read_sysctls(sysctls)
                walked, why = self._walk(q, protos) if port else ({}, [])
                fallback += why
                if "tcp" in protos and "tcp" not in walked:
                    side.start()
                # bpf_iter_init_seq_net: tcp/udp iterators list the creator's netns.
                listed = {p: walked[p] if p in walked else
                          list(libbpf.records(obj.iterate(self._iters[p]), self.sock_t))
                          for p in protos}
        finally:
            host = side.join()
        socks = [r for p in protos for r in listed[p]]
        seen = {r.skaddr for r in socks}
        for r in host or ():
            if r.skaddr not in seen and PROTOCOLS.get(r.protocol) in protos:
                seen.add(r.skaddr)  # bound-only: only the bind hash and fds know it
                socks.append(r)
        held_by, rows = "none", []
        if holders and any(r.inode for r in socks):
            if host is None:
                found, why_not_near, near = self._near_rows(socks)
                fallback += [why_not_near] if why_not_near else []
                if found is None:
                    host = list(libbpf.records(obj.iterate(self._iters["holders"]), self.sock_t))
                else:
                    held_by, rows = near, found
            if host is not None:
                held_by, rows = "host", host
        source = SnapshotSource(
            sockets={p: WALK_SOURCE[p] if p in walked else "iterators" for p in protos},
            holders=held_by, fallback="; ".join(fallback) or None)
        return engine.Snapshot(sockets=[_entry(r) for r in socks],
                               holders=_holders(rows, protos), sysctls=values, source=source)

    def _walk(self, q: Any, protos: tuple[str, ...]) -> tuple[dict[str, list[Any]], list[str]]:
        """Each protocol's sockets on the queried port from walk_port, in
        the calling thread's netns; and why a protocol was not walked."""
        if self._found is None:
            return {}, [self.off.get("walk", f"{WALK} is off")]
        obj = self._obj
        assert obj is not None
        out: dict[str, list[Any]] = {}
        why: list[str] = []
        for p in protos:
            q.protocol = socket.IPPROTO_TCP if p == "tcp" else socket.IPPROTO_UDP
            q.max_steps = self.walk_steps
            obj.map("query").update(ctypes.c_uint32(0), q)
            n = obj.test_run(WALK)
            if n == WALK_STATUS["PT_WALK_FAULT"]:
                n = obj.test_run(WALK)  # a node freed under the walk: once more
            if n < 0:
                why.append(f"{p}: " + WALK_WHY[n].format(
                    table=WALK_TABLE[p], steps=self.walk_steps, cap=FOUND_CAP))
                continue
            out[p] = self._found.first(n, self.sock_t)
        return out, why

    def _near_rows(self, socks: list[Any]) -> tuple[list[Any] | None, str, str]:
        """The fds holding the port's sockets, read from the processes most
        likely to hold them: first those the kernel saw bind or listen on the
        port (``binder``), then also those of each socket's cgroup
        (``cgroup``, at most CGROUP_PROCS_MAX), with why the binders were not
        enough. (None, why, "") unless they account for every reference to
        each socket's file: then the host walk finds no holder more."""
        held = [r for r in socks if r.inode]
        binders = sorted({t.pid for r in held if (t := self.owner(r.skaddr))})
        rows: dict[int, list[Any]] = {}
        why = "no process was seen binding the port's sockets"
        if binders:
            why = self._walk_pids(binders, rows) or _unaccounted(held, rows, binders)
            if not why:
                return _flat(rows), "", "binder"
        found: set[int] = set()
        for cg in sorted({r.cgroup_id for r in held}):
            pids = cgroups.procs(cg)
            if pids is None or len(pids) > CGROUP_PROCS_MAX:
                many = "unreadable" if pids is None else f"{len(pids)} processes"
                return None, f"{why}; cgroup {cg} of the port's sockets: {many}", ""
            found.update(pids)
        members = sorted(found - set(rows))
        if not members:
            return None, why, ""
        walked = sorted(set(rows) | set(members))
        fault = self._walk_pids(members, rows)
        more = fault or _unaccounted(held, rows, walked)
        if more:
            return None, f"{why}; {more}", ""
        return _flat(rows), why, "cgroup"

    def _walk_pids(self, pids: list[int], rows: dict[int, list[Any]]) -> str:
        """Add each process's rows of iter/task_file restricted to it (6.1+);
        a process that exited has none. Returns why the walk cannot be used."""
        obj = self._obj
        assert obj is not None
        for pid in pids:
            try:
                link = obj.iterator_link(ITERATORS["holders"], pid=pid)
            except libbpf.LibbpfError as exc:
                if exc.errno == errno.ESRCH:  # exited: it holds nothing
                    rows[pid] = []
                    continue
                return f"the fds of process {pid} cannot be walked alone ({exc.strerror})"
            try:
                rows[pid] = list(libbpf.records(obj.iterate(link), self.sock_t))
            finally:
                obj.drop_link(link)
        return ""

    def detach(self) -> None:
        """Stop the probes; the maps stay readable until close()."""
        if self._obj is not None:
            self._obj.detach()

    def close(self) -> None:
        self._found = None
        if self._obj is not None:
            self._obj.close()
            self._obj = None


def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def _refused_this_boot() -> str | None:
    """Why the kernel refused fexit, if it did since it booted: a kernel
    does not learn trampolines without a reboot, and trying again costs a
    second load of the object (~20 ms)."""
    try:
        with open(FEXIT_REFUSED) as f:
            boot, _, why = f.read().partition("\n")
        return why.strip() if boot == _boot_id() and why.strip() else None
    except OSError:
        return None


def _remember_refusal(why: str) -> None:
    with contextlib.suppress(OSError):  # unwritable: the next start tries fexit again
        _write_private(FEXIT_REFUSED, f"{_boot_id()}\n{why}, at the first start since boot\n")


def _refused_program(log: list[str]) -> str:
    """The program libbpf last said it could not load, from its log lines
    (tools/lib/bpf/libbpf.c: "prog 'NAME': failed to load")."""
    for line in reversed(log):
        m = re.search(r"prog '(\w+)': failed to load", line)
        if m:
            return m.group(1)
    return ""


def _open_object(path: str) -> libbpf.BpfObject:
    try:
        return libbpf.BpfObject(path)
    except libbpf.LibbpfMissing as exc:
        raise errors.NoLibbpf(str(exc)) from None
    except libbpf.LibbpfError as exc:
        raise errors.NoLibbpf(f"cannot open the CO-RE object {path}: {exc}") from None


class _HostWalk:
    """iter/task_file over every fd of the host, in a thread of its own once
    started; :meth:`join` returns its rows (None: not started) or raises what
    it raised."""

    def __init__(self, obj: libbpf.BpfObject, link: int, layout: Any) -> None:
        self._obj, self._link, self._layout = obj, link, layout
        self._rows: list[Any] = []
        self._failed: list[Exception] = []
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        try:
            self._rows = list(libbpf.records(self._obj.iterate(self._link), self._layout))
        except Exception as exc:  # raised by join(), in the diagnosing thread
            self._failed.append(exc)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def join(self) -> list[Any] | None:
        if self._thread is None:
            return None
        self._thread.join()
        if self._failed:
            raise self._failed[0]
        return self._rows


def _holders(rows: list[Any], protos: tuple[str, ...]) -> dict[int, list[engine.Holder]]:
    """iter/task_file rows -> socket inode -> one Holder per process."""
    held: dict[tuple[int, int], tuple[int, str, list[int]]] = {}
    for r in rows:
        if PROTOCOLS.get(r.protocol) in protos:
            comm = r.comm.decode(errors="replace")
            held.setdefault((r.inode, r.pid), (r.ppid, comm, []))[2].append(r.fd)
    found: dict[int, list[engine.Holder]] = {}
    for (inode, pid), (ppid, comm, nums) in held.items():
        found.setdefault(inode, []).append(
            engine.Holder(pid=pid, ppid=ppid, comm=comm, fds=tuple(sorted(nums))))
    return found


def _flat(rows: dict[int, list[Any]]) -> list[Any]:
    return [r for pid in sorted(rows) for r in rows[pid]]


def _unaccounted(held: list[Any], rows: dict[int, list[Any]], pids: list[int]) -> str:
    """Why the fds walked in ``pids`` may miss a holder of a socket in
    ``held``: a reference to its file none of them holds ('' if none). Each
    row's ``file_refs`` counts the fds of every fd table, the iterator's own
    reference while it visits the file, and any other (a thread inside a
    syscall on it, an fd in flight over SCM_RIGHTS)."""
    fds = collections.Counter(r.inode for pid in pids for r in rows.get(pid, ()))
    refs = {r.inode: r.file_refs for pid in pids for r in rows.get(pid, ())}
    who = ", ".join(map(str, pids))
    for r in held:
        if r.inode not in refs:
            return f"socket inode {r.inode} is held by none of {who}"
        extra = refs[r.inode] - 1 - fds[r.inode]
        if extra:
            return f"socket inode {r.inode} has {extra} reference(s) beyond the fds of {who}"
    return ""


def _entry(r: Any) -> engine.SocketEntry:
    """``struct pt_sock`` -> SocketEntry, named as sock_diag would name it."""
    protocol = PROTOCOLS.get(r.protocol, str(r.protocol))
    family = FAMILIES.get(r.family, str(r.family))
    fam = socket.AF_INET if family == "inet" else socket.AF_INET6
    state = (tcp_state_name(r.state) if protocol == "tcp"
             else engine.UDP_STATE.get(r.state, str(r.state)))
    opts = opts_of(PT_OPT_ALL, r.opts)
    return engine.SocketEntry(
        protocol=protocol,
        family=family,
        state=state,
        local=Endpoint(addr_text(fam, r.saddr), r.sport),
        remote=Endpoint(addr_text(fam, r.daddr), r.dport) if r.dport else None,
        inode=r.inode,
        uid=r.uid,
        cookie=0,
        expires_ms=r.expires_ms if r.minisock and r.expires_ms >= 0 else None,
        v6only=bool(opts.v6only) if family == "inet6" else None,
        bound_dev_if=r.bound_dev_if,
        opts=opts,
        skaddr=r.skaddr,
    )


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a root-only file under LOG_DIR (never through a
    symlink). Raises OSError."""
    LOG_DIR.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _save_log(lines: list[str]) -> str:
    """Write libbpf's last lines to a root-only file; returns its path."""
    path = LOG_DIR / "verifier.log"
    try:
        _write_private(path, "\n".join(lines) + "\n")
        return str(path)
    except OSError:
        return "(unwritable log)"
