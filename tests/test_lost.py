"""Lost records are counted and reported, never silent: a one-page ring
buffer that nobody drains while 2000 binds happen must account for each."""

from __future__ import annotations

import socket
import threading

from conftest import bpf_unavailable, need_root

from portrace.errors import PortraceError
from portrace.events import Lost, SocketCall
from portrace.pipeline.tracer import Tracer

PORT = 19190
BINDS = 2000


def test_every_record_is_delivered_or_counted_lost(engine):
    need_root()
    seen: list[object] = []
    tracer = Tracer([PORT], seen.append, ringbuf_pages=1, engine_name=engine)
    try:
        tracer.start()
    except PortraceError as exc:
        bpf_unavailable(str(exc))
    try:
        for _ in range(BINDS):  # each bind() on the watched port is one record
            with socket.socket() as s:
                s.bind(("127.0.0.1", PORT))
        stop = threading.Event()
        stop.set()
        tracer.run(stop)  # drains what fit, then reports what did not
    finally:
        tracer.close()
    delivered = sum(1 for e in seen if isinstance(e, SocketCall) and e.port == PORT)
    lost = sum(e.count for e in seen if isinstance(e, Lost))
    assert lost > 0, "a 4 KiB ring buffer cannot hold 2000 records"
    assert delivered + lost == BINDS
    assert tracer.lost_total == lost
