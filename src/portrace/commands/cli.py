"""``portrace [OPTIONS] [PORT]...`` watches; ``portrace demo`` shows it working.

Every error a user can cause is one line on stderr and a distinct exit code
(portrace.errors.ExitStatus); never a traceback.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import click
import psutil

from portrace import errors
from portrace.commands import check as check_mod
from portrace.commands.cli_types import Address, ByteSize, Finite, HostPort, PrivateFile, Timestamp
from portrace.errors import ExitStatus
from portrace.events import Check, Event, SocketCall, SockOpts, StateChange, to_json
from portrace.kernel import capabilities
from portrace.kernel.engine import ENGINES
from portrace.output.evidence import DEFAULT_KEEP, DEFAULT_MAX_BYTES, EvidenceDir, JsonLinesSink
from portrace.output.outputs import Fanout, Sink
from portrace.output.render import format_check, terminal_sink
from portrace.pipeline.tracer import Tracer

EXIT_HELP = "\b\nExit status:\n" + "\n".join(
    f"  {int(status):>3}  {text}" for status, text in sorted(errors.EXIT_TEXT.items()))


class WatchByDefault(click.Group):
    """``portrace 9090`` means ``portrace watch 9090``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # Completing the first word (resilient parsing, nothing typed yet) lists commands.
        if (not args and not ctx.resilient_parsing) or (
                args and args[0] not in self.commands
                and args[0] not in ("--help", "-h", "--version")):
            args = ["watch", *args]
        return super().parse_args(ctx, args)


@click.group(cls=WatchByDefault, epilog=EXIT_HELP,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="portrace", prog_name="portrace",
                      message="%(prog)s %(version)s")
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


def _trace(tracer: Tracer, started: str | None = None,
           finish: Callable[[], None] | None = None) -> None:
    """Start the tracer, drain it until SIGINT or SIGTERM, run ``finish``,
    and exit 0 without waiting for anything else.

    During start-up (bcc compiles for seconds, in C, where no Python handler
    runs) both signals keep their default action: portrace dies at once. At
    the end the probes are detached side by side (else the kernel detaches
    them one grace period at a time as the process exits), and portrace does
    not wait for a diagnosis still under way or for a write stdout's reader
    no longer takes. A closed stdout ends it too."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    tracer.start()
    stop = _stop_on_signals()
    if started:
        click.echo(started, err=True)
    tracer.run(stop)
    tracer.close()  # detaches side by side; frees the engine unless a diagnosis runs
    if finish is not None:
        finish()
    if tracer.broken_pipe:
        _quiet_stdout()
    elif not tracer.busy:  # else its thread may hold stdout's lock, mid-write
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _quiet_stdout() -> None:
    """stdout's reader has gone (``portrace 9090 | head -1``): point fd 1 at
    /dev/null so the interpreter's last flush does not fail, and exit 0."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def engine_option(f: Any) -> Any:
    return click.option(
        "--engine", "engine_name", type=click.Choice(ENGINES), default="auto",
        show_default=True,
        help="core: libbpf CO-RE, reads the kernel's socket state (needs kernel BTF); "
             "bcc: compiles at start (needs kernel headers); auto: core where it runs.")(f)


@cli.command()
@click.argument("ports", nargs=-1, type=click.IntRange(1, 65535))
@engine_option
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON Lines instead of text (docs/events.md; the schema ships in "
                   "the package).")
@click.option("-o", "--output", type=PrivateFile(append=True),
              help="Also append every event as JSON Lines to this file (made 0600; "
                   "never written through a symlink).")
@click.option("-p", "--pid", type=click.IntRange(1), help="Only failures of this process.")
@click.option("--states", is_flag=True,
              help="Also print TCP state transitions and successful binds on the ports.")
@click.option("--coalesce", type=Finite(0), default=1.0, show_default=True,
              metavar="SECONDS",
              help="Count, without diagnosing again, a process's identical failures this soon "
                   "after the last report (0: diagnose each again, except those that come "
                   "while the first is being diagnosed: they count as its repeats).")
