"""Loopback connection churn (the load generator of `make bench`): a server
that accepts and closes first (its side goes to TIME_WAIT, so the client's
ephemeral ports never run out) and CLIENTS processes that connect and close
as fast as they can, for SECONDS. Prints the connections made per second.

    python bench/churn.py PORT SECONDS [CLIENTS]

Run it in a throwaway network namespace (bench/engines.py does) so the host's
TIME_WAIT table is not touched.
"""

from __future__ import annotations

import os
import socket
import sys
import time


def serve(port: int, ready_w: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(4096)
    os.write(ready_w, b"x")
    while True:
        conn, _ = srv.accept()
        conn.close()  # active close: TIME_WAIT on the server side


def client(port: int, seconds: float, out_w: int) -> None:
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", port))
            s.recv(1)  # the server's FIN: it closed first
            n += 1
        except OSError:
            pass
        s.close()
    os.write(out_w, f"{n}\n".encode())


def churn(port: int, seconds: float, clients: int = 1) -> float:
    """Connections per second over ``seconds`` (forks a server and clients)."""
    ready_r, ready_w = os.pipe()
    server = os.fork()
    if server == 0:
        serve(port, ready_w)
        os._exit(0)
    os.read(ready_r, 1)
    out_r, out_w = os.pipe()
    kids = []
    for _ in range(clients):
        pid = os.fork()
        if pid == 0:
            client(port, seconds, out_w)
            os._exit(0)
        kids.append(pid)
    for pid in kids:
        os.waitpid(pid, 0)
    os.kill(server, 9)
    os.waitpid(server, 0)
    total = sum(int(x) for x in os.read(out_r, 4096).split())
    for fd in (ready_r, ready_w, out_r, out_w):
        os.close(fd)
    return total / seconds


if __name__ == "__main__":
    port, secs = int(sys.argv[1]), float(sys.argv[2])
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    print(f"{churn(port, secs, n):.0f}")
