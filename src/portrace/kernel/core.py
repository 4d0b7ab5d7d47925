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

import ctypes
import os
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
    SockOpts,
    StateChange,
    Task,
    tcp_state_name,
)
from portrace.kernel import engine, libbpf, namespaces
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
PROGRAMS = ("bind_enter", "bind_exit", "listen_enter", "listen_exit", "connect_enter",
            "connect_exit", "set_state")
ITERATORS = {"tcp": "iter_tcp", "udp": "iter_udp", "holders": "iter_task_file"}
LOG_DIR = Path("/run/portrace")  # root-only: the verifier's log of a refused load
PAGE = 4096


class CoreEngine:
    """The CO-RE engine for a set of ports (empty: every port, failures only).

    ``states``: stream transitions to ``on_event`` (they are kept in the kernel
    either way). Raises from :meth:`open` the errors of ``engine.require_tracing``,
    NoLibbpf, and CoreLoadFailed when the kernel refuses the object.
    """

    name = "core"

    def __init__(self, ports: Iterable[int], on_event: Callable[[Any], None],
                 ringbuf_pages: int = 64, states: bool = True, attach: bool = True) -> None:
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

    def open(self) -> None:
        if self.attach:
            engine.require_tracing(TRACEPOINTS)
        else:
            engine.require_bpf()
        path = str(engine.core_object())
        try:
            obj = libbpf.BpfObject(path)
        except libbpf.LibbpfMissing as exc:
            raise errors.NoLibbpf(str(exc)) from None
        except libbpf.LibbpfError as exc:
            raise errors.NoLibbpf(f"cannot open the CO-RE object {path}: {exc}") from None
        self._obj = obj
        try:
            n = max(1, len(self.ports))
            obj.set_max_entries("watched_ports", n)
            obj.set_max_entries("recent", n)
            obj.set_max_entries("port_rate", n)
            obj.set_max_entries("events", self.ringbuf_pages * PAGE)
            obj.set_rodata({"all_ports": 0 if self.ports else 1,
                            "stream_states": 1 if self.states else 0})
            obj.load()
            self.event_t = obj.btf.layout("pt_event")
            self.sock_t = obj.btf.layout("pt_sock")
            self.query_t = obj.btf.layout("pt_query")
            self.task_t = obj.btf.layout("pt_task")
            self.tuple_t = obj.btf.layout("pt_tuple")
            self.recent_t = obj.btf.layout("pt_recent")
            watched = obj.map("watched_ports")
            for port in self.ports:
                watched.update(ctypes.c_uint16(port), ctypes.c_uint8(1))
            self._iters = {k: obj.iterator_link(v) for k, v in ITERATORS.items()}
            if not self.attach:
                return
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
        """The process that last bound, listened on or closed this socket."""
        assert self._obj is not None
        raw = self.task_t()
        if not skaddr or not self._obj.map("owners").lookup(ctypes.c_uint64(skaddr), raw):
            return None
        return decode_task(raw, self.clock)

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
        """The sockets on ``port`` (0: every port) in the namespace, from the
        iterators, with their holders, and the named sysctls as it sees them."""
        assert self._obj is not None
        q = self.query_t()
        q.netns, q.lo, q.hi = netns_inode, port or 1, port or 65535
        self._obj.map("query").update(ctypes.c_uint32(0), q)
        protos = tuple(protocols)
        obj = self._obj
        # Run even without holders wanted: bound-only sockets are only found
        # here. Both walks cost the kernel ~0.4 us per socket or fd, so the
        # fd walk runs beside the socket walk (read() releases the GIL).
        walked: list[bytes] = []
        failed: list[Exception] = []

        def walk() -> None:
            try:
                walked.append(obj.iterate(self._iters["holders"]))
            except Exception as exc:  # raised below, in the diagnosing thread
                failed.append(exc)

        walker = threading.Thread(target=walk)
        walker.start()
        try:
            with namespaces.entered(netns_fd):
                values = namespaces.read_sysctls(sysctls)
                # bpf_iter_init_seq_net: tcp/udp iterators list the creator's netns.
                raw = {p: obj.iterate(self._iters[p]) for p in protos}
        finally:
            walker.join()
        if failed:
            raise failed[0]
        entries: list[engine.SocketEntry] = []
        seen: set[int] = set()
        for p in protos:
            for r in libbpf.records(raw[p], self.sock_t):
                entries.append(_entry(r))
                seen.add(r.skaddr)
        # (inode, pid) -> (ppid, comm, fds): one holder per process and socket
        held: dict[tuple[int, int], tuple[int, str, list[int]]] = {}
        for r in libbpf.records(walked[0], self.sock_t):
            if PROTOCOLS.get(r.protocol) not in protos:
                continue
            if r.skaddr not in seen:  # bound-only: only the bind hash and fds know it
                seen.add(r.skaddr)
                entries.append(_entry(r))
            if holders:
                comm = r.comm.decode(errors="replace")
                held.setdefault((r.inode, r.pid), (r.ppid, comm, []))[2].append(r.fd)
        found: dict[int, list[engine.Holder]] = {}
        for (inode, pid), (ppid, comm, nums) in held.items():
            found.setdefault(inode, []).append(
                engine.Holder(pid=pid, ppid=ppid, comm=comm, fds=tuple(sorted(nums))))
        return engine.Snapshot(sockets=entries, holders=found, sysctls=values)

    def detach(self) -> None:
        """Stop the probes; the maps stay readable until close()."""
        if self._obj is not None:
            self._obj.detach()

    def close(self) -> None:
        if self._obj is not None:
            self._obj.close()
            self._obj = None


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


def _save_log(lines: list[str]) -> str:
    """Write libbpf's last lines to a root-only file; returns its path."""
    try:
        LOG_DIR.mkdir(mode=0o700, exist_ok=True)
        path = LOG_DIR / "verifier.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        return str(path)
    except OSError:
        return "(unwritable log)"