def watch(ports: Sequence[int], engine_name: str, as_json: bool, output: IO[str] | None,
          pid: int | None, states: bool, coalesce: float) -> None:
    """Watch PORTs (default: every port) until Ctrl-C or SIGTERM."""
    if pid is not None and not psutil.pid_exists(pid):
        raise click.BadParameter(f"no process {pid}", param_hint="'-p' / '--pid'")
    if sys.stdout is None:
        raise errors.OutputFailed("standard output is closed; give it a reader, or "
                                  "redirect it (e.g. >/dev/null with -o FILE)")
    shown = JsonLinesSink(sys.stdout) if as_json else terminal_sink(states=True)

    def on_screen(ev: Event) -> None:
        # Transitions and successful binds reach the screen only with --states;
        # the evidence file gets everything.
        if states or not isinstance(ev, (StateChange, SocketCall)):
            shown(ev)

    outputs: list[tuple[str, Sink]] = [("stdout", on_screen)]
    if output is not None:
        outputs.append((getattr(output, "name", "-o"), JsonLinesSink(output)))
    tracer = Tracer(ports, Fanout(outputs), pid=pid, coalesce_s=coalesce,
                    engine_name=engine_name, states=states or output is not None)
    _trace(tracer)


@cli.command()
@click.argument("ports", nargs=-1, type=click.IntRange(1, 65535))
@engine_option
@click.option("--dir", "directory", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Evidence directory (made 0700; files 0600).")
@click.option("--max-bytes", type=ByteSize(), default=str(DEFAULT_MAX_BYTES), show_default=True,
              help="Rotate the live segment before it grows past this.")
@click.option("--keep", type=click.IntRange(1), default=DEFAULT_KEEP, show_default=True,
              help="Compressed old segments to keep.")
@click.option("--states", is_flag=True,
              help="Also record every transition on the ports (failures always carry the "
                   "last 60 s of them).")
@click.option("--metrics", "metrics_at", type=HostPort(), metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (e.g. "
                   "127.0.0.1:9464, [::]:9464).")
def record(ports: Sequence[int], engine_name: str, directory: Path, max_bytes: int, keep: int,
           states: bool, metrics_at: tuple[str, int] | None) -> None:
    """Record evidence of failures on PORTs (default: every port) until SIGTERM."""
    writer = _evidence_dir(directory, "'--dir'", max_bytes=max_bytes, keep=keep)
    options = {"command": "record", "dir": str(directory), "max_bytes": max_bytes,
               "keep": keep, "states": states, "ports": sorted(set(ports)),
               "engine": engine_name}

    def evidence(ev: Event) -> None:
        if states or not isinstance(ev, StateChange):
            writer(ev)

    outputs: list[tuple[str, Sink]] = [(str(directory), evidence)]
    if metrics_at is not None:
        from portrace.output.metrics import Metrics  # prometheus_client: ~29 ms, when asked for

        metrics = Metrics(ports)
        host, port = metrics_at
        try:
            metrics.serve(host, port)
        except OSError as exc:
            raise click.BadParameter(f"cannot serve metrics on {host}:{port}: "
                                     f"{exc.strerror or exc}", param_hint="'--metrics'") from None
        outputs.append(("metrics", metrics))
        options["metrics"] = f"{host}:{port}"
    tracer = Tracer(ports, Fanout(outputs), options=options, engine_name=engine_name,
                    states=states)
    _trace(tracer, started=f"portrace: recording into {directory}", finish=writer.close)


def _evidence_dir(directory: Path, option: str, **limits: int) -> EvidenceDir:
    """EvidenceDir, its OSError as a bad ``option`` (its own errors carry
    their exit codes)."""
    try:
        return EvidenceDir(directory, **limits)
    except OSError as exc:
        raise click.BadParameter(f"cannot write evidence there: {exc.strerror or exc}",
                                 param_hint=option) from None


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["terminal", "markdown", "html", "json"]),
              default="terminal", show_default=True)
@click.option("--since", type=Timestamp(), help="Only events at or after this time.")
@click.option("--until", type=Timestamp(), help="Only events at or before this time.")
@click.option("-o", "--output", type=PrivateFile(append=False), default="-",
              help="Write the report here (default: stdout; a file is made 0600, never "
                   "written through a symlink).")
def report(paths: Sequence[Path], fmt: str, since: datetime | None, until: datetime | None,
           output: IO[str]) -> None:
    """Postmortem of evidence files or directories (rotated, gzipped ones too)."""
    # Lazy: ~4 ms of start-up that only `portrace report` needs.
    from portrace.output import report as pm_report
    from portrace.output.evidence import ReadReport, read

    seen = ReadReport()
    events = list(read(paths, seen))
    for warning in seen.warnings():
        click.echo(f"portrace: {warning}", err=True)
    pm = pm_report.analyze(events, [str(f) for f in seen.files], seen.warnings(), since, until)
    if fmt == "json":
        text = pm_report.dumps(pm)
    elif fmt == "html":
        text = pm_report.to_html(pm)
    else:
        text = pm_report.to_text(pm, markdown=fmt == "markdown")
    try:
        output.write(text)
        output.flush()
    except BrokenPipeError:
        _quiet_stdout()
    except OSError as exc:
        with contextlib.suppress(OSError):
            output.close()  # what could not be flushed is dropped, not retried at exit
        raise errors.OutputFailed(f"cannot write the report to {getattr(output, 'name', '-o')}: "
                                  f"{exc.strerror or exc}") from None


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.startswith("net."):
        raise click.BadParameter(f"{text!r}: want net.KEY=VALUE (per-namespace sysctls)")
    return key, value


