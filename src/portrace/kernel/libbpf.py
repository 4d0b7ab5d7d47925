"""A thin ctypes layer over the system's ``libbpf.so.1`` (Debian ``libbpf1``).

No well-kept Python binding of libbpf exists (bcc's Python cannot load a
prebuilt object, bcc issue 3823; pylibbpf 0.0.x says it is not ready for
production), so this module declares the dozen C functions the CO-RE engine
calls and nothing else: open, size maps, set ``const volatile`` settings,
load, attach, map access, ring buffers, iterators. Every failure raises
:class:`LibbpfError` with libbpf's errno and its last log lines.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from portrace.kernel import btf, engine

LIBBPF_NAMES = tuple(filter(None, (os.environ.get("PORTRACE_LIBBPF"),))) or (
    "libbpf.so.1", "libbpf.so")
LIBBPF_MIN = (0, 7)  # ring_buffer, bpf_program__attach_iter, bpf_map__initial_value
LOG_LINES = 40  # libbpf/verifier lines kept for an error report

_p = ctypes.c_void_p
PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)

_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "libbpf_major_version": (ctypes.c_uint32, []),
    "libbpf_minor_version": (ctypes.c_uint32, []),
    "libbpf_set_print": (_p, [PRINT_FN]),
    "libbpf_num_possible_cpus": (ctypes.c_int, []),
    "bpf_object__open_file": (_p, [ctypes.c_char_p, _p]),
    "bpf_object__load": (ctypes.c_int, [_p]),
    "bpf_object__close": (None, [_p]),
    "bpf_object__btf": (_p, [_p]),
    "bpf_object__find_program_by_name": (_p, [_p, ctypes.c_char_p]),
    "bpf_object__find_map_by_name": (_p, [_p, ctypes.c_char_p]),
    "bpf_object__next_map": (_p, [_p, _p]),
    "bpf_map__name": (ctypes.c_char_p, [_p]),
    "bpf_map__fd": (ctypes.c_int, [_p]),
    "bpf_map__set_max_entries": (ctypes.c_int, [_p, ctypes.c_uint32]),
    "bpf_map__initial_value": (_p, [_p, ctypes.POINTER(ctypes.c_size_t)]),
    "bpf_program__attach": (_p, [_p]),
    "bpf_program__attach_cgroup": (_p, [_p, ctypes.c_int]),
    "bpf_program__attach_iter": (_p, [_p, _p]),
    "bpf_program__fd": (ctypes.c_int, [_p]),
    "bpf_program__set_autoload": (ctypes.c_int, [_p, ctypes.c_bool]),
    "bpf_prog_test_run_opts": (ctypes.c_int, [ctypes.c_int, _p]),
    "bpf_link__fd": (ctypes.c_int, [_p]),
    "bpf_link__destroy": (ctypes.c_int, [_p]),
    "bpf_iter_create": (ctypes.c_int, [ctypes.c_int]),
    "bpf_map_update_elem": (ctypes.c_int, [ctypes.c_int, _p, _p, ctypes.c_uint64]),
    "bpf_map_lookup_elem": (ctypes.c_int, [ctypes.c_int, _p, _p]),
    "bpf_map_lookup_batch": (ctypes.c_int, [ctypes.c_int, _p, _p, _p, _p, _p, _p]),
    "ring_buffer__new": (_p, [ctypes.c_int, SAMPLE_FN, _p, _p]),
    "ring_buffer__add": (ctypes.c_int, [_p, ctypes.c_int, SAMPLE_FN, _p]),
    "ring_buffer__poll": (ctypes.c_int, [_p, ctypes.c_int]),
    "ring_buffer__consume": (ctypes.c_int, [_p]),
    "ring_buffer__free": (None, [_p]),
    "btf__type_by_id": (_p, [_p, ctypes.c_uint32]),
    "btf__name_by_offset": (ctypes.c_char_p, [_p, ctypes.c_uint32]),
    "btf__find_by_name_kind": (ctypes.c_int32, [_p, ctypes.c_char_p, ctypes.c_uint32]),
    "bpf_prog_query": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_uint32,
                                      ctypes.POINTER(ctypes.c_uint32),
                                      ctypes.POINTER(ctypes.c_uint32),
                                      ctypes.POINTER(ctypes.c_uint32)]),
    "bpf_prog_get_fd_by_id": (ctypes.c_int, [ctypes.c_uint32]),
    "bpf_obj_get_info_by_fd": (ctypes.c_int, [ctypes.c_int, _p, ctypes.POINTER(ctypes.c_uint32)]),
}
BPF_F_QUERY_EFFECTIVE = 1  # include/uapi/linux/bpf.h


class _TestRunOpts(ctypes.Structure):
    """tools/lib/bpf/bpf.h: struct bpf_test_run_opts (libbpf 0.7+)."""

    _fields_ = [("sz", ctypes.c_size_t), ("data_in", _p), ("data_out", _p),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("ctx_in", _p), ("ctx_out", _p), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32)]


class _BatchOpts(ctypes.Structure):
    """tools/lib/bpf/bpf.h: struct bpf_map_batch_opts."""

    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64),
                ("flags", ctypes.c_uint64)]


class _IterTask(ctypes.Structure):
    """include/uapi/linux/bpf.h: union bpf_iter_link_info, its task member
    (6.1+), padded to the union's 16 bytes."""

    _fields_ = [("tid", ctypes.c_uint32), ("pid", ctypes.c_uint32),
                ("pid_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class _IterAttachOpts(ctypes.Structure):
    """tools/lib/bpf/libbpf.h: struct bpf_iter_attach_opts."""

    _fields_ = [("sz", ctypes.c_size_t), ("link_info", _p), ("link_info_len", ctypes.c_uint32)]

MAX_QUERIED = 64  # programs one query lists: more than any cgroup chain holds


class ProgInfo(ctypes.Structure):
    """The head of include/uapi/linux/bpf.h: struct bpf_prog_info, up to its
    name (the kernel fills as much as is asked for)."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("tag", ctypes.c_uint8 * 8), ("jited_prog_len", ctypes.c_uint32),
                ("xlated_prog_len", ctypes.c_uint32), ("jited_prog_insns", ctypes.c_uint64),
                ("xlated_prog_insns", ctypes.c_uint64), ("load_time", ctypes.c_uint64),
                ("created_by_uid", ctypes.c_uint32), ("nr_map_ids", ctypes.c_uint32),
                ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16)]


def prog_ids(target_fd: int, attach_type: int, effective: bool) -> list[int]:
    """The ids of the programs attached to ``target_fd`` (a cgroup) for
    ``attach_type``; ``effective``: those that run there, inherited ones too.
    Raises LibbpfError."""
    lib = load()
    ids = (ctypes.c_uint32 * MAX_QUERIED)()
    count = ctypes.c_uint32(MAX_QUERIED)
    flags = ctypes.c_uint32(0)
    _check("bpf_prog_query", lib.bpf_prog_query(
        target_fd, attach_type, BPF_F_QUERY_EFFECTIVE if effective else 0,
        ctypes.byref(flags), ids, ctypes.byref(count)))
    return list(ids[:count.value])


def prog_info(prog_id: int) -> tuple[str, str] | None:
    """A loaded program's name and tag (hex); None once it is gone."""
    lib = load()
    fd = lib.bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return None
    try:
        info = ProgInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        if lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)) < 0:
            return None
        return info.name.decode(errors="replace"), bytes(info.tag).hex()
    finally:
        os.close(fd)


