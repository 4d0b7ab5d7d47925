"""shared/DESIGN.md's JSON event contract, as checks (fields may be added)."""

from __future__ import annotations

import re
from typing import Any

ISO_TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
TCP_STATES = {"ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT",
              "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING"}
CAUSES = {"listener", "connected_socket", "bound_socket", "time_wait", "fin_wait2",
          "udp_socket", "ephemeral_exhausted", "unknown", "not_a_conflict"}


def _endpoint(ep: Any) -> None:
    assert set(ep) >= {"addr", "port"} and isinstance(ep["port"], int), ep


def check(ev: dict[str, Any]) -> None:
    assert isinstance(ev["type"], str) and ISO_TS.match(ev["ts"]), ev
    t = ev["type"]
    if t == "ready":
        assert ev["engine"] and isinstance(ev["kernel"], str)
        assert all(isinstance(p, int) for p in ev["ports"])
    elif t == "lost":
        assert isinstance(ev["count"], int) and ev["count"] > 0
        assert ev["source"] in ("kernel", "limit", "queue")
    elif t == "error":
        assert ev["where"] and isinstance(ev["message"], str) and ev["count"] > 0
    elif t == "state":
        assert set(ev) >= {"skaddr", "protocol", "family", "local", "remote", "old", "new",
                           "pid", "comm"}
        _endpoint(ev["local"])
        _endpoint(ev["remote"])
        assert ev["old"] in TCP_STATES | {"NEW_SYN_RECV"} and ev["new"] in TCP_STATES
    elif t in ("bind_error", "listen_error", "connect_error"):
        assert set(ev) >= {"pid", "tid", "comm", "cmdline", "uid", "errno", "protocol",
                           "family", "addr", "port", "blockers", "verdict"}
        assert ev["protocol"] in ("tcp", "udp", "unknown")
        assert ev["family"] in ("inet", "inet6")
        assert set(ev["verdict"]) >= {"cause", "advice"}
        assert ev["verdict"]["cause"] in CAUSES
        for b in ev["blockers"]:
            assert set(b) >= {"state", "protocol", "family", "local", "remote", "processes",
                              "inode", "uid", "expires_s", "closed_by"}
            _endpoint(b["local"])
            if b["remote"] is not None:
                _endpoint(b["remote"])
            for p in b["processes"]:
                assert set(p) >= {"pid", "comm"}
            if b["closed_by"] is not None:
                assert set(b["closed_by"]) >= {"pid", "comm", "ts"}
                assert ISO_TS.match(b["closed_by"]["ts"])
            assert b["expires_s"] is None or isinstance(b["expires_s"], float)
            assert b["processes_total"] >= len(b["processes"])
        assert ev["blockers_total"] >= len(ev["blockers"])
    elif t == "repeats":
        assert ev["count"] > 0 and ISO_TS.match(ev["since"]) and ev["errno"]
    elif t in ("bind", "listen"):  # successes: recovery made visible
        assert set(ev) >= {"pid", "comm", "addr", "port"}
    else:
        raise AssertionError(f"unknown event type {t!r}")