@cli.command()
@click.argument("scenarios", nargs=-1, required=True)
@engine_option
@click.option("--sysctl", "sysctls", multiple=True, metavar="KEY=VALUE",
              help="Set in every run (repeatable).")
@click.option("--compare", metavar="KEY=V1,V2,...",
              help="One run per value; the last is judged against the first.")
@click.option("--within", type=Finite(1, 300), default=10.0, show_default=True,
              help="Seconds a restart may retry, or the client may connect.")
@click.option("--expect", type=click.Choice(["fixed", "improved", "unchanged", "worse"]),
              help="Exit 0 only if every scenario's comparison came out so (needs --compare "
                   "or --baseline).")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of tables.")
@click.option("--host", is_flag=True,
              help="Run in this namespace, changing the host's sysctls (restored after).")
@click.option("--yes", is_flag=True, help="Confirm --host.")
@click.option("--evidence", type=click.Path(file_okay=False, path_type=Path),
              help="Also record the runs' evidence there (as portrace record does).")
@click.option("--save", type=PrivateFile(append=False), metavar="FILE",
              help="Also write the runs as JSON (what --json prints) to FILE, for a later "
                   "--baseline.")
@click.option("--baseline", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Judge each scenario's run against its run in FILE (an earlier --save or "
                   "--json): fixed, improved, unchanged or worse. Without --expect, exit 19 "
                   "if one is worse.")
def lab(scenarios: Sequence[str], engine_name: str, sysctls: Sequence[str],
        compare: str | None, within: float, expect: str | None, as_json: bool, host: bool,
        yes: bool, evidence: Path | None, save: IO[str] | None,
        baseline: Path | None) -> None:
    """Run SCENARIOs (restart-timewait[:neither|old|new|both], restart-finwait2,
    listener-held, connect-exhaustion) with and without sysctl changes, each in a
    fresh network namespace, and show what moved."""
    from portrace.commands import lab as lab_mod  # lazy: ~10 ms with stage, lab's own

    if host and not yes:
        raise click.UsageError("--host changes this machine's sysctls (they are restored "
                               "after); say --yes to do that")
    if expect and not (compare or baseline):
        raise click.UsageError("--expect judges a --compare or a --baseline")
    if compare and baseline:
        raise click.UsageError("--compare and --baseline are two ways to judge; give one")
    before = lab_mod.load_baseline(baseline) if baseline is not None else {}
    parsed = [lab_mod.parse_scenario(s) for s in scenarios]
    fixed = [_key_value(s) for s in sysctls]
    cmp = None
    if compare:
        key, value = _key_value(compare)
        cmp = (key, value.split(","))
    lab_mod.check_settings(fixed + [(cmp[0], v) for v in cmp[1]] if cmp else fixed)
    # SIGTERM and SIGHUP unwind like Ctrl-C: namespaces removed, sysctls restored.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.default_int_handler)
    writer = _evidence_dir(evidence, "'--evidence'") if evidence is not None else None
    laboratory = lab_mod.Lab(host=host, within=within, evidence=writer, engine_name=engine_name)
    judged = lab_mod.run_scenarios(
        laboratory, parsed, lab_mod.variants(fixed, cmp), before,
        show=None if as_json else
        lambda outcomes: click.echo(lab_mod.table(outcomes, cmp[0] if cmp else None) + "\n"))
    if writer is not None:
        writer.close()
    document = judged.document()
    if as_json:
        click.echo(document)
    if save is not None:
        save.write(document + "\n")
        save.close()
    if baseline is not None:
        for line in lab_mod.against_baseline(judged, baseline, parsed, before):
            click.echo(line, err=as_json)
    lab_mod.require(judged, expect, baseline is not None)


@cli.command(epilog="\b\nExit status: 0 every PORT would bind now, 1 some would not "
                    "(its blockers are named), others as for every command (portrace --help).")
@click.argument("ports", nargs=-1, required=True, type=click.IntRange(1, 65535))
@click.option("--addr", type=Address(), default="0.0.0.0", show_default=True,
              help="The address the socket would bind (:: for IPv6).")
