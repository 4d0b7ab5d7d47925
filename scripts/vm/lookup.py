"""In a VM: how the CO-RE engine sees the calls on this kernel (fexit or the
syscall tracepoints), the paths it takes to one port's sockets and holders,
and whether they agree with the iterators' answer. One JSON
line per protocol (scripts/vm/vagrant-run.sh; asserted by tests/test_vm.py).

Both engines are attached before the sockets are made, so the bind() and
listen() are seen and the holders can come from the binder's own fds."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from typing import Any

from portrace.kernel.core import CoreEngine
from portrace.kernel.engine import Snapshot

PORT = 9300


def view(snap: Snapshot) -> list[Any]:
    """What a verdict reads of a snapshot, in a comparable order."""
    return sorted((s.protocol, s.family, s.state, str(s.local), str(s.remote), s.inode,
                   sorted((h.pid, h.fds) for h in snap.holders.get(s.inode, ())))
                  for s in snap.sockets)


def main() -> None:
    engines = {walk: CoreEngine([PORT], lambda ev: None, walk=walk) for walk in (True, False)}
    for e in engines.values():
        e.open()
    listener = socket.create_server(("127.0.0.1", PORT))
    client = socket.create_connection(("127.0.0.1", PORT))
    child, _ = listener.accept()
    udp4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp4.bind(("127.0.0.1", PORT))
    udp6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp6.bind(("::1", PORT))
    time.sleep(0.2)
    netns = os.stat("/proc/self/ns/net").st_ino
    for proto in ("tcp", "udp"):
        snaps = {}
        for walk, e in engines.items():
            e.poll(0)  # the owners map is the kernel's; nothing to wait for
            snaps[walk] = e.snapshot(PORT, (proto,), None, netns, (), True)
        src = snaps[True].source
        print(json.dumps({"kernel": os.uname().release, "protocol": proto,
                          "probes": engines[True].probes, "left_out": engines[True].off,
                          "source": dataclasses.asdict(src) if src else None,
                          "sockets": len(snaps[True].sockets),
                          "same": view(snaps[True]) == view(snaps[False])}))
    for s in (listener, client, child, udp4, udp6):
        s.close()
    for e in engines.values():
        e.close()


if __name__ == "__main__":
    main()
