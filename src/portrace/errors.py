"""Errors a user can cause or fix, each with its own exit code.

The CLI prints ``portrace: <message>`` on one line and exits with ``exit_code``;
nothing here is a bug, so nothing here gets a traceback.
"""

from __future__ import annotations

EXIT_USAGE = 2  # click's own code for bad arguments (e.g. port 70000)
EXIT_BLOCKED = 1  # portrace check: the port would not bind now
EXIT_INTERNAL = 70  # a bug (sysexits.h EX_SOFTWARE): the traceback is printed


class PortraceError(Exception):
    exit_code = 1


class BadNamespace(PortraceError):
    """``check --netns``/``--pid`` names no namespace portrace can open."""

    exit_code = EXIT_USAGE


class NeedsRoot(PortraceError):
    exit_code = 3


class NoTracefs(PortraceError):
    exit_code = 4


class NoKernelHeaders(PortraceError):
    exit_code = 5


class BpfUnavailable(PortraceError):
    exit_code = 6


class MissingTracepoint(PortraceError):
    exit_code = 7


class NoBcc(PortraceError):
    exit_code = 8


class StagingFailed(PortraceError):
    """`portrace demo` could not stage its scenario (netns, processes)."""

    exit_code = 9


class NoKernelBtf(PortraceError):
    """--engine core on a kernel without /sys/kernel/btf/vmlinux."""

    exit_code = 12


class NoLibbpf(PortraceError):
    """--engine core without a usable libbpf.so.1 or the compiled object."""

    exit_code = 13


class CoreLoadFailed(PortraceError):
    """The kernel refused the CO-RE object (the verifier's last lines are logged)."""

    exit_code = 14


class UnsafePath(PortraceError):
    """An output path portrace will not write as root: a symlink, not a
    regular file, or a directory another user owns or may write."""

    exit_code = 15


class EvidenceBusy(PortraceError):
    """Another recorder holds the evidence directory's lock."""

    exit_code = 16


class OutputFailed(PortraceError):
    """Where the main output should go cannot be written (stdout closed,
    a full disk for a report)."""

    exit_code = 17


EXIT_CODES: dict[int, str] = {
    0: "success (also after Ctrl-C / SIGTERM)",
    EXIT_BLOCKED: "portrace check: the port would not bind now (its blockers are named)",
    EXIT_USAGE: "bad arguments (e.g. a port outside 1-65535)",
    NeedsRoot.exit_code: "not running as root",
    NoTracefs.exit_code: "tracefs is not mounted (sudo make setup mounts it)",
    NoKernelHeaders.exit_code: "kernel headers missing: bcc cannot compile the probes",
    BpfUnavailable.exit_code: "the kernel refused the BPF programs",
    MissingTracepoint.exit_code: "a tracepoint portrace needs is missing from this kernel",
    NoBcc.exit_code: "the bcc Python bindings (python3-bpfcc) are not importable",
    StagingFailed.exit_code: "portrace demo could not stage its scenario",
    10: "portrace report: no evidence there, or not portrace evidence",
    11: "portrace lab --expect: the comparison did not come out as expected",
    NoKernelBtf.exit_code: "--engine core: the kernel has no BTF (/sys/kernel/btf/vmlinux)",
    NoLibbpf.exit_code: "--engine core: no usable libbpf.so.1, or the CO-RE object is not built",
    CoreLoadFailed.exit_code: "--engine core: the kernel refused the CO-RE object",
    UnsafePath.exit_code: "an output is a symlink, not a regular file, or in a directory "
                          "another user can write",
    EvidenceBusy.exit_code: "another portrace records into that evidence directory",
    OutputFailed.exit_code: "the main output cannot be written (stdout closed, disk full)",
    EXIT_INTERNAL: "internal error: a bug in portrace (the traceback is printed; please report it)",
}