class LibbpfError(OSError):
    """A libbpf call failed: ``errno`` is its error, ``log`` its last lines."""

    def __init__(self, what: str, err: int, log: list[str]) -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.what = what
        self.log = log


class LibbpfMissing(ImportError):
    """No usable libbpf.so.1 on this host (absent, or older than LIBBPF_MIN)."""


_lib: Any = None
_log: deque[str] = deque(maxlen=LOG_LINES)
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]


def _log_line(_level: int, fmt: bytes, args: int) -> int:
    # va_list is passed by reference on x86_64 and aarch64, so vsnprintf can
    # format it from here.
    buf = ctypes.create_string_buffer(1024)
    _libc.vsnprintf(buf, len(buf), fmt, args)
    for line in buf.value.decode(errors="replace").splitlines():
        if line.strip():
            _log.append(line.rstrip())
    return 0


_print = PRINT_FN(_log_line)  # kept referenced: libbpf calls it for as long as we run


def load() -> Any:
    """The loaded library with its signatures declared. Raises LibbpfMissing."""
    global _lib
    if _lib is not None:
        return _lib
    lib = None
    for name in LIBBPF_NAMES:
        try:
            lib = ctypes.CDLL(name, use_errno=True)
            break
        except OSError:
            continue
    if lib is None:
        raise LibbpfMissing(f"{' or '.join(LIBBPF_NAMES)} not found (install the OS package "
                            "libbpf1)")
    missing = [n for n in _SIGNATURES if not hasattr(lib, n)]
    if missing:
        raise LibbpfMissing(f"libbpf is too old: it lacks {', '.join(missing[:3])} "
                            f"(need {'.'.join(map(str, LIBBPF_MIN))} or newer)")
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    lib.libbpf_set_print(_print)
    _lib = lib
    return lib


