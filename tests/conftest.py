"""Real-kernel harness. One `portrace --json --states` process watches every
port the tests use; tests stage conflicts with real processes (portrace.commands.stage)
and wait for what the probes report.

Policy: BPF tests skip only when not root outside CI. Under CI (CI set), not
being root or failing to load BPF is a test failure, never a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import contract
import pytest

from portrace.commands.stage import ScratchNetns

IN_CI = bool(os.environ.get("CI"))
BASE_PORT = 19100
PORTS = list(range(BASE_PORT, BASE_PORT + 30))
READY_TIMEOUT_S = 120


def need_root() -> None:
    if os.geteuid() == 0:
        return
    if IN_CI:
        pytest.fail("CI must run the BPF tests as root; this run is not root")
    pytest.skip("needs root (BPF, sock_diag of other processes); runs in CI")


def _needs_root(fn: Any, module: Any, depth: int = 2) -> bool:
    """Whether ``fn`` calls need_root(), itself or through its module's
    helpers (``depth`` calls deep)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return False
    if "need_root" in code.co_names:
        return True
    return depth > 0 and any(_needs_root(getattr(module, name, None), module, depth - 1)
                             for name in code.co_names)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``root`` every test that needs it: it, a helper it calls or a
    fixture it uses calls need_root(); ``make check`` deselects them."""
    for item in items:
        module = getattr(item, "module", None)
        fixtures = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        funcs = [getattr(item, "function", None)] + [d[-1].func for d in fixtures.values()]
        if any(_needs_root(fn, module) or _needs_root(fn, sys.modules.get(fn.__module__))
               for fn in funcs if fn is not None):
            item.add_marker(pytest.mark.root)


def bpf_unavailable(why: str) -> None:
    if IN_CI:
        pytest.fail(f"BPF could not be loaded in CI: {why}")
    pytest.skip(f"BPF could not be loaded here: {why}")


class TracerProcess:
    """A running `portrace --json --states PORTS...`; collects its JSON lines,
    each validated against the shipped schema (contract.check): stop() fails
    the test that saw an event break the contract."""

    def __init__(self, ports: list[int], extra: list[str] | None = None,
                 engine: str = "core") -> None:
        self.engine = engine
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "portrace", "--json", "--states", "--engine", engine,
             *(extra or []), *map(str, ports)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.events: list[dict[str, Any]] = []
        self.invalid: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            ev = json.loads(line)
            try:
                contract.check(ev)
            except AssertionError as exc:
                self.invalid.append(str(exc))
            with self._cond:
                self.events.append(ev)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 15.0,
                 start: int = 0) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events[start:]:
                    if pred(ev):
                        return ev
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and not self._reader.is_alive():
                    return None
                self._cond.wait(left)

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def stop(self) -> tuple[int, str]:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        err = self.proc.stderr.read() if self.proc.stderr else ""
        self._reader.join(5)
        assert not self.invalid, f"events outside the schema: {self.invalid[:3]}"
        return self.proc.returncode, err


ENGINES = ("core", "bcc")


@pytest.fixture(scope="session", params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """Each real-kernel test runs once per engine: both must give the answer."""
    return str(request.param)


@pytest.fixture(scope="session")
def tracer(engine: str) -> Iterator[TracerProcess]:
    need_root()
    t = TracerProcess(PORTS, engine=engine)
    ready = t.wait_for(lambda e: e["type"] == "ready", timeout=READY_TIMEOUT_S)
    if ready is None:
        code, err = t.stop()
        bpf_unavailable(f"portrace --engine {engine} exited {code}: {err.strip()[-800:]}")
    assert ready["engine"] == engine, ready
    yield t
    code, err = t.stop()
    assert code == 0, f"portrace did not exit cleanly on SIGTERM ({code}): {err[-800:]}"


@pytest.fixture(scope="session")
def netns(engine: str) -> Iterator[ScratchNetns]:
    """One namespace per engine: the minisocks one engine's tests leave behind
    must not become extra blockers in the other's."""
    need_root()
    with ScratchNetns(f"portrace-test-{engine}-{os.getpid()}") as ns:
        yield ns


def netns_inode(ns: ScratchNetns) -> int:
    return os.stat(f"/run/netns/{ns.name}").st_ino


_next_port: dict[str, Iterator[int]] = {}


@pytest.fixture
def port(engine: str) -> int:
    """A watched port no other test of this engine uses (the last eleven are
    test_kernel_truth's and the matrix's, the one before test_refusals')."""
    return next(_next_port.setdefault(engine, iter(PORTS[:-12])))
