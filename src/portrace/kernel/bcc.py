"""The bcc engine: compile ``bpf/bcc.bpf.c`` at start, attach, read.

The fallback for kernels without BTF (see portrace.kernel.engine). The only module
that touches bcc.

``BccEngine.open()`` checks the host first and raises a :mod:`portrace.errors`
error that names the fix (not root, no tracefs, no headers, no tracepoint,
BPF refused). Records are decoded with the layout the compiler gave
``union pt_event`` (read back from the ``pt_layout`` map), so the frontend
never keeps a second copy of ``bpf/portrace.h``.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from portrace import errors
from portrace.events import Closer, Endpoint, SockOpts, StateChange, Task
from portrace.kernel import engine, header, sockdiag
from portrace.kernel.records import (
    MonotonicClock,
    decode_event,
    decode_opts,
    decode_task,
    fill_tuple,
)

TRACEPOINTS = ("sock/inet_sock_set_state",) + tuple(
    f"syscalls/sys_{edge}_{call}"
    for call in ("bind", "listen", "connect", "socket", "setsockopt", "accept", "accept4",
                 "close", "shutdown")
    for edge in ("enter", "exit")
)


def kernel_headers_dir() -> Path | None:
    """The headers bcc will compile against, as bcc looks for them."""
    env = os.environ.get("BCC_KERNEL_SOURCE")
    candidates = [Path(env)] if env else [Path(f"/lib/modules/{os.uname().release}/build")]
    for c in candidates:
        if (c / "include").is_dir():
            return c
    if not env and Path("/sys/kernel/kheaders.tar.xz").exists():
        return Path("/sys/kernel/kheaders.tar.xz")
    return None


def require_bcc() -> Path:
    """Check what the bcc engine needs, cheapest first. Returns the tracefs root.

    Raises NeedsRoot, BpfUnavailable, NoBcc, NoTracefs, MissingTracepoint,
    NoKernelHeaders.
    """
    tracefs = engine.require_tracing(TRACEPOINTS, "bcc")
    try:
        import bcc  # noqa: F401
    except ImportError as exc:
        raise errors.NoBcc(
            f"cannot import bcc ({exc}): install the OS package python3-bpfcc and run portrace "
            "from a venv made with --system-site-packages (`sudo make setup` does both)"
        ) from None
    if kernel_headers_dir() is None:
        where = os.environ.get("BCC_KERNEL_SOURCE") or f"/lib/modules/{os.uname().release}/build"
        raise errors.NoKernelHeaders(
            f"no kernel headers at {where}: bcc needs them to compile the probes; "
            "run `sudo make setup` (installs them, or links the distribution's generic headers)"
        )
    return tracefs


class BccEngine:
    """The bcc engine: attached tracepoints for a set of ports (empty: every port).

    ``on_event`` receives ``SocketCall`` and ``StateChange`` objects from
    :meth:`poll`. In all-ports mode only failed binds arrive. ``states`` is
    taken for the engine interface and not used: this engine always streams
    the watched ports' transitions, since the tracer keeps their history.
    """

    name = "bcc"
    probes = "tracepoints"  # the fallback engine keeps the syscall tracepoints everywhere

    def __init__(self, ports: Iterable[int], on_event: Callable[[Any], None],
                 ringbuf_pages: int = 64, states: bool = True) -> None:
        self.ports = sorted(set(ports))
        self.on_event = on_event
        self.ringbuf_pages = ringbuf_pages
        self.clock = MonotonicClock()
        self._bpf: Any = None
        self._layout: Any = None
        self._budget = engine.PollBudget()
        self.off: dict[str, str] = {}

    def open(self) -> None:
        """Compile, load and attach. Raises the errors of :func:`require_bcc`,
        and ``BpfUnavailable`` when the kernel refuses the programs."""
        require_bcc()
        from bcc import BPF

        src = header.bpf_dir()
        cflags = [f"-I{src}", f"-DPT_RINGBUF_PAGES={self.ringbuf_pages}",
                  f"-DPT_WATCHED_MAX={max(1024, len(self.ports))}"]
        try:
            self._bpf = BPF(src_file=str(src / "bcc.bpf.c").encode(), cflags=cflags)
        except Exception as exc:  # bcc raises bare Exception for both cases
            msg = str(exc)
            if "compile" in msg.lower():
                raise errors.NoKernelHeaders(
                    f"bcc could not compile {src / 'bcc.bpf.c'} against the kernel headers "
                    f"at {kernel_headers_dir()} (compiler messages above); `sudo make setup` "
                    "reinstalls them"
                ) from None
            raise errors.BpfUnavailable(
                f"the kernel refused the BPF programs ({msg}); portrace needs CAP_BPF and "
                "CAP_PERFMON (or CAP_SYS_ADMIN) and tracepoint BPF support (CONFIG_BPF_EVENTS)"
            ) from None
        self._layout = self._bpf[b"pt_layout"].Leaf
        cfg = self._bpf[b"config"]
        value = cfg.Leaf()
        value.all_ports = 0 if self.ports else 1
        watched = self._bpf[b"watched_ports"]
        for port in self.ports:
            watched[watched.Key(port)] = watched.Leaf(1)
        cfg[cfg.Key(0)] = value  # last: the filter is complete before it applies
        # The failures ring first: ring_buffer_consume serves rings in order.
        self._bpf[b"failures"].open_ring_buffer(self._on_record)
        self._bpf[b"events"].open_ring_buffer(self._on_record)

    def _on_record(self, _ctx: Any, data: Any, _size: int) -> int:
        ev = decode_event(ctypes.cast(data, ctypes.POINTER(self._layout)).contents, self.clock)
        if ev is not None:
            self.on_event(ev)
        return self._budget.after_record()

    def poll(self, timeout_ms: int) -> None:
        """Deliver pending records to ``on_event``, waiting up to
        ``timeout_ms``; returns however long a flood lasts (engine.PollBudget)."""
        self._budget.poll(lambda: self._bpf.ring_buffer_poll(timeout_ms),
                          self._bpf.ring_buffer_consume)

    def lost_total(self) -> int:
        """Records dropped so far because a ring buffer was full."""
        lost = self._bpf[b"lost"]
        return sum(int(lost.sum(i).value) for i in engine.LOST_FULL)

    def limited_total(self) -> int:
        """Failures not sent so far because their port was over its rate."""
        return int(self._bpf[b"lost"].sum(engine.LOST_LIMITED).value)

    def closer(self, family: str, local: Endpoint, remote: Endpoint) -> Closer | None:
        """Who closed the socket with this 4-tuple, if the probes saw it close."""
        table = self._bpf[b"closers"]
        key = fill_tuple(table.Key(), family, local, remote)
        try:
            raw = table[key]
        except KeyError:
            return None
        task = decode_task(raw, self.clock)
        if task is None:
            return None
        return Closer(pid=task.pid, comm=task.comm, ts=task.ts, opts=decode_opts(raw.opts))

    def sockopts(self, pid: int, fd: int) -> SockOpts | None:
        """What the probes know of a live process's socket fd, None if nothing."""
        table = self._bpf[b"sockinfo"]
        try:
            raw = table[table.Key(pid << 32 | fd)]
        except KeyError:
            return None
        return decode_opts(raw.opts)

    def snapshot(self, port: int, protocols: Iterable[str], netns_fd: int | None,
                 netns_inode: int, sysctls: Iterable[str], holders: bool
                 ) -> engine.Snapshot:
        """sock_diag (pyroute2) in the namespace, plus a /proc fd scan."""
        return sockdiag.snapshot(port, protocols, netns_fd, sysctls, holders=holders)

    def fd_opts(self, holders: dict[int, list[engine.Holder]]) -> dict[int, SockOpts]:
        """Options the probes recorded for each socket inode, via a holder's fd."""
        out: dict[int, SockOpts] = {}
        for inode, held in holders.items():
            for h in held:
                found = next((o for fd in h.fds if (o := self.sockopts(h.pid, fd))), None)
                if found is not None:
                    out[inode] = found
                    break
        return out

    def owner(self, skaddr: int) -> Task | None:
        """This engine does not read sockets: who bound one is not known here."""
        return None

    def recent(self, port: int) -> list[StateChange] | None:
        """None: this engine streams transitions; the tracer keeps them."""
        return None

    def detach(self) -> None:
        """Stop the probes, side by side (engine.side_by_side); the tables
        stay readable until close()."""
        if self._bpf is not None:
            bpf = self._bpf
            engine.side_by_side(functools.partial(bpf.detach_tracepoint, tp)
                                for tp in list(bpf.tracepoint_fds))

    def close(self) -> None:
        if self._bpf is not None:
            self.detach()
            self._bpf.cleanup()
            self._bpf = None
