"""The typed events every stage passes on, each field declared once with its JSON
(model, wire), the words they use (vocabulary), and their one writer and reader."""

from __future__ import annotations

from typing import Any

from portrace.events.model import (
    TYPES,
    UNKNOWN_OPTS,
    UNKNOWN_SOURCE,
    AddressState,
    Blocker,
    CallError,
    CgroupProgram,
    Check,
    Closer,
    Endpoint,
    ErrorRecord,
    Event,
    Lost,
    Netns,
    Owner,
    Pod,
    Policy,
    PortRule,
    PortUsage,
    ProcessRef,
    Ready,
    Repeats,
    SnapshotSource,
    SocketCall,
    SockOpts,
    StateChange,
    Task,
    Verdict,
    failure_summary,
)
from portrace.events.vocabulary import (
    FAMILIES,
    PROTOCOLS,
    SCHEMA,
    SCHEMA_VERSION,
    TCP_STATES,
    errno_name,
    errno_number,
    format_endpoint,
    iso,
    printable,
    schema,
    tcp_state_name,
)
from portrace.events.wire import Malformed, read, write

EVENT_TYPES = tuple(TYPES)
_EVENTS = tuple(set(TYPES.values()))


def to_json(ev: Event) -> dict[str, Any]:
    """The JSON object for one event (docs/events.md). Raises TypeError for
    anything else."""
    if not isinstance(ev, _EVENTS):
        raise TypeError(f"not an event: {ev!r}")
    return write(ev)


def from_json(d: Any) -> Event:
    """The typed event of one JSON object (to_json's inverse, for what the
    readers use). Raises Malformed, naming the first missing or mistyped field."""
    kind = d.get("type") if isinstance(d, dict) else None
    cls = TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise Malformed("not a portrace event")
    event: Event = read(cls, d)
    return event


__all__ = [
    "EVENT_TYPES", "FAMILIES", "PROTOCOLS", "SCHEMA", "SCHEMA_VERSION", "TCP_STATES",
    "UNKNOWN_OPTS", "UNKNOWN_SOURCE", "AddressState", "Blocker", "CallError", "CgroupProgram",
    "Check", "Closer", "Endpoint", "ErrorRecord", "Event", "Lost", "Malformed", "Netns", "Owner",
    "Pod", "Policy", "PortRule", "PortUsage", "ProcessRef", "Ready", "Repeats", "SnapshotSource",
    "SockOpts",
    "SocketCall", "StateChange", "Task", "Verdict", "errno_name", "errno_number",
    "failure_summary", "format_endpoint", "from_json", "iso", "printable", "read", "schema",
    "tcp_state_name", "to_json", "write",
]
