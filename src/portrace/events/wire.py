"""How a typed event's fields travel as JSON, declared on each field
(:func:`on_wire`), and the one writer and one reader that follow from those
declarations (:func:`write`, :func:`read`).

A field says its JSON key, the JSON types a reader accepts, what a reader
takes when the key is absent, and how its value is encoded and decoded. The
few fields whose JSON is not their own value alone (an ``options`` object with
its ``source``, a pair written as ``[low, high]``, an owner written as
``pid``/``comm``) give ``write``/``read`` functions of the whole object
instead. The JSON key order is the declaration order: ``type`` first, then
each field, or where its ``after`` says (the contract's order since version 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

WIRE = "portrace.wire"  # the key of a field's declaration in its metadata
REQUIRED: Any = object()  # a reader needs the key: Malformed without it
OMIT: Any = object()  # what a write returns to leave its key out
_ABSENT: Any = object()

# The views an object is written in: an event of its own, or a failed call's
# fields inside its ``*_error`` event, where a few more of them are shown.
EVENT, FAILURE = "event", "failure"


class Malformed(ValueError):
    """A JSON object that is not a well-formed portrace event; the message
    names the field (``blockers[0].local.port is missing``)."""


@dataclass(frozen=True)
class Wire:
    """One field's JSON: see :func:`on_wire`."""

    key: str | None = None
    kinds: tuple[type, ...] = ()
    absent: Any = REQUIRED
    encode: Callable[[Any], Any] | None = None
    decode: Callable[[Any, str], Any] | None = None
    write: Callable[[Any], Any] | None = None
    read: Callable[[Mapping[str, Any], str], Any] | None = None
    spread: bool = False
    after: str | None = None
    views: tuple[str, ...] = (EVENT, FAILURE)
    shown: bool = True


def on_wire(default: Any = dataclasses.MISSING, *, init: bool = True, key: str | None = None,
            kinds: tuple[type, ...] = (), absent: Any = REQUIRED,
            encode: Callable[[Any], Any] | None = None,
            decode: Callable[[Any, str], Any] | None = None,
            write: Callable[[Any], Any] | None = None,
            read: Callable[[Mapping[str, Any], str], Any] | None = None,
            spread: bool = False, after: str | None = None,
            views: tuple[str, ...] = (EVENT, FAILURE), shown: bool = True,
            factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with its JSON declared:

    - ``key``: its JSON key (default: the field's name);
    - ``kinds``: the JSON types a reader accepts (null only if ``type(None)``
      is one); ``absent``: what a reader takes when the key is missing, or null
      where null is not a kind (default: Malformed, the key is required);
    - ``encode``/``decode``: value -> JSON and (JSON, its path) -> value;
    - ``write``/``read``: the same from the whole object, for a JSON value that
      is not this field's alone; ``write`` may return OMIT, and with ``spread``
      a dict of keys written in its place;
    - ``after``: the key it follows in the JSON, where that is not its place
      in the declaration (``""``: first, the keys written so far winning a
      clash); ``views``: where it is written; ``shown=False``: kept off the
      wire (a reader gives it ``absent``)."""
    meta = {WIRE: Wire(key, kinds, absent, encode, decode, write, read, spread, after, views,
                       shown)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, init=init, metadata=meta)
    return dataclasses.field(default=default, init=init, metadata=meta)


def _wire(f: dataclasses.Field[Any]) -> Wire:
    return f.metadata.get(WIRE) or Wire()


def write(obj: Any, view: str = EVENT) -> dict[str, Any]:
    """The JSON object of a wire dataclass, as its fields declare it."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        w = _wire(f)
        if not w.shown or view not in w.views:
            continue
        if w.write is not None:
            value = w.write(obj)
        else:
            value = getattr(obj, f.name)
            if w.encode is not None:
                value = w.encode(value)
        if value is OMIT:
            continue
        items = value.items() if w.spread else [(w.key or f.name, value)]
        if w.after is None:
            out.update(items)
        elif w.after == "":  # first, and the keys written so far win a clash
            out = {**dict(items), **out}
        else:
            keys = list(out)
            at = keys.index(w.after) + 1
            out = {**{k: out[k] for k in keys[:at]}, **dict(items),
                   **{k: out[k] for k in keys[at:]}}
    if "type" in out:
        out = {"type": out.pop("type"), **out}
    return out


def get(d: Any, key: str, kinds: tuple[type, ...], where: str = "",
        absent: Any = REQUIRED) -> Any:
    """``d[key]`` if it is one of ``kinds``; ``absent`` if it is missing (or
    null where null is not a kind); else Malformed, naming ``where`` + key."""
    if not isinstance(d, dict):
        raise Malformed(f"{where.rstrip('.') or 'event'} is not an object")
    value = d.get(key, _ABSENT)
    if value is _ABSENT or (value is None and type(None) not in kinds):
        if absent is not REQUIRED:
            return absent
        raise Malformed(f"{where}{key} is missing")
    if isinstance(value, bool) and bool not in kinds:
        raise Malformed(f"{where}{key} has the wrong type (bool)")
    if kinds and not isinstance(value, kinds):
        raise Malformed(f"{where}{key} has the wrong type ({type(value).__name__})")
    return value


def read(cls: type[Any], d: Any, where: str = "") -> Any:
    """The ``cls`` a JSON object declares, its fields read in declaration
    order; Malformed names the first missing or mistyped one."""
    if not isinstance(d, dict):
        raise Malformed(f"{where.rstrip('.') or 'event'} is not an object")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        w = _wire(f)
        if w.read is not None:
            values[f.name] = w.read(d, where)
        elif not w.shown:
            values[f.name] = w.absent
        else:
            value = get(d, w.key or f.name, w.kinds, where, _ABSENT if w.absent is not REQUIRED
                        else REQUIRED)
            if value is _ABSENT:
                value = w.absent
            elif w.decode is not None:
                value = w.decode(value, f"{where}{w.key or f.name}")
            values[f.name] = value
    return cls(**values)
