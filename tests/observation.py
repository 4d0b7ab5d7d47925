"""A recorded observation: the socket snapshot a check or a failure was judged
on (sockets.Snapshot), as JSON, so the judging (pure functions of it) can be
replayed without root. `python tests/observation.py` re-records the files in
tests/observations/ on a real kernel (root, the CO-RE engine)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from portrace.commands.check import Looker, Wanted
from portrace.events import Endpoint, Netns, SockOpts
from portrace.kernel.engine import Holder, Snapshot, SocketEntry

HERE = Path(__file__).resolve().parent / "observations"


def snapshot_json(snap: Snapshot) -> dict[str, Any]:
    return {"sockets": [dataclasses.asdict(s) for s in snap.sockets],
            "holders": {str(inode): [dataclasses.asdict(h) for h in hs]
                        for inode, hs in snap.holders.items()},
            "sysctls": snap.sysctls, "holders_complete": snap.holders_complete}


def snapshot_from(d: dict[str, Any]) -> Snapshot:
    def entry(s: dict[str, Any]) -> SocketEntry:
        return SocketEntry(**{**s, "local": Endpoint(**s["local"]),
                              "remote": Endpoint(**s["remote"]) if s["remote"] else None,
                              "opts": SockOpts(**s["opts"]) if s["opts"] else None})
    return Snapshot(sockets=[entry(s) for s in d["sockets"]],
                    holders={int(i): [Holder(**{**h, "fds": tuple(h["fds"])}) for h in hs]
                             for i, hs in d["holders"].items()},
                    sysctls=d["sysctls"], holders_complete=d["holders_complete"])


def wanted_from(d: dict[str, Any]) -> Wanted:
    return Wanted(d["protocol"], d["addr"], d["port"], SockOpts(**d["opts"]), d["uid"])


def record(name: str, wanted: Wanted, netns: str, expect: dict[str, Any]) -> None:
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        ns = Netns(inode=os.fstat(fd).st_ino, source="pinned", name=netns)
        looker = Looker("core", fd, ns).open()
        try:
            snap = looker.snapshot(wanted.port, wanted.protocol)
        finally:
            looker.close()
    finally:
        os.close(fd)
    (HERE / f"{name}.json").write_text(json.dumps({
        "recorded_on": os.uname().release, "engine": "core",
        "wanted": {**dataclasses.asdict(wanted)}, "snapshot": snapshot_json(snap),
        "expect": expect}, indent=1) + "\n")


def main() -> None:
    from portrace.commands.stage import ScratchNetns, Staged

    plain = SockOpts(reuseaddr=False, reuseport=False, v6only=None, bound_to_device=False)
    reuse = dataclasses.replace(plain, reuseaddr=True)
    with ScratchNetns("portrace-observe") as ns:
        Staged("timewait", "127.0.0.1", 9090, name="old-server", netns=ns).release()
        record("time-wait-old-plain", Wanted("tcp", "0.0.0.0", 9090, reuse), ns.name,
               {"free": False, "cause": "time_wait"})
        Staged("timewait", "127.0.0.1", 9091, "--reuseaddr", name="old-server",
               netns=ns).release()
        record("time-wait-both-reuseaddr", Wanted("tcp", "0.0.0.0", 9091, reuse), ns.name,
               {"free": True, "cause": None})
        record("time-wait-new-plain", Wanted("tcp", "0.0.0.0", 9091, plain), ns.name,
               {"free": False, "cause": "time_wait"})
        dual = Staged("listen", "::", 9092, "--hold", name="dual-stack", netns=ns)
        record("dual-stack-listener-covers-ipv4", Wanted("tcp", "0.0.0.0", 9092, plain),
               ns.name, {"free": False, "cause": "listener"})
        dual.release()
        v6 = Staged("listen", "::", 9093, "--v6only", "1", "--hold", name="v6-only", netns=ns)
        record("v6only-listener-leaves-ipv4", Wanted("tcp", "0.0.0.0", 9093, plain), ns.name,
               {"free": True, "cause": None})
        v6.release()


if __name__ == "__main__":
    sys.exit(main())
