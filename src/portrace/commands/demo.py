"""``portrace demo``: the main job on real kernel input, nothing to prepare.

In a throwaway network namespace it stages (1) a restart that fails on the
old server's TIME_WAIT socket and (2) a restart that fails because a child the
old server forked still holds the listening fd, runs the tracer on both and
prints what it caught. Exit 0 only if both were diagnosed as staged.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

import click

from portrace.commands.stage import ScratchNetns, Staged
from portrace.events import CallError, Event
from portrace.output.render import format_failure
from portrace.pipeline.tracer import Tracer

WAIT_S = 15.0


def _await_failure(caught: queue.Queue[CallError], port: int) -> CallError | None:
    try:
        while True:
            ev = caught.get(timeout=WAIT_S)
            if ev.attempt.port == port:
                return ev
    except queue.Empty:
        return None


def _check(title: str, ev: CallError | None, ok: Callable[[CallError], bool]) -> bool:
    if ev is None:
        click.secho(f"  MISSED: no failure reported within {WAIT_S:.0f} s", fg="red")
        return False
    for line in format_failure(ev):
        click.echo(line)
    good = ok(ev)
    click.secho(f"  => {'diagnosed as staged' if good else 'NOT the staged cause'}: {title}",
                fg="green" if good else "red")
    return good


def run_demo(port: int, engine_name: str = "auto") -> bool:
    tw_port, listen_port = port, port + 1
    caught: queue.Queue[CallError] = queue.Queue()

    def sink(ev: Event) -> None:
        if isinstance(ev, CallError):
            caught.put(ev)

    stop = threading.Event()
    results = []
    with ScratchNetns(f"portrace-demo-{os.getpid()}") as ns:
        tracer = Tracer([tw_port, listen_port], sink, engine_name=engine_name, states=False)
        click.secho("portrace demo: loading and attaching the probes...", dim=True)
        ready = tracer.start()
        click.secho(f"portrace demo: engine {ready.engine} ({ready.engine_reason})", dim=True)
        poller = threading.Thread(target=tracer.run, args=(stop,), daemon=True)
        poller.start()
        try:
            click.secho(f"\n1. old-server served a client on 127.0.0.1:{tw_port}, closed the "
                        "connection first and exited;\n   new-server binds the same address "
                        "without SO_REUSEADDR (netns " + ns.name + ")", bold=True)
            Staged("timewait", "127.0.0.1", tw_port, name="old-server", netns=ns).release()
            new = Staged("bind", "127.0.0.1", tw_port, "--hold", name="new-server", netns=ns)
            ev = _await_failure(caught, tw_port)
            new.release()
            results.append(_check("TIME_WAIT, closed by old-server", ev, lambda e: (
                e.verdict.cause == "time_wait" and e.blockers[0].closed_by is not None
                and e.blockers[0].closed_by.comm == "old-server")))

            click.secho(f"\n2. old-server listened on 0.0.0.0:{listen_port}, started a `sleep` "
                        "child that inherited the listening fd, and exited;\n   new-server "
                        "binds the port", bold=True)
            old = Staged("listen-fork-child", "0.0.0.0", listen_port, name="old-server",
                         netns=ns)
            child_pid = int(old.info)
            old.release()
            new = Staged("bind", "0.0.0.0", listen_port, "--hold", name="new-server", netns=ns)
            ev = _await_failure(caught, listen_port)
            new.release()
            os.kill(child_pid, 15)
            results.append(_check("LISTEN held by the inherited fd in sleep", ev, lambda e: (
                e.verdict.cause == "listener"
                and any(p.pid == child_pid and p.comm == "sleep" and p.inherited
                        for p in e.blockers[0].processes))))
        finally:
            stop.set()
            poller.join(timeout=5)
            tracer.close()
    click.secho(f"\nportrace demo: {sum(results)} of 2 staged conflicts diagnosed",
                fg="green" if all(results) else "red", bold=True)
    return all(results)
