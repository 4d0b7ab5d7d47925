"""The CLI's parameter types: each turns one option's text into its value,
or fails with click's one-line usage error (exit 2)."""

from __future__ import annotations

import ipaddress
import math
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import click

from portrace.output.outputs import open_private


class PrivateFile(click.ParamType):
    """A file to write as root: never through a symlink, new files 0600
    (portrace.output.outputs.open_private); ``-`` is stdout."""

    name = "file"

    def __init__(self, append: bool) -> None:
        self.append = append

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> IO[str]:
        if not isinstance(value, str):
            return value  # type: ignore[return-value]
        if value == "-":
            return sys.stdout
        return open_private(Path(value), append=self.append)


class Finite(click.FloatRange):
    """A FloatRange that also refuses nan and inf."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class ByteSize(click.ParamType):
    """A size in bytes: 1048576, 512K, 16M, 1G."""

    name = "size"
    UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("B")
        unit = text[-1:] if text[-1:] in self.UNITS else ""
        try:
            size = int(text[: len(text) - len(unit)]) * self.UNITS[unit]
        except ValueError:
            self.fail(f"{value!r} is not a size (e.g. 16M)", param, ctx)
        if size < 4096:
            self.fail(f"{value!r} is below 4K", param, ctx)
        return size


class HostPort(click.ParamType):
    """HOST:PORT to listen on: 127.0.0.1:9464, [::1]:9464, 0.0.0.0:9464."""

    name = "host:port"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value
        host, sep, port = str(value).rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            if not sep or not 1 <= int(port) <= 65535:
                raise ValueError
            ipaddress.ip_address(host)
        except ValueError:
            self.fail(f"{value!r} is not HOST:PORT with an IP address (e.g. 127.0.0.1:9464)",
                      param, ctx)
        return host, int(port)


class Timestamp(click.ParamType):
    """ISO 8601, e.g. 2026-11-24T09:12:03Z; without a zone it is UTC."""

    name = "time"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            ts = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 time (e.g. 2026-11-24T09:12:03Z)",
                      param, ctx)
        return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)


class Address(click.ParamType):
    """An IPv4 or IPv6 address (no port, no brackets)."""

    name = "address"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        try:
            return str(ipaddress.ip_address(str(value)))
        except ValueError:
            self.fail(f"{value!r} is not an IPv4 or IPv6 address", param, ctx)
