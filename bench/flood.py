"""Lost records under a bind() flood (figures, not pass/fail; root; part of
`make bench`): a flood on a watched port against the default ring buffer with
a normally polling consumer, per engine: delivered vs lost, which must add up.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

from portrace.events import Lost, SocketCall
from portrace.pipeline.tracer import Tracer

RUNS = 5
PORT = 19290


def flood(engine: str, binds: int, workers: int) -> None:
    seen: list[object] = []
    tracer = Tracer([PORT], seen.append, engine_name=engine)  # default ring buffer
    tracer.start()
    stop = threading.Event()
    poller = threading.Thread(target=tracer.run, args=(stop,))
    poller.start()
    per = binds // workers
    t0 = time.monotonic()
    pids = []
    for w in range(workers):
        pid = os.fork()
        if pid == 0:  # one loopback address each, or the workers would conflict
            for _ in range(per):
                with socket.socket() as s:
                    s.bind((f"127.0.0.{w + 1}", PORT))
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    elapsed = time.monotonic() - t0
    time.sleep(0.5)
    stop.set()
    poller.join()
    tracer.close()
    delivered = sum(1 for e in seen if isinstance(e, SocketCall))
    lost = sum(e.count for e in seen if isinstance(e, Lost))
    print(f"flood ({engine}): {per * workers} binds from {workers} processes in {elapsed:.2f} s "
          f"({per * workers / elapsed:,.0f}/s): delivered {delivered}, lost {lost}, "
          f"accounted {delivered + lost}")


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench: run as root (make bench)")
    for engine in ("core", "bcc"):
        flood(engine, 20000, 1)
        flood(engine, 100000, 2)
