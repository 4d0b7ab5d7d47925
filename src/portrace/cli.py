"""``portrace [OPTIONS] [PORT]...`` watches; ``portrace demo`` shows it working.

Every error a user can cause is one line on stderr and a distinct exit code
(see portrace.errors.EXIT_CODES); never a traceback.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence
from typing import IO

import click
import psutil

from portrace import errors
from portrace.events import Event, SocketCall, StateChange
from portrace.evidence import JsonLinesSink
from portrace.render import terminal_sink
from portrace.tracer import Tracer

EXIT_HELP = "\b\nExit codes:\n" + "\n".join(
    f"  {code}  {text}" for code, text in sorted(errors.EXIT_CODES.items())
)


class WatchByDefault(click.Group):
    """``portrace 9090`` means ``portrace watch 9090``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = ["watch", *args]
        return super().parse_args(ctx, args)


@click.group(cls=WatchByDefault, epilog=EXIT_HELP,
             context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Name what blocks a port the moment bind() fails with EADDRINUSE.

    portrace [OPTIONS] [PORT]...   watch these ports (none: every port)
    """


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(_sig: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


@cli.command()
@click.argument("ports", nargs=-1, type=click.IntRange(1, 65535))
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON Lines (shared/DESIGN.md's contract) instead of text.")
@click.option("-o", "--output", type=click.File("a", lazy=False),
              help="Also append every event as JSON Lines to this file.")
@click.option("-p", "--pid", type=click.IntRange(1), help="Only failures of this process.")
@click.option("--states", is_flag=True,
              help="Also print TCP state transitions and successful binds on the ports.")
def watch(ports: Sequence[int], as_json: bool, output: IO[str] | None, pid: int | None,
          states: bool) -> None:
    """Watch PORTs (default: every port) until Ctrl-C or SIGTERM."""
    if pid is not None and not psutil.pid_exists(pid):
        raise click.BadParameter(f"no process {pid}", param_hint="'-p' / '--pid'")
    shown = JsonLinesSink(sys.stdout) if as_json else terminal_sink(states=True)
    recorded = JsonLinesSink(output) if output is not None else None

    def sink(ev: Event) -> None:
        # Transitions and successful binds reach the screen only with --states;
        # the evidence file gets everything.
        if states or not isinstance(ev, (StateChange, SocketCall)):
            shown(ev)
        if recorded is not None:
            recorded(ev)

    stop = _stop_on_signals()
    tracer = Tracer(ports, sink, pid=pid)
    try:
        tracer.start()
        tracer.run(stop)
    finally:
        tracer.close()


@cli.command()
@click.option("--port", type=click.IntRange(1, 65534), default=9090, show_default=True,
              help="First of the two ports the demo uses, inside its own network namespace.")
def demo(port: int) -> None:
    """Stage two real conflicts in a throwaway netns and diagnose them."""
    from portrace.demo import run_demo

    sys.exit(run_demo(port))


def main(argv: Sequence[str] | None = None) -> None:
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="portrace",
                 standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"portrace: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(130)
    except errors.PortraceError as exc:
        click.echo(f"portrace: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)  # before the probes were attached
    sys.exit(0)