def version() -> tuple[int, int]:
    lib = load()
    return int(lib.libbpf_major_version()), int(lib.libbpf_minor_version())


def log_tail() -> list[str]:
    """libbpf's (and the verifier's) most recent log lines."""
    return list(_log)


def _check(what: str, ret: int) -> int:
    if ret < 0:
        raise LibbpfError(what, -ret if ret != -1 else (ctypes.get_errno() or errno.EINVAL),
                          log_tail())
    return ret


def _nonnull(what: str, ptr: int | None) -> int:
    if not ptr:
        raise LibbpfError(what, ctypes.get_errno() or errno.EINVAL, log_tail())
    return ptr


class Map:
    """One map of a loaded object: fixed-size keys and values (ctypes types)."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name

    def update(self, key: Any, value: Any) -> None:
        ret = load().bpf_map_update_elem(self.fd, ctypes.byref(key), ctypes.byref(value), 0)
        _check(f"update map {self.name}", ret)

    def lookup(self, key: Any, value: Any) -> bool:
        """Fill ``value`` (a ctypes object); False when the key is absent."""
        ret = load().bpf_map_lookup_elem(self.fd, ctypes.byref(key), ctypes.byref(value))
        if ret < 0:
            if ctypes.get_errno() == errno.ENOENT or ret == -errno.ENOENT:
                return False
            _check(f"look up map {self.name}", ret)
        return True

    def first(self, n: int, layout: Any) -> list[Any]:
        """An array map's elements 0 to n-1, copied in one BPF_MAP_LOOKUP_BATCH
        (5.6+; an array's elements come in key order). Raises LibbpfError."""
        if n <= 0:
            return []
        keys, values = (ctypes.c_uint32 * n)(), (layout * n)()
        count, out = ctypes.c_uint32(n), ctypes.c_uint32(0)
        opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts))
        ret = load().bpf_map_lookup_batch(self.fd, None, ctypes.byref(out), keys, values,
                                          ctypes.byref(count), ctypes.byref(opts))
        if ret < 0 and (ctypes.get_errno() or -ret) != errno.ENOENT:  # ENOENT: the map's end
            _check(f"look up map {self.name}", ret)
        return list(values[:count.value])

    def percpu_sum(self, key: Any) -> int:
        """The sum of a per-CPU array's u64 slots at ``key``."""
        ncpu = load().libbpf_num_possible_cpus()
        values = (ctypes.c_uint64 * _check("count CPUs", ncpu))()
        if not self.lookup(key, values):
            return 0
        return int(sum(values))


