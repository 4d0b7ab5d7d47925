"""JSON Lines evidence (docs/events.md): writers and the reader.

A recorder writes into a directory of segments named by their start time,
``portrace-20261124T091203.123456Z.jsonl``. Each event is written and flushed on
its own, so a finished event survives SIGTERM or a crash of the writer. When
a segment would grow past ``max_bytes`` it is closed and gzipped (to a
temporary name, then renamed, so no state is ever half-written) and only the
newest ``keep`` compressed segments are kept. Files are 0600, the directory
0700: evidence names processes and addresses.

The directory must belong to the user portrace runs as and be writable by
no one else; every file in it is opened relative to it, never through a
symlink, new files with O_EXCL. A lock file keeps a second recorder out.

The reader treats evidence as hostile: files and directories, plain or
gzipped, in time order, read line by line with a size cap; a torn last line,
a corrupt or oversized line, an event with a missing or mistyped field and a
gzip file cut short are skipped or noted, counted and warned about, never
fatal.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from portrace.errors import EvidenceBusy, ExitStatus, PortraceError, UnsafePath
from portrace.events import EVENT_TYPES, Event, Malformed, from_json, to_json

SEGMENT_PREFIX = "portrace-"
PLAIN, GZIPPED = ".jsonl", ".jsonl.gz"
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_KEEP = 8
LOCK = ".portrace.lock"
MAX_LINE_BYTES = 8 * 1024 * 1024  # one event; a busy port's is summarised far below this
NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class EvidenceError(PortraceError):
    """Evidence that cannot be read: nothing there, or not portrace's."""

    exit_code = ExitStatus.NO_EVIDENCE


def dumps(ev: Event) -> str:
    return json.dumps(to_json(ev), separators=(",", ":"))


