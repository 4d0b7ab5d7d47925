"""Every exit status portrace has, in one table (ExitStatus), and the errors a
user can cause or fix, each carrying its status.

The CLI prints ``portrace: <message>`` on one line and exits with the error's
``exit_code``; nothing here is a bug, so nothing here gets a traceback.
"""

from __future__ import annotations

from enum import IntEnum, unique


@unique
class ExitStatus(IntEnum):
    """What ``portrace``'s exit status means; values never change meaning."""

    OK = 0
    BLOCKED = 1
    USAGE = 2  # click's own code for bad arguments
    NEEDS_ROOT = 3
    NO_TRACEFS = 4
    NO_KERNEL_HEADERS = 5
    BPF_UNAVAILABLE = 6
    MISSING_TRACEPOINT = 7
    NO_BCC = 8
    STAGING_FAILED = 9
    NO_EVIDENCE = 10
    EXPECTATION_FAILED = 11
    NO_KERNEL_BTF = 12
    NO_LIBBPF = 13
    CORE_LOAD_FAILED = 14
    UNSAFE_PATH = 15
    EVIDENCE_BUSY = 16
    OUTPUT_FAILED = 17
    DEMO_MISSED = 18
    WORSE = 19
    INTERNAL = 70  # sysexits.h EX_SOFTWARE
    INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


EXIT_TEXT: dict[ExitStatus, str] = {
    ExitStatus.OK: "success (also after Ctrl-C / SIGTERM)",
    ExitStatus.BLOCKED: "portrace check: a port would not bind now (its blockers are named)",
    ExitStatus.USAGE: "bad arguments (e.g. a port outside 1-65535)",
    ExitStatus.NEEDS_ROOT: "neither root nor holding the capabilities portrace needs (the "
                           "message names those missing)",
    ExitStatus.NO_TRACEFS: "tracefs is not mounted (sudo make setup mounts it)",
    ExitStatus.NO_KERNEL_HEADERS: "kernel headers missing: bcc cannot compile the probes",
    ExitStatus.BPF_UNAVAILABLE: "the kernel refused the BPF programs",
    ExitStatus.MISSING_TRACEPOINT: "a tracepoint portrace needs is missing from this kernel",
    ExitStatus.NO_BCC: "the bcc Python bindings (python3-bpfcc) are not importable",
    ExitStatus.STAGING_FAILED: "portrace demo or lab could not stage its scenario",
    ExitStatus.NO_EVIDENCE: "portrace report: no evidence there, or not portrace evidence",
    ExitStatus.EXPECTATION_FAILED: "portrace lab --expect: the comparison did not come out "
                                   "as expected",
    ExitStatus.NO_KERNEL_BTF: "--engine core: the kernel has no BTF (/sys/kernel/btf/vmlinux)",
    ExitStatus.NO_LIBBPF: "--engine core: no usable libbpf.so.1, or the CO-RE object is not "
                          "built",
    ExitStatus.CORE_LOAD_FAILED: "--engine core: the kernel refused the CO-RE object, or it "
                                 "does not match this portrace",
    ExitStatus.UNSAFE_PATH: "an output cannot be opened as asked: a symlink, not a regular "
                            "file, in a directory another user can write, or its directory "
                            "missing or closed to root",
    ExitStatus.EVIDENCE_BUSY: "another portrace records into that evidence directory",
    ExitStatus.OUTPUT_FAILED: "the main output cannot be written (stdout closed, disk full)",
    ExitStatus.DEMO_MISSED: "portrace demo: a staged conflict was not diagnosed as staged",
    ExitStatus.WORSE: "portrace lab --baseline: a scenario measured worse than its baseline",
    ExitStatus.INTERNAL: "internal error: a bug in portrace (the traceback is printed; please "
                         "report it)",
    ExitStatus.INTERRUPTED: "interrupted (Ctrl-C) before the work was done",
}


class PortraceError(Exception):
    exit_code: int = ExitStatus.INTERNAL


class BadNamespace(PortraceError):
    """``check --netns``/``--pid`` names no namespace portrace can open."""

    exit_code = ExitStatus.USAGE


class BadEnvironment(PortraceError):
    """An environment variable portrace reads has a value it does not take."""

    exit_code = ExitStatus.USAGE


class NeedsRoot(PortraceError):
    exit_code = ExitStatus.NEEDS_ROOT


class NoTracefs(PortraceError):
    exit_code = ExitStatus.NO_TRACEFS


class NoKernelHeaders(PortraceError):
    exit_code = ExitStatus.NO_KERNEL_HEADERS


class BpfUnavailable(PortraceError):
    exit_code = ExitStatus.BPF_UNAVAILABLE


class MissingTracepoint(PortraceError):
    exit_code = ExitStatus.MISSING_TRACEPOINT


class NoBcc(PortraceError):
    exit_code = ExitStatus.NO_BCC


class StagingFailed(PortraceError):
    """`portrace demo` could not stage its scenario (netns, processes)."""

    exit_code = ExitStatus.STAGING_FAILED


class NoKernelBtf(PortraceError):
    """--engine core on a kernel without /sys/kernel/btf/vmlinux."""

    exit_code = ExitStatus.NO_KERNEL_BTF


class NoLibbpf(PortraceError):
    """--engine core without a usable libbpf.so.1 or the compiled object."""

    exit_code = ExitStatus.NO_LIBBPF


class CoreLoadFailed(PortraceError):
    """The kernel refused the CO-RE object (the verifier's last lines are
    logged), or the object lacks a type this portrace reads (built from
    another version's bpf/portrace.h). ``--engine auto`` falls back to bcc."""

    exit_code = ExitStatus.CORE_LOAD_FAILED


class UnsafePath(PortraceError):
    """An output path portrace will not or cannot open: a symlink, not a
    regular file, a directory another user owns or may write, or a directory
    that does not exist or refuses the write (ENOENT, EACCES, EROFS)."""

    exit_code = ExitStatus.UNSAFE_PATH


class EvidenceBusy(PortraceError):
    """Another recorder holds the evidence directory's lock."""

    exit_code = ExitStatus.EVIDENCE_BUSY


class OutputFailed(PortraceError):
    """Where the main output should go cannot be written (stdout closed,
    a full disk for a report)."""

    exit_code = ExitStatus.OUTPUT_FAILED