class BpfObject:
    """A compiled BPF object file: open, configure, load, attach, read.

    Raises :class:`LibbpfError` from every step; :meth:`close` releases all.
    """

    def __init__(self, path: str) -> None:
        self.lib = load()
        self.path = path
        self._obj = _nonnull(f"open {path}", self.lib.bpf_object__open_file(path.encode(), None))
        self._links: list[int] = []
        self._rings: list[int] = []  # ring_buffer managers
        self._samples: list[Any] = []  # their callbacks, kept alive
        self._iter_links: list[int] = []
        self._maps: dict[str, Map] = {}  # after load a map's fd stays: asked once
        self.btf = btf.Btf(self.lib, _nonnull("read the object's BTF",
                                              self.lib.bpf_object__btf(self._obj)))

    def _map(self, name: str) -> int:
        return _nonnull(f"find map {name}",
                        self.lib.bpf_object__find_map_by_name(self._obj, name.encode()))

    def set_max_entries(self, name: str, n: int) -> None:
        """Before load: size a map (e.g. to the number of watched ports)."""
        _check(f"size map {name}", self.lib.bpf_map__set_max_entries(self._map(name), n))

    def set_rodata(self, values: dict[str, int]) -> None:
        """Before load: the ``const volatile`` settings, by variable name."""
        m = self.lib.bpf_object__next_map(self._obj, None)
        while m and not self.lib.bpf_map__name(m).endswith(b".rodata"):
            m = self.lib.bpf_object__next_map(self._obj, m)
        size = ctypes.c_size_t()
        data = _nonnull(".rodata", self.lib.bpf_map__initial_value(m, ctypes.byref(size))
                        if m else None)
        layout = self.btf.datasec(".rodata")
        for name, value in values.items():
            offset, width = layout[name]
            raw = int(value).to_bytes(width, "little", signed=False)
            ctypes.memmove(data + offset, raw, width)

    def load(self) -> None:
        _check(f"load {self.path}", self.lib.bpf_object__load(self._obj))

    def attach(self, program: str) -> None:
        """Attach by the program's SEC() (tracepoints); detached by close()."""
        self._links.append(_nonnull(f"attach {program}",
                                    self.lib.bpf_program__attach(self._program(program))))

    def attach_cgroup(self, program: str, cgroup_fd: int) -> None:
        """Attach a ``cgroup/*`` program (its SEC() names the hook) to the
        cgroup v2 directory open as ``cgroup_fd``; detached by close()."""
        self._links.append(_nonnull(
            f"attach {program} to a cgroup",
            self.lib.bpf_program__attach_cgroup(self._program(program), cgroup_fd)))

    def _program(self, program: str) -> int:
        return _nonnull(f"find program {program}",
                        self.lib.bpf_object__find_program_by_name(self._obj, program.encode()))

    def has_program(self, program: str) -> bool:
        return bool(self.lib.bpf_object__find_program_by_name(self._obj, program.encode()))

    def skip(self, program: str) -> None:
        """Before load: leave ``program`` out of the load (its object stays usable)."""
        _check(f"skip {program}", self.lib.bpf_program__set_autoload(self._program(program), False))

    def iterator_link(self, program: str, pid: int = 0) -> int:
        """Attach an ``iter/*`` program; the link makes iterators (see
        iterate). ``pid``: a task iterator visits only that process's tasks
        (kernel 6.1+: bpf_iter_link_info.task); the link lives until close()
        or :meth:`drop_link`."""
        opts = None
        if pid:
            info = _IterTask(pid=pid)
            opts = _IterAttachOpts(sz=ctypes.sizeof(_IterAttachOpts),
                                   link_info=ctypes.addressof(info),
                                   link_info_len=ctypes.sizeof(info))
        link = _nonnull(f"attach iterator {program}", self.lib.bpf_program__attach_iter(
            self._program(program), ctypes.byref(opts) if opts is not None else None))
        self._iter_links.append(link)
        return link

    def drop_link(self, link: int) -> None:
        self._iter_links.remove(link)
        self.lib.bpf_link__destroy(link)

    def test_run(self, program: str) -> int:
        """Run an unattached program once in the calling thread
        (BPF_PROG_TEST_RUN, no context) and return what it returned, as a
        signed 32-bit value. Raises LibbpfError."""
        fd = _check(f"program fd {program}", self.lib.bpf_program__fd(self._program(program)))
        opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts))
        _check(f"run {program}", self.lib.bpf_prog_test_run_opts(fd, ctypes.byref(opts)))
        return ctypes.c_int32(opts.retval).value

    def iterate(self, link: int, chunk: int = 1 << 16) -> bytes:
        """Run an iterator once and return what it wrote. The iterator sees
        the network namespace of the calling thread (bpf_iter_init_seq_net)."""
        fd = _check("create iterator", self.lib.bpf_iter_create(self.lib.bpf_link__fd(link)))
        parts = []
        try:
            while True:
                part = os.read(fd, chunk)
                if not part:
                    break
                parts.append(part)
        finally:
            os.close(fd)
        return b"".join(parts)

    def map(self, name: str) -> Map:
        if name not in self._maps:
            self._maps[name] = Map(_check(f"map fd {name}",
                                          self.lib.bpf_map__fd(self._map(name))), name)
        return self._maps[name]

    def ring_buffer(self, rings: list[tuple[str, Callable[[int, int], int]]]) -> int:
        """One libbpf ring_buffer over the maps named in ``rings``, in that
        order (ring_buffer__consume serves them so). Each callback gets
        (address, size) and returns 0 to go on, or engine.STOP to end this
        pass: the record is consumed all the same (tools/lib/bpf/ringbuf.c:
        ringbuf_process_ring)."""
        rb = 0
        for name, callback in rings:
            def sample(_ctx: int, data: int, size: int,
                       callback: Callable[[int, int], int] = callback) -> int:
                return callback(data, size)
            fn = SAMPLE_FN(sample)
            self._samples.append(fn)  # libbpf calls it until the ring is freed
            fd = self.map(name).fd
            if not rb:
                rb = _nonnull(f"ring buffer {name}", self.lib.ring_buffer__new(fd, fn, None, None))
                self._rings.append(rb)
            else:
                _check(f"ring buffer {name}", self.lib.ring_buffer__add(rb, fd, fn, None))
        return rb

    def poll(self, rb: int, timeout_ms: int) -> None:
        """Wait up to ``timeout_ms`` for records and deliver them; a
        callback's engine.STOP ends the pass early."""
        ret = self.lib.ring_buffer__poll(rb, timeout_ms)
        if ret not in (-errno.EINTR, engine.STOP):
            _check("poll ring buffer", ret)

    def consume(self, rb: int) -> None:
        """Deliver what every ring holds, ring by ring in their order, without
        waiting; a callback's engine.STOP ends the pass early."""
        ret = self.lib.ring_buffer__consume(rb)
        if ret != engine.STOP:
            _check("consume ring buffer", ret)

    def detach(self) -> None:
        """Detach the attached programs, side by side (engine.side_by_side);
        maps, rings and iterators stay usable until close()."""
        links, self._links = self._links, []
        engine.side_by_side(functools.partial(self.lib.bpf_link__destroy, link) for link in links)

    def close(self) -> None:
        self.detach()
        for rb in self._rings:
            self.lib.ring_buffer__free(rb)
        self._rings.clear()
        self._samples.clear()
        for link in self._iter_links:
            self.lib.bpf_link__destroy(link)
        self._iter_links.clear()
        self._maps.clear()
        if self._obj:
            self.lib.bpf_object__close(self._obj)
            self._obj = 0


def records(data: bytes, layout: type[ctypes.Structure]) -> Iterator[Any]:
    """Fixed-size records an iterator wrote, decoded with ``layout``."""
    size = ctypes.sizeof(layout)
    for off in range(0, len(data) - size + 1, size):
        yield layout.from_buffer_copy(data, off)