@click.option("--udp", is_flag=True, help="A UDP socket (default TCP).")
@click.option("--reuseaddr", is_flag=True, help="The socket would set SO_REUSEADDR.")
@click.option("--reuseport", is_flag=True, help="The socket would set SO_REUSEPORT.")
@click.option("--v6only", is_flag=True, help="The socket would set IPV6_V6ONLY.")
@click.option("--uid", type=click.IntRange(0), metavar="UID",
              help="The uid the socket would belong to (SO_REUSEPORT needs the same owner); "
                   "default: not known.")
@click.option("--netns", "netns_name", metavar="NAME",
              help="Look in this `ip netns` namespace.")
@click.option("--pid", type=click.IntRange(1), help="Look in this process's network namespace.")
@click.option("--wait", is_flag=True,
              help="Wait until every PORT would bind (TIME_WAIT expiry, holder exit); "
                   "print what was waited for.")
@click.option("--timeout", type=Finite(0), metavar="SECONDS",
              help="With --wait: give up after this long (exit 1).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per PORT "
              "(docs/events.md, type check).")
@click.option("--engine", "engine_name", type=click.Choice(check_mod.ENGINES), default="auto",
              show_default=True,
              help="core: BPF, the port's own hash bucket, every socket's own options (root); "
                   "sock_diag: no BPF, no root needed (options of live sockets unknown); auto: "
                   "core where it runs.")
def check(ports: Sequence[int], addr: str, udp: bool, reuseaddr: bool, reuseport: bool,
          v6only: bool, uid: int | None, netns_name: str | None, pid: int | None, wait: bool,
          timeout: float | None, as_json: bool, engine_name: str) -> None:
    """Would bind() to ADDR:PORT succeed now? If not, what blocks it, and what to do.
    Nothing is changed: no socket is bound, none destroyed. For a deploy script:
    `portrace check --wait --timeout 90 9090` instead of `sleep 60`."""
    if netns_name is not None and pid is not None:
        raise click.UsageError("--netns and --pid both name a namespace; give one")
    if timeout is not None and not wait:
        raise click.UsageError("--timeout limits --wait")
    if v6only and ipaddress.ip_address(addr).version != 6:
        raise click.BadParameter("IPV6_V6ONLY is for an IPv6 --addr", param_hint="'--v6only'")
    opts = SockOpts(reuseaddr=reuseaddr, reuseport=reuseport,
                    v6only=v6only if ipaddress.ip_address(addr).version == 6 else None,
                    bound_to_device=False)
    wanted = [check_mod.Wanted("udp" if udp else "tcp", addr, port, opts, uid)
              for port in sorted(set(ports))]
    show = (lambda ev: click.echo(json.dumps(to_json(ev)))) if as_json else terminal_sink(False)

    def blocked(ev: Check) -> None:
        if not as_json:
            for line in format_check(ev):
                click.echo(line)
            limit = f" up to {timeout:g} s" if timeout is not None else ""
            click.echo(f"portrace: waiting{limit} for it to clear", err=True)

    with check_mod.namespace(netns_name, pid) as (netns_fd, netns):
        looker = check_mod.Looker(engine_name, netns_fd, netns).open()
        try:
            if wait:
                answers = check_mod.wait_free(wanted, looker, pid, timeout, blocked)
            else:
                answers = check_mod.check_once(wanted, looker, pid)
        finally:
            looker.close()
    for ev in answers:
        show(ev)
    sys.stdout.flush()
    if not all(a.free for a in answers):
        sys.exit(ExitStatus.BLOCKED)


@cli.command()
@engine_option
@click.option("--port", type=click.IntRange(1, 65534), default=9090, show_default=True,
              help="First of the two ports the demo uses, inside its own network namespace.")
def demo(engine_name: str, port: int) -> None:
    """Stage two real conflicts in a throwaway netns and diagnose them."""
    from portrace.commands.demo import run_demo  # lazy: ~9 ms with stage, demo's own

    sys.exit(ExitStatus.OK if run_demo(port, engine_name) else ExitStatus.DEMO_MISSED)


def main(argv: Sequence[str] | None = None) -> None:
    # Before any thread: a thread inherits the capabilities it is made with.
    capabilities.raise_permitted()
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="portrace",
                 standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"portrace: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(ExitStatus.INTERRUPTED)
    except errors.PortraceError as exc:
        click.echo(f"portrace: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("portrace: interrupted", err=True)
        sys.exit(ExitStatus.INTERRUPTED)
    except Exception:  # a bug: keep the traceback for the report, and a code of its own
        traceback.print_exc()
        click.echo(f"portrace: internal error (exit {int(ExitStatus.INTERNAL)}); please "
                   "report the traceback above", err=True)
        sys.exit(ExitStatus.INTERNAL)
    sys.exit(ExitStatus.OK)
