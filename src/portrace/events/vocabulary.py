"""The words every stage shares: the contract's version and schema, address
families, protocols and TCP states by the kernel's numbers, errno names, the
event time format, and text made safe to print."""

from __future__ import annotations

import errno as errno_mod
import json
import re
import socket
from datetime import datetime, timezone
from importlib import resources
from typing import Any

# The contract's version, on every ``ready``; it changes only if a field is ever
# renamed or dropped (fields are only added). docs/events.md; the schema:
SCHEMA_VERSION = 1
SCHEMA = "schema/events.schema.json"  # package data, read by schema()
FAMILIES = {socket.AF_INET: "inet", socket.AF_INET6: "inet6"}
PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", 0: "unknown"}

# include/net/tcp_states.h. 13 is TCP_BOUND_INACTIVE (6.5+), which sock_diag
# accepts in a request's state mask but reports bound-only sockets as CLOSE.
TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
    13: "BOUND_INACTIVE",
}


def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of every event, shipped with the package."""
    loaded: dict[str, Any] = json.loads((resources.files("portrace") / SCHEMA).read_text())
    return loaded


def tcp_state_name(num: int) -> str:
    return TCP_STATES.get(num, f"STATE_{num}")


def errno_name(num: int) -> str:
    return errno_mod.errorcode.get(num, str(num))


def iso(ts: datetime) -> str:
    """ISO 8601 in UTC with microseconds, e.g. ``2026-11-24T09:12:03.123456Z``."""
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# C0 and C1 controls, DEL, and the Unicode marks that reorder or break lines.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e"
                          "\u2066-\u2069]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """``text`` safe to print: a process names itself (comm, argv[0]), so a
    name may carry escape sequences or newlines that would forge output.
    Control characters become ``\\x1b``, newlines ``\\n``."""
    return _UNPRINTABLE.sub(
        lambda m: _ESCAPES.get(m.group(), f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                               else f"\\u{ord(m.group()):04x}"), text)


def format_endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def errno_number(name: str | None) -> int:
    """errno_name's inverse: 0 for None or a name this Python does not know."""
    num = getattr(errno_mod, name, None) if name else None
    return num if isinstance(num, int) else 0
