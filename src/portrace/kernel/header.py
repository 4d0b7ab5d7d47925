"""The numbers the kernel side and the frontend share, read from
``bpf/portrace.h``, the header both engines' programs are built from, so none
is copied by hand: its enums (each enumerator with an explicit value) and its
integer ``#define PT_*`` lines. Most are ``#define``s, which never reach BTF,
and the bcc engine has no object BTF at all; the header serves both."""

from __future__ import annotations

import functools
import re
from importlib import resources
from pathlib import Path

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_NUMBER = r"(-?(?:0[xX][0-9a-fA-F]+|[0-9]+))[uUlL]*"
_DEFINE = re.compile(rf"^#define\s+(PT_\w+)\s+{_NUMBER}\s*$", re.M)
_ENUM = re.compile(r"\benum\s+(\w+)\s*\{(.*?)\}\s*;", re.S)
_ENUMERATOR = re.compile(rf"^\s*(\w+)\s*=\s*{_NUMBER}\s*$")


class HeaderError(LookupError):
    """The header lacks a name portrace reads, or says it in a form this
    reader does not take (an enumerator without an explicit value)."""


def bpf_dir() -> Path:
    """Where ``bpf/`` is installed (package data): sources and the CO-RE object."""
    return Path(str(resources.files("portrace"))) / "bpf"


def _int(text: str) -> int:
    sign, digits = (-1, text[1:]) if text.startswith("-") else (1, text)
    return sign * (int(digits, 16) if digits[:2] in ("0x", "0X") else int(digits, 10))


def parse_enums(text: str) -> dict[str, dict[str, int]]:
    """``{enum name: {enumerator: value}}`` of a C header. Raises HeaderError
    for an enumerator without ``= value``."""
    enums: dict[str, dict[str, int]] = {}
    for enum in _ENUM.finditer(_COMMENT.sub("", text)):
        items = enums[enum[1]] = {}
        for item in filter(str.strip, enum[2].split(",")):
            m = _ENUMERATOR.match(item)
            if m is None:
                raise HeaderError(f"enum {enum[1]}: {item.strip()!r} has no explicit value")
            items[m[1]] = _int(m[2])
    return enums


def parse(text: str) -> dict[str, int]:
    """``{name: value}`` of a C header's enumerators and ``#define PT_*``
    integers. Raises HeaderError as :func:`parse_enums` does."""
    values = {m[1]: _int(m[2]) for m in _DEFINE.finditer(_COMMENT.sub("", text))}
    for items in parse_enums(text).values():
        values.update(items)
    return values


@functools.cache
def _text() -> str:
    return (bpf_dir() / "portrace.h").read_text()


@functools.cache
def _constants() -> dict[str, int]:
    return parse(_text())


@functools.cache
def _enums() -> dict[str, dict[str, int]]:
    return parse_enums(_text())


def enum(name: str) -> dict[str, int]:
    """``enum name``'s enumerators in bpf/portrace.h. Raises HeaderError."""
    try:
        return dict(_enums()[name])
    except KeyError:
        raise HeaderError(f"enum {name} is not in {bpf_dir() / 'portrace.h'}") from None


def value(name: str) -> int:
    """The value of ``name`` in bpf/portrace.h. Raises HeaderError."""
    try:
        return _constants()[name]
    except KeyError:
        raise HeaderError(f"{name} is not in {bpf_dir() / 'portrace.h'}") from None
