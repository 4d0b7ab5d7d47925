"""Which engine runs, and making it: the one module that imports the engines
(``portrace.kernel.core``, ``portrace.kernel.bcc``), so that they and the toolkit they
share (``portrace.kernel.engine``) never import each other in a circle.

``--engine auto`` (the default) takes ``core`` where it can run, else ``bcc``,
and says why in the ``ready`` event."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from portrace import errors
from portrace.kernel import capabilities, libbpf
from portrace.kernel.bcc import BccEngine
from portrace.kernel.core import CoreEngine
from portrace.kernel.engine import KERNEL_BTF, Choice, Engine, core_object


def core_unavailable() -> errors.NoKernelBtf | errors.NoLibbpf | None:
    """Why the CO-RE engine cannot run here, as far as files tell: the error
    ``--engine core`` raises (its message the reason alone), or None."""
    if not KERNEL_BTF.exists():
        return errors.NoKernelBtf(f"no kernel BTF at {KERNEL_BTF} (CONFIG_DEBUG_INFO_BTF)")
    if not core_object().exists():
        return errors.NoLibbpf(f"the CO-RE object {core_object()} was not built "
                               "(`sudo make setup` builds it)")
    try:
        major, minor = libbpf.version()
    except libbpf.LibbpfMissing as exc:
        return errors.NoLibbpf(str(exc))
    if (major, minor) < libbpf.LIBBPF_MIN:
        return errors.NoLibbpf(f"libbpf {major}.{minor} is older than "
                               f"{'.'.join(map(str, libbpf.LIBBPF_MIN))}")
    return None


def core_required(why_not: errors.NoKernelBtf | errors.NoLibbpf) -> errors.PortraceError:
    """The error for ``--engine core`` where it cannot run."""
    return type(why_not)(f"--engine core: {why_not}")


def choose(requested: str) -> Choice:
    """The engine to run for ``--engine requested``. Raises NeedsRoot or
    BpfUnavailable (the capabilities every engine needs), and NoKernelBtf or
    NoLibbpf when ``core`` is asked for and cannot run."""
    capabilities.require("bcc" if requested == "bcc" else "core")  # before anything is read
    if requested == "bcc":
        return Choice("bcc", "asked for with --engine bcc")
    why_not = core_unavailable()
    if requested == "core":
        if why_not is not None:
            raise core_required(why_not)
        return Choice("core", "asked for with --engine core")
    if why_not is not None:
        return Choice("bcc", f"CO-RE engine unavailable: {why_not}")
    return Choice("core", f"kernel BTF at {KERNEL_BTF}")


LOOKUPS = ("walk", "iterators")


def core_lookup() -> bool:
    """Whether the CO-RE engine walks a failing port's own hash bucket
    (``PORTRACE_LOOKUP=walk``, the default) or only runs the iterators over
    the netns and the host (``iterators``: the path before walk_port, kept as
    the benchmarks' anchor). Raises BadEnvironment for another value."""
    value = os.environ.get("PORTRACE_LOOKUP", "walk")
    if value not in LOOKUPS:
        raise errors.BadEnvironment(
            f"PORTRACE_LOOKUP={value!r}: expected one of {', '.join(LOOKUPS)}")
    return value == "walk"


def make(choice: Choice, ports: Iterable[int], on_event: Callable[[Any], None],
         ringbuf_pages: int = 64, states: bool = True, attach: bool = True) -> Engine:
    """The chosen engine, not yet opened. ``attach=False``: attach no probe
    (core only: ``check`` reads sockets through the object's iterators).
    Raises BadEnvironment (core_lookup)."""
    if choice.name == "core":
        return CoreEngine(ports, on_event, ringbuf_pages=ringbuf_pages, states=states,
                          attach=attach, walk=core_lookup())
    return BccEngine(ports, on_event, ringbuf_pages=ringbuf_pages, states=states)