class JsonLinesSink:
    """Writes every event it is given to ``stream``, one flushed line each."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, ev: Event) -> None:
        self.stream.write(dumps(ev) + "\n")
        self.stream.flush()


def _segment_name(now: datetime) -> str:
    return SEGMENT_PREFIX + now.strftime("%Y%m%dT%H%M%S.%fZ") + PLAIN


def _compress(dirfd: int, plain: str) -> None:
    """gzip segment ``plain`` of the directory open at ``dirfd`` next to it,
    atomically (a temporary made with O_EXCL, then renamed), and remove it."""
    tmp = plain + ".gz.tmp"
    fd = os.open(tmp, NEW, 0o600, dir_fd=dirfd)
    src_fd = os.open(plain, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb",
                                                     filename=plain) as gz, \
            os.fdopen(src_fd, "rb") as src:
        shutil.copyfileobj(src, gz)
    os.replace(tmp, plain + ".gz", src_dir_fd=dirfd, dst_dir_fd=dirfd)
    os.unlink(plain, dir_fd=dirfd)


def open_private_dir(directory: Path) -> int:
    """An fd of ``directory``, made 0700 if missing. Raises UnsafePath when
    it is a symlink, not a directory, not owned by this user, or writable by
    group or others: root must not write where another user can plant files."""
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise UnsafePath(f"cannot make {directory}: {exc.strerror or exc}") from None
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        why = "is a symbolic link" if os.path.islink(directory) else \
            f"cannot be opened ({exc.strerror or exc})"
        raise UnsafePath(f"evidence directory {directory} {why}") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.close(fd)
        raise UnsafePath(f"evidence directory {directory} belongs to uid {st.st_uid} or is "
                         f"writable by others (mode {stat.S_IMODE(st.st_mode):o}); use a "
                         "directory only this user can write")
    os.fchmod(fd, 0o700)
    return fd


class EvidenceDir:
    """A size-bounded, rotating JSON Lines recorder in ``directory``.

    Bound: the live segment stays under ``max_bytes`` (one event larger than
    that gets a segment of its own) and at most ``keep`` compressed segments
    remain, so the directory holds at most ``max_bytes`` plus ``keep``
    compressed segments of ``max_bytes`` each before compression.
    Raises UnsafePath (see :func:`open_private_dir`), EvidenceBusy when
    another recorder holds the directory's lock, OSError when it cannot be
    written.
    """

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_MAX_BYTES,
                 keep: int = DEFAULT_KEEP) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.keep = keep
        self._dirfd = open_private_dir(self.dir)
        try:
            self._lock = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o600, dir_fd=self._dirfd)
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._lock)
                raise EvidenceBusy(f"another portrace records into {self.dir} "
                                   f"(it holds {self.dir / LOCK})") from None
        except BaseException:
            os.close(self._dirfd)
            raise
        for name in self._names(GZIPPED + ".tmp"):
            os.unlink(name, dir_fd=self._dirfd)  # a compression a crash cut short
        for leftover in self._names(PLAIN):
            _compress(self._dirfd, leftover)  # segments of an earlier run: finished
        self._prune()
        self._open()

    def _names(self, suffix: str) -> list[str]:
        """Segment names in the directory ending in ``suffix``, oldest first."""
        return sorted(n for n in os.listdir(self._dirfd)
                      if n.startswith(SEGMENT_PREFIX) and n.endswith(suffix))

    def _open(self) -> None:
        name = _segment_name(datetime.now(timezone.utc))
        self.path = self.dir / name
        fd = os.open(name, NEW | os.O_APPEND, 0o600, dir_fd=self._dirfd)
        self._file = os.fdopen(fd, "w", encoding="utf-8")
        self.size = 0

    def _prune(self) -> None:
        done = self._names(GZIPPED)
        for old in done[:max(0, len(done) - self.keep)]:
            os.unlink(old, dir_fd=self._dirfd)

    def rotate(self) -> None:
        self._file.close()
        _compress(self._dirfd, self.path.name)
        self._prune()
        self._open()

    def __call__(self, ev: Event) -> None:
        line = dumps(ev) + "\n"
        size = len(line.encode())
        if self.size and self.size + size > self.max_bytes:
            self.rotate()
        self._file.write(line)
        self._file.flush()
        self.size += size

    def close(self) -> None:
        self._file.close()
        os.close(self._lock)  # releases the flock
        os.close(self._dirfd)


@dataclass
class ReadReport:
    """What the reader skipped or could not finish, per file."""

    files: list[Path] = field(default_factory=list)
    torn: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)  # "path:line: why"
    oversized: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)  # gzip files cut short

    def warnings(self) -> list[str]:
        out = [f"skipped a torn last line (the writer stopped mid-line): {t}" for t in self.torn]
        out += [f"skipped an unreadable line: {c}" for c in self.corrupt]
        if self.malformed:
            out.append(f"skipped {len(self.malformed)} events with a missing or mistyped "
                       f"field (first: {self.malformed[0]})")
        if self.oversized:
            out.append(f"skipped {len(self.oversized)} lines over {MAX_LINE_BYTES} bytes "
                       f"(first: {self.oversized[0]})")
        out += [f"{t} ends early (a truncated gzip file): the events before the cut are "
                "used" for t in self.truncated]
        return out


def segments(paths: Iterable[Path]) -> list[Path]:
    """Evidence files under ``paths`` in time order. Raises EvidenceError
    for a path that does not exist or a directory with no evidence."""
    out: list[Path] = []
    for p in map(Path, paths):
        try:
            if p.is_dir():
                found = sorted(f for f in p.iterdir()
                               if f.name.endswith((PLAIN, GZIPPED)) and f.is_file())
                if not found:
                    raise EvidenceError(f"no evidence files (*{PLAIN}, *{GZIPPED}) in {p}")
                out.extend(found)
            elif p.is_file():
                out.append(p)
            else:
                raise EvidenceError(f"no such file or directory: {p}")
        except OSError as exc:
            raise EvidenceError(f"cannot read {p}: {exc.strerror or exc}") from None
    return out


def _lines(path: Path, report: ReadReport) -> Iterator[tuple[int, str, bool]]:
    """(line number, text, complete?) of a plain or gzipped file, at most
    MAX_LINE_BYTES a line: a longer one is skipped without being held."""
    try:
        with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
            n = 0
            while True:
                raw = f.readline(MAX_LINE_BYTES + 1)
                if not raw:
                    return
                n += 1
                if len(raw) > MAX_LINE_BYTES:
                    report.oversized.append(f"{path}:{n}")
                    while raw and not raw.endswith(b"\n"):
                        raw = f.readline(MAX_LINE_BYTES)
                    continue
                yield n, raw.decode("utf-8", errors="replace"), raw.endswith(b"\n")
    except EOFError:
        report.truncated.append(str(path))  # e.g. a partial copy: what was read stands
    except gzip.BadGzipFile:
        raise EvidenceError(f"{path} is not portrace evidence (not gzip data)") from None
    except OSError as exc:
        raise EvidenceError(f"cannot read {path}: {exc.strerror or exc}") from None


def read(paths: Iterable[Path], report: ReadReport | None = None) -> Iterator[Event]:
    """Every well-formed event in the evidence at ``paths``, typed
    (events.from_json). Raises EvidenceError for a file that is not portrace
    evidence (no line of it is a portrace event, well-formed or not)."""
    report = report if report is not None else ReadReport()
    for path in segments(paths):
        report.files.append(path)
        good = 0
        first_bad: str | None = None
        for n, text, complete in _lines(path, report):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
                if not (isinstance(obj, dict) and obj.get("type") in EVENT_TYPES):
                    raise ValueError("JSON, but not a portrace event")
            except ValueError:
                (report.corrupt if complete else report.torn).append(f"{path}:{n}")
                first_bad = first_bad or text.strip()[:60]
                continue
            good += 1
            try:
                yield from_json(obj)
            except Malformed as exc:
                report.malformed.append(f"{path}:{n}: {exc}")
        if not good and first_bad is not None:
            raise EvidenceError(f"{path} is not portrace evidence (first line: {first_bad!r})")
