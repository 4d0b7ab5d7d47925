"""The ``portrace`` command's entry point: Ctrl-C while the CLI's modules load
(about 0.1 s: click, psutil, the engines' toolkit) exits 130 with nothing
printed, as it does once the CLI runs, instead of a traceback from an import."""

from __future__ import annotations

import sys

from portrace.errors import ExitStatus


def main() -> None:
    try:
        # Imported here, not at the top, so that the guard covers it.
        from portrace.commands.cli import main as run_cli
    except KeyboardInterrupt:
        sys.exit(ExitStatus.INTERRUPTED)
    run_cli()
