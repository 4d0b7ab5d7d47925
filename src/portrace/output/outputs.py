"""Where portrace writes, as root on a host other users share.

- Files are opened without following a final symlink (``O_NOFOLLOW``), and
  made new with ``O_EXCL`` and mode 0600: a link planted in /tmp by another
  user cannot turn portrace's write into a write of any file.
- Several outputs (the screen, ``-o FILE``) are fed by :class:`Fanout`: an
  output that fails (a full disk) is counted and reported to the others as an
  ``error`` event, and never stops them; a closed stdout stops portrace.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from portrace.errors import UnsafePath
from portrace.events import CallError, ErrorRecord, Event, failure_summary

Sink = Callable[[Event], None]
PRIVATE = 0o600


def open_private(path: Path, append: bool) -> IO[str]:
    """Open ``path`` for writing text: a new file is created 0600 with
    O_EXCL; an existing one is opened with O_NOFOLLOW (never through a final
    symlink) and must be a regular file or a character device (/dev/null).
    ``append``: else truncated. Raises UnsafePath with a one-line reason."""
    mode = os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, mode | os.O_CREAT | os.O_EXCL, PRIVATE)
    except FileExistsError:
        try:
            fd = os.open(path, mode | (os.O_APPEND if append else 0))
        except OSError as exc:
            raise UnsafePath(_why(path, exc)) from None
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            os.close(fd)
            raise UnsafePath(f"{path}: not a regular file") from None
        if stat.S_ISREG(st.st_mode) and not append:
            os.ftruncate(fd, 0)
    except OSError as exc:
        raise UnsafePath(_why(path, exc)) from None
    f = os.fdopen(fd, "a" if append else "w", encoding="utf-8")
    f.buffer.raw.name = str(path)  # type: ignore[attr-defined]  # for messages, not the fd number
    return f


def _why(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return f"{path} is a symbolic link; portrace does not write through one"
    return f"cannot write {path}: {exc.strerror or exc}"


class Fanout:
    """One sink over named outputs, called in order. An output that raises
    is counted; the others get one ``error`` event about it (then one per
    1000 more), and stderr gets a line. BrokenPipeError from ``stdout``
    propagates: its reader has gone, portrace stops."""

    def __init__(self, outputs: list[tuple[str, Sink]]) -> None:
        self.outputs = outputs
        self.failed: dict[str, int] = {}

    def __call__(self, ev: Event) -> None:
        for name, out in self.outputs:
            try:
                out(ev)
            except BrokenPipeError:
                if name == "stdout":
                    raise
                self._failed(name, BrokenPipeError(errno.EPIPE, "Broken pipe"), ev)
            except (OSError, ValueError) as exc:  # ENOSPC, EIO; ValueError: closed file
                self._failed(name, exc, ev)

    def _failed(self, name: str, exc: Exception, ev: Event) -> None:
        n = self.failed[name] = self.failed.get(name, 0) + 1
        if n != 1 and n % 1000:
            return
        record = ErrorRecord(ts=datetime.now(timezone.utc), where=f"output {name}",
                             message=f"{type(exc).__name__}: {exc}", count=n,
                             failure=failure_summary(ev.attempt)
                             if isinstance(ev, CallError) else None)
        print(f"portrace: cannot write to {name} ({n} events so far): {exc}",
              file=sys.stderr, flush=True)
        for other, out in self.outputs:
            if other != name:
                with contextlib.suppress(OSError, ValueError):
                    out(record)  # that one counts its own failures on its next event
