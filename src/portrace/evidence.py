"""JSON Lines evidence (shared/DESIGN.md's contract): writers and the reader.

A recorder writes into a directory of segments named by their start time,
``portrace-20261124T091203.123456Z.jsonl``. Each event is written and flushed on
its own, so a finished event survives SIGTERM or a crash of the writer. When
a segment would grow past ``max_bytes`` it is closed and gzipped (to a
temporary name, then renamed, so no state is ever half-written) and only the
newest ``keep`` compressed segments are kept. Files are 0600, the directory
0700: evidence names processes and addresses.

The reader takes files and directories, plain or gzipped, in time order; a
torn last line (the writer died mid-write) or a corrupt line is skipped and
counted, never fatal.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from portrace.errors import PortraceError
from portrace.events import Event, to_json

SEGMENT_PREFIX = "portrace-"
PLAIN, GZIPPED = ".jsonl", ".jsonl.gz"
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_KEEP = 8
KNOWN_TYPES = {"ready", "state", "bind", "listen", "bind_error", "listen_error",
               "connect_error", "lost", "repeats"}


class EvidenceError(PortraceError):
    """Evidence that cannot be read: nothing there, or not portrace's."""

    exit_code = 10


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


def _compress(plain: Path) -> Path:
    """gzip ``plain`` next to it, atomically, and remove it."""
    final = plain.with_name(plain.name + ".gz")
    tmp = plain.with_name(plain.name + ".gz.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb",
                                                     filename=plain.name) as gz, \
            open(plain, "rb") as src:
        shutil.copyfileobj(src, gz)
    os.replace(tmp, final)
    plain.unlink()
    return final


class EvidenceDir:
    """A size-bounded, rotating JSON Lines recorder in ``directory``.

    Bound: the live segment stays under ``max_bytes`` (one event larger than
    that gets a segment of its own) and at most ``keep`` compressed segments
    remain, so the directory holds at most ``max_bytes`` plus ``keep``
    compressed segments of ``max_bytes`` each before compression.
    Raises OSError when the directory cannot be made or written.
    """

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_MAX_BYTES,
                 keep: int = DEFAULT_KEEP) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.keep = keep
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        for tmp in self.dir.glob(SEGMENT_PREFIX + "*" + GZIPPED + ".tmp"):
            tmp.unlink()  # a compression that a crash interrupted; its source is intact
        for leftover in sorted(self.dir.glob(SEGMENT_PREFIX + "*" + PLAIN)):
            _compress(leftover)  # segments of an earlier run: finished, so compress
        self._prune()
        self._open()

    def _open(self) -> None:
        name = _segment_name(datetime.now(timezone.utc))
        self.path = self.dir / name
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "w", encoding="utf-8")
        self.size = 0

    def _prune(self) -> None:
        done = sorted(self.dir.glob(SEGMENT_PREFIX + "*" + GZIPPED))
        for old in done[:max(0, len(done) - self.keep)]:
            old.unlink()

    def rotate(self) -> None:
        self._file.close()
        _compress(self.path)
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


@dataclass
class ReadReport:
    """What the reader skipped, per file: torn last lines and corrupt lines."""

    files: list[Path] = field(default_factory=list)
    torn: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)

    def warnings(self) -> list[str]:
        out = [f"skipped a torn last line (the writer stopped mid-line): {t}" for t in self.torn]
        out += [f"skipped an unreadable line: {c}" for c in self.corrupt]
        return out


def segments(paths: Iterable[Path]) -> list[Path]:
    """Evidence files under ``paths`` in time order. Raises EvidenceError
    for a path that does not exist or a directory with no evidence."""
    out: list[Path] = []
    for p in map(Path, paths):
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
    return out


def _lines(path: Path) -> Iterator[tuple[int, str, bool]]:
    """(line number, text, complete?) of a plain or gzipped file."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:  # type: ignore[operator]
            for n, line in enumerate(f, 1):
                yield n, line, line.endswith("\n")
    except EOFError:
        return  # a gzip segment cut short (e.g. a partial copy): what was read stands
    except gzip.BadGzipFile:
        raise EvidenceError(f"{path} is not portrace evidence (not gzip data)") from None
    except OSError as exc:
        raise EvidenceError(f"cannot read {path}: {exc}") from None


def read(paths: Iterable[Path], report: ReadReport | None = None) -> Iterator[dict[str, Any]]:
    """Every event in the evidence at ``paths``. Raises EvidenceError for a
    file that is not portrace evidence (no line of it is an event)."""
    report = report if report is not None else ReadReport()
    for path in segments(paths):
        report.files.append(path)
        good = 0
        first_bad: str | None = None
        for n, text, complete in _lines(path):
            if not text.strip():
                continue
            try:
                ev = json.loads(text)
                if not (isinstance(ev, dict) and ev.get("type") in KNOWN_TYPES and "ts" in ev):
                    raise ValueError("not an event")
            except ValueError:
                where = f"{path}:{n}"
                (report.corrupt if complete else report.torn).append(where)
                first_bad = first_bad or text.strip()[:60]
                continue
            good += 1
            yield ev
        if not good and first_bad is not None:
            raise EvidenceError(f"{path} is not portrace evidence (first line: {first_bad!r})")
