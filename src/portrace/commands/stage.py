"""Stage real port conflicts with real processes, optionally in a throwaway
network namespace. Used by ``portrace demo`` and the test suite.

Each role runs as its own process (``python -m portrace.commands.stage ROLE ...``),
names itself with PR_SET_NAME so the tracer's output is readable, prints one
``ready ...`` line when its sockets are in place, and (with ``--hold``) keeps
them until its stdin closes.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from portrace.errors import StagingFailed

PR_SET_NAME = 15
IP_LOCAL_PORT_RANGE = 51  # include/uapi/linux/in.h (6.3+); not in Python's socket module


def _set_comm(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _socket(addr: str, udp: bool = False, reuseaddr: bool = False, v6only: bool | None = None,
            reuseport: bool = False, device: str | None = None) -> socket.socket:
    s = socket.socket(_family(addr), socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    if reuseaddr:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if device:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
    if v6only is not None and s.family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    return s


def _opts(a: argparse.Namespace) -> dict:
    return {"udp": a.udp, "reuseaddr": a.reuseaddr, "v6only": a.v6only,
            "reuseport": a.reuseport, "device": a.device}


def _attempt(call: object, *args: object) -> str:
    try:
        call(*args)  # type: ignore[operator]
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def _ready(*info: object) -> None:
    print("ready", *info, flush=True)


def _hold() -> None:
    """Keep everything open until stdin closes (the stager's signal to go)."""
    while True:
        r, _, _ = select.select([sys.stdin], [], [], 3600)
        if r and not os.read(sys.stdin.fileno(), 4096):
            return


def _drop_to(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


CLONE_NEWUSER = 0x10000000  # include/uapi/linux/sched.h


def _new_user_ns() -> None:
    """Enter a user namespace of our own (os.unshare is Python 3.12+): every
    capability, but only there."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWUSER): {os.strerror(err)}")


PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2  # linux/prctl.h
SYS = {"x86_64": {"bind": 49, "landlock_create_ruleset": 444, "landlock_restrict_self": 446},
       "aarch64": {"bind": 200, "landlock_create_ruleset": 444, "landlock_restrict_self": 446}}
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}  # include/uapi/linux/audit.h
LANDLOCK_ACCESS_NET_BIND_TCP = 1  # include/uapi/linux/landlock.h (ABI 4)


def _no_new_privs(libc: ctypes.CDLL) -> None:
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def _seccomp_refuse_bind() -> None:
    """A seccomp filter answering bind() with EPERM (SECCOMP_RET_ERRNO), every
    other call allowed; a wrong architecture is killed, as filters must."""
    arch = os.uname().machine
    nr = SYS[arch]["bind"]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8),
                    ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]

    ld, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    insns = [(ld, 0, 0, 4), (jeq, 1, 0, AUDIT_ARCH[arch]), (ret, 0, 0, 0),  # arch, else kill
             (ld, 0, 0, 0), (jeq, 0, 1, nr),  # seccomp_data.nr == bind
             (ret, 0, 0, 0x00050000 | errno.EPERM),  # SECCOMP_RET_ERRNO
             (ret, 0, 0, 0x7FFF0000)]  # SECCOMP_RET_ALLOW
    array = (Filter * len(insns))(*[Filter(*i) for i in insns])
    prog = Prog(len(insns), array)
    libc = ctypes.CDLL(None, use_errno=True)
    _no_new_privs(libc)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def _landlock_refuse_bind() -> None:
    """A Landlock domain that handles LANDLOCK_ACCESS_NET_BIND_TCP and allows
    no port: every TCP bind() refused with EACCES (ABI 4, Linux 6.7+)."""
    class Attr(ctypes.Structure):
        _fields_ = [("handled_access_fs", ctypes.c_uint64),
                    ("handled_access_net", ctypes.c_uint64)]

    numbers = SYS[os.uname().machine]
    libc = ctypes.CDLL(None, use_errno=True)
    attr = Attr(0, LANDLOCK_ACCESS_NET_BIND_TCP)
    fd = libc.syscall(numbers["landlock_create_ruleset"], ctypes.byref(attr),
                      ctypes.sizeof(attr), 0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    _no_new_privs(libc)
    if libc.syscall(numbers["landlock_restrict_self"], fd, 0) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    os.close(fd)


def role_flood(a: argparse.Namespace) -> None:
    """Fail bind() in a loop for --within s, or until stdin closes: on the
    loopback addresses 127.0.x.y at PORT, each a distinct failure (EADDRINUSE
    while something holds 0.0.0.0:PORT); with --einval, a bound socket bound
    again to port 0 (EINVAL). --uid: as that uid (after the "ready" line)."""
    if a.uid is not None:
        _drop_to(a.uid)
    _ready()
    bound = None
    if a.einval:
        bound = socket.socket()
        bound.bind(("127.0.0.1", 0))
    end = time.monotonic() + a.within
    i = 0
    while time.monotonic() < end:
        i += 1
        if i % 1024 == 0 and select.select([sys.stdin], [], [], 0)[0] \
                and not os.read(sys.stdin.fileno(), 4096):
            return
        try:
            if bound is not None:
                bound.bind(("127.0.0.1", 0))
            else:
                with socket.socket() as s:
                    s.bind((f"127.0.{i // 250 % 250}.{i % 250 + 1}", a.port))
        except OSError:
            pass


def role_listen(a: argparse.Namespace) -> None:
    """Bind (and, unless --no-listen or UDP, listen); hold. --late-listen:
    report ``ready`` once bound, and listen only when a line arrives."""
    s = _socket(a.addr, **_opts(a))
    s.bind((a.addr, a.port))
    if a.late_listen:
        _ready(os.getpid())
        sys.stdin.readline()
        _ready(_attempt(s.listen))
    elif not (a.udp or a.no_listen):
        s.listen()
        _ready(os.getpid())
    else:
        _ready(os.getpid())
    _hold()


def role_occupy(a: argparse.Namespace) -> None:
    """Bind --count consecutive ports from PORT (no listen); hold."""
    socks = []
    for port in range(a.port, a.port + a.count):
        s = _socket(a.addr)
        s.bind((a.addr, port))
        socks.append(s)
    _ready(len(socks))
    _hold()


def role_connect_until_fail(a: argparse.Namespace) -> None:
    """Connect to PORT and close at once (the client closes first, so its
    side is left in TIME_WAIT), until connect() fails; report that errno."""
    for n in range(100000):
        s = _socket(a.addr)
        result = _attempt(s.connect, (a.addr, a.port))
        if result != "ok":
            _ready(result, n)
            break
        s.close()
    else:
        _ready("ok", 100000)
    _hold()


def role_listen_fork_child(a: argparse.Namespace) -> None:
    """Listen, hand the fd to a `sleep` child, exit: the child keeps the port."""
    s = _socket(a.addr)
    s.bind((a.addr, a.port))
    s.listen()
    child = subprocess.Popen(["sleep", str(a.child_seconds)], pass_fds=[s.fileno()],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    _ready(child.pid)
    os._exit(0)  # no cleanup: the child must outlive us holding the fd


def role_timewait(a: argparse.Namespace) -> None:
    """Serve one connection and close it first (active close), then exit:
    the server side of the connection is left in TIME_WAIT. --wait: print
    ``waiting`` with the connection up, and close only once a line arrives
    (a server that was running before the tracer started)."""
    srv = _socket(a.addr, reuseaddr=a.reuseaddr)
    srv.bind((a.addr, a.port))
    srv.listen()
    cli = socket.create_connection((a.addr, a.port))
    client_port = cli.getsockname()[1]
    conn, _ = srv.accept()
    if a.wait:
        print("waiting", flush=True)
        sys.stdin.readline()
    conn.close()  # server closes first: ESTABLISHED -> FIN_WAIT1 in this process
    deadline = time.monotonic() + 5
    while cli.recv(1) and time.monotonic() < deadline:  # wait for the server's FIN
        pass
    cli.close()
    srv.close()
    time.sleep(0.05)  # the last ACK lands, the server side enters TIME_WAIT
    _ready(client_port)
    os._exit(0)


def role_finwait2(a: argparse.Namespace) -> None:
    """Accept a connection and close it and the listener, while the client
    never closes: the server side is an orphaned FIN_WAIT2 minisock."""
    srv = _socket(a.addr, reuseaddr=a.reuseaddr)
    srv.bind((a.addr, a.port))
    srv.listen()
    cli = socket.create_connection((a.addr, a.port))
    conn, _ = srv.accept()
    conn.close()  # FIN sent; the client's ACK moves the orphan to FIN_WAIT2
    srv.close()
    time.sleep(0.05)
    _ready(cli.getsockname()[1])
    _hold()  # the client keeps its end open: no FIN ever comes back
    cli.close()


def role_listen_forks(a: argparse.Namespace) -> None:
    """Listen, then fork --count children that inherit the listening fd and
    sleep; ``ready`` with every pid holding it, parent first. --orphan: the
    parent exits at once (a master killed, its workers keep the port)."""
    s = _socket(a.addr, **_opts(a))
    s.bind((a.addr, a.port))
    s.listen()
    children = []
    for i in range(a.count):
        pid = os.fork()
        if pid == 0:
            _set_comm(f"worker-{i}")
            time.sleep(a.child_seconds)
            os._exit(0)
        children.append(pid)
    if a.orphan:
        _ready(*children)
        os._exit(0)
    _ready(os.getpid(), *children)
    _hold()
    for pid in children:
        os.kill(pid, 15)


def role_crowd(a: argparse.Namespace) -> None:
    """Listen on PORT and hold --count loopback connections to it, the client
    ends in a child process (each side stays under the fd limit): a busy
    namespace of 2 x count sockets around the conflict under test."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = a.count + 64
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    srv = _socket(a.addr, reuseaddr=a.reuseaddr)
    srv.bind((a.addr, a.port))
    srv.listen(4096)
    rfd, wfd = os.pipe()
    child = os.fork()
    if child == 0:
        srv.close()
        clients = [socket.create_connection((a.addr, a.port)) for _ in range(a.count)]
        os.write(wfd, b"x")
        _hold()
        del clients
        os._exit(0)
    conns = [srv.accept()[0] for _ in range(a.count)]
    os.read(rfd, 1)
    _ready(2 * len(conns))
    _hold()
    os.kill(child, 15)


def role_serve(a: argparse.Namespace) -> None:
    """Accept connections one by one; close each once its client has closed
    (the client closes first, so the client side ends in TIME_WAIT)."""
    srv = _socket(a.addr, **_opts(a))
    srv.bind((a.addr, a.port))
    srv.listen(128)
    _ready(os.getpid())
    while True:
        r, _, _ = select.select([srv, sys.stdin], [], [], 3600)
        if sys.stdin in r:
            return
        conn, _ = srv.accept()
        conn.settimeout(5)
        try:
            while conn.recv(4096):
                pass
        except OSError:
            pass
        conn.close()


def role_established(a: argparse.Namespace) -> None:
    """Accept a connection, close the listener, keep the connection open."""
    srv = _socket(a.addr, reuseaddr=a.reuseaddr)
    srv.bind((a.addr, a.port))
    srv.listen()
    cli = socket.create_connection((a.addr, a.port))
    conn, _ = srv.accept()
    srv.close()
    _ready(cli.getsockname()[1])
    _hold()
    conn.close()


def role_retry(a: argparse.Namespace) -> None:
    """A restarting server: bind(); on failure report it (``ready EADDRINUSE``)
    and retry when a line arrives; on success listen (``ready ok ok``), hold."""
    while True:
        s = _socket(a.addr, **_opts(a))
        result = _attempt(s.bind, (a.addr, a.port))
        if result == "ok":
            _ready(result, _attempt(s.listen))
            break
        s.close()
        _ready(result)
        if not sys.stdin.readline():
            return
    _hold()


def role_restart(a: argparse.Namespace) -> None:
    """A new server that retries bind() every --every seconds for up to
    --within seconds, then listens: ``ready {json}`` with attempts, failures by
    errno and seconds until it got the port (null: not within the limit)."""
    t0 = time.monotonic()
    attempts, got = 0, None
    errnos: dict[str, int] = {}
    while time.monotonic() - t0 <= a.within:
        s = _socket(a.addr, **_opts(a))
        attempts += 1
        result = _attempt(s.bind, (a.addr, a.port))
        if result == "ok":
            got = round(time.monotonic() - t0, 3)
            s.listen()
            break
        errnos[result] = errnos.get(result, 0) + 1
        s.close()
        time.sleep(a.every)
    _ready(json.dumps({"attempts": attempts, "errnos": errnos, "recovered_s": got}))
    if a.hold:
        _hold()


def role_connect_loop(a: argparse.Namespace) -> None:
    """Open and close connections to PORT as fast as possible for --within
    seconds (the client closes first); after a failed connect() wait 10 ms, as
    a retrying client would: ``ready {json}`` with the counts."""
    t0 = time.monotonic()
    attempts, ok = 0, 0
    errnos: dict[str, int] = {}
    while time.monotonic() - t0 < a.within:
        s = _socket(a.addr)
        attempts += 1
        result = _attempt(s.connect, (a.addr, a.port))
        s.close()
        if result == "ok":
            ok += 1
        else:
            errnos[result] = errnos.get(result, 0) + 1
            time.sleep(0.01)
    _ready(json.dumps({"attempts": attempts, "ok": ok, "errnos": errnos}))


def role_bind(a: argparse.Namespace) -> None:
    """Try one bind (and with --listen, then listen) and report each result:
    ``ready ok``, ``ready EADDRINUSE``, ``ready ok EADDRINUSE``...

    --wait: print ``waiting`` before the last step (listen() with --listen,
    else bind()) and take it only once a line arrives. --no-bind: only listen
    (autobind). --own-listener: first listen on the address itself, and
    close that listener right after the bind fails (a blocker gone at once);
    with --keep-own, keep it (a process that binds one port twice). --rebind:
    bind the socket to an ephemeral port first (the second bind(): EINVAL).
    --uid: drop to that uid (and its gid) before creating the socket.
    --userns: enter a user namespace of its own first (CAP_NET_BIND_SERVICE
    held there, not in the netns's owner). --seccomp-refuse-bind,
    --landlock-refuse-bind: put itself under a seccomp filter (bind(): EPERM)
    or a Landlock domain (TCP bind(): EACCES) first.
    --euid: create the socket under that effective uid only (its sk_uid), then
    switch back before bind(). --port-range LO-HI: IP_LOCAL_PORT_RANGE."""
    if a.uid is not None:
        _drop_to(a.uid)
    if a.userns:
        _new_user_ns()
    if a.seccomp_refuse_bind:
        _seccomp_refuse_bind()
    if a.landlock_refuse_bind:
        _landlock_refuse_bind()
    if a.euid is not None:
        os.seteuid(a.euid)
    own = None
    if a.own_listener:
        own = _socket(a.addr)
        own.bind((a.addr, a.port))
        own.listen()
    s = _socket(a.addr, **_opts(a))
    if a.euid is not None:
        os.seteuid(0)  # bind() runs as root: only the socket's owner differs
    if a.port_range:
        lo, hi = (int(x) for x in a.port_range.split("-"))
        value = (lo | hi << 16).to_bytes(4, sys.byteorder)  # u32: high << 16 | low
        s.setsockopt(socket.IPPROTO_IP, IP_LOCAL_PORT_RANGE, value)

    def wait() -> None:
        print("waiting", flush=True)
        sys.stdin.readline()

    if a.rebind:
        s.bind((a.addr, 0))
    if a.wait and not a.listen:
        wait()
    results = [] if a.no_bind else [_attempt(s.bind, (a.addr, a.port))]
    if own is not None and not a.keep_own:
        own.close()
    if a.listen and results in ([], ["ok"]):
        if a.wait:
            wait()
        results.append(_attempt(s.listen))
    _ready(*results)
    if a.hold:
        _hold()


ROLES = {
    "listen": role_listen,
    "listen-fork-child": role_listen_fork_child,
    "listen-forks": role_listen_forks,
    "crowd": role_crowd,
    "timewait": role_timewait,
    "established": role_established,
    "finwait2": role_finwait2,
    "occupy": role_occupy,
    "serve": role_serve,
    "retry": role_retry,
    "restart": role_restart,
    "connect-loop": role_connect_loop,
    "connect-until-fail": role_connect_until_fail,
    "bind": role_bind,
    "flood": role_flood,
}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m portrace.commands.stage")
    p.add_argument("role", choices=sorted(ROLES))
    p.add_argument("addr")
    p.add_argument("port", type=int)
    p.add_argument("--name", default="portrace-stage")
    p.add_argument("--udp", action="store_true")
    p.add_argument("--reuseaddr", action="store_true")
    p.add_argument("--v6only", type=int, choices=(0, 1), default=None)
    p.add_argument("--reuseport", action="store_true")
    p.add_argument("--device")
    p.add_argument("--hold", action="store_true")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--listen", action="store_true")
    p.add_argument("--no-listen", action="store_true")
    p.add_argument("--late-listen", action="store_true")
    p.add_argument("--no-bind", action="store_true")
    p.add_argument("--own-listener", action="store_true")
    p.add_argument("--keep-own", action="store_true")
    p.add_argument("--rebind", action="store_true")
    p.add_argument("--uid", type=int)
    p.add_argument("--euid", type=int)
    p.add_argument("--userns", action="store_true")
    p.add_argument("--seccomp-refuse-bind", action="store_true")
    p.add_argument("--landlock-refuse-bind", action="store_true")
    p.add_argument("--pause", action="store_true")
    p.add_argument("--port-range")
    p.add_argument("--orphan", action="store_true")
    p.add_argument("--einval", action="store_true")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--every", type=float, default=0.2)
    p.add_argument("--within", type=float, default=10.0)
    p.add_argument("--child-seconds", type=int, default=300)
    a = p.parse_args(argv)
    if a.v6only is not None:
        a.v6only = bool(a.v6only)
    _set_comm(a.name)
    # --pause, any role: print ``paused`` and wait for a line before anything
    # else (a socket keeps the cgroup it was made in: the stager moves us first).
    if a.pause:
        print("paused", flush=True)
        sys.stdin.readline()
    ROLES[a.role](a)


class ScratchNetns:
    """A throwaway network namespace with loopback up; deleted on exit."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> ScratchNetns:
        try:
            _run(["ip", "netns", "add", self.name])
            _run(["ip", "-n", self.name, "link", "set", "lo", "up"])
        except BaseException:  # Ctrl-C or SIGTERM mid-way too: never leave it behind
            self.__exit__()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)

    def sysctl(self, key: str, value: str) -> None:
        _run(["ip", "netns", "exec", self.name, "sysctl", "-qw", f"{key}={value}"])

    def ip(self, *args: str) -> None:
        _run(["ip", "-n", self.name, *args])


def _run(argv: list[str]) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise StagingFailed(f"{' '.join(argv)}: {detail.strip()}") from None


class Staged:
    """One staged role process. ``info`` is what it printed after ``ready``."""

    def __init__(self, role: str, addr: str, port: int, *args: str, name: str,
                 netns: ScratchNetns | None = None, timeout: float = 10.0,
                 first: str = "ready") -> None:
        argv = [sys.executable, "-m", "portrace.commands.stage", role, addr, str(port),
                "--name", name, *args]
        if netns is not None:
            argv = ["ip", "netns", "exec", netns.name, *argv]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.info = self._await(first, timeout)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def go(self, timeout: float = 10.0) -> str:
        """Let a ``--wait`` role act; returns what it printed after ``ready``."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self.info = self._await("ready", timeout)
        return self.info

    def _await(self, word: str, timeout: float) -> str:
        assert self.proc.stdout is not None
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if r else ""
        if not line.startswith(word):
            self.proc.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            last = (line + err).strip().splitlines()[-1:] or ["(nothing printed)"]
            raise StagingFailed(f"staged {self.proc.args!r} did not get ready: {last[0]}")
        return line[len(word):].strip()

    def release(self, timeout: float = 5.0) -> None:
        """Close its stdin (it lets go of its sockets) and reap it."""
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def refusing_cgroup(obj: Path, program: str, name: str) -> Iterator[str]:
    """A cgroup v2 directory ``name`` made under the cgroup2 mount, with
    ``program`` of the compiled object ``obj`` (a ``cgroup/bind4``-style
    program) attached to it; yields the cgroup's path below the mount (the
    form /proc/PID/cgroup gives). A process written to its ``cgroup.procs``
    before it makes a socket meets the program at bind() (a socket keeps
    the cgroup it was made in: ``sk_cgrp_data``). Removed on exit; it must
    be empty by then. Raises StagingFailed."""
    from portrace.kernel import libbpf  # only here: staging conflicts needs no libbpf
    from portrace.kernel.cgroups import cgroup2_mount

    mount = cgroup2_mount()
    if mount is None:
        raise StagingFailed("no cgroup2 mount to attach a cgroup program to")
    rel = f"/{name}"
    try:
        os.mkdir(mount + rel)
    except OSError as exc:
        raise StagingFailed(f"mkdir {mount + rel}: {exc.strerror}") from None
    fd = os.open(mount + rel, os.O_RDONLY | os.O_DIRECTORY)
    bpf = None
    try:
        try:
            bpf = libbpf.BpfObject(str(obj))
            bpf.load()
            bpf.attach_cgroup(program, fd)
        except (libbpf.LibbpfError, libbpf.LibbpfMissing) as exc:
            raise StagingFailed(f"{program} from {obj}: {exc}") from None
        yield rel
    finally:
        if bpf is not None:
            bpf.close()
        os.close(fd)
        os.rmdir(mount + rel)


if __name__ == "__main__":
    main()
